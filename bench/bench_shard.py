"""Peak memory per rank and seconds per point of a model sharded over its rank group (``--shard fsdp``),
measured in one run on this machine's CPUs, against the same model unsharded.

A 153 M-parameter MLP (1,024 inputs, 37 hidden layers of 2,048, ten classes; seeded random
weights) is saved as a torch checkpoint; its blocks of 4 M parameters are each 1/36 of it, as a
language model's layers are a small part of it (FSDP2 gathers one block at a time, so a block's
size is what a forward adds). ``lsurf surface`` then samples a 1-D curve of 3 points on 64 samples
around it, each configuration in fresh processes:

- unsharded, 1 rank (the model, θ* and the direction whole: about 3 copies of the weights), the
  losses every other configuration is compared with (float32);
- unsharded, ``--ranks-per-point 4`` (the data split four ways, the model whole on every rank);
- ``--shard fsdp`` with G = 2 and G = 4 (each rank builds the model on the meta device and reads
  its 1/G of the checkpoint's rows; θ* and the direction by rows too).

Then ``lsurf hessian`` (``--iters 2``: two Hessian-vector products, float32) unsharded on 1 rank
and sharded with G = 2 and 4 (one group of all ranks, each reading its rows): peak per rank and the
command's seconds (loading included), and the top eigenvalue against the unsharded one.

Each rank runs lsurf in-process under a wrapper that prints its peak resident set (VmHWM: pages of
the memory-mapped checkpoint it touched included); a process that only imports gives the fixed
cost. Seconds per point are the file's wall seconds over its points. Four ranks share this
machine's two cores, so times under G = 4 are oversubscribed: read them as ratios of this run.

Run: ``python bench/bench_shard.py`` (a few minutes, ~8 GB of memory at its peak); the last line
is JSON. ``--smoke``: a 2-layer, 64-wide MLP, 1 rank and sharded G = 2 only (seconds; the figures
mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
ENV = {**os.environ, **MPI_ENV, "PYTHONPATH": f"{REPO}:{HERE}", "OMP_NUM_THREADS": "1"}

# Runs lsurf in this process (or only imports what it imports), then prints this rank's peak RSS.
_PROBE = r"""
import json, os, sys
from lsurf.cli.main import main
if sys.argv[1] != "import-only":
    rc = main(sys.argv[2:])
    assert rc in (0, None), rc
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
with open(os.path.join(os.environ["BENCH_PEAKS"], rank), "w") as f:  # one file per rank: stdout interleaves
    f.write(str(peak))
"""

SIZES = {"full": (1024, 2048, 37), "smoke": (16, 64, 2)}  # inputs, width, hidden layers


def wide_mlp():
    """The benchmark's model (a ``--model`` plug-in): an MLP of the size ``LSURF_BENCH_SIZE`` names."""
    from torch import nn

    inputs, width, layers = SIZES[os.environ.get("LSURF_BENCH_SIZE", "full")]
    sizes = [inputs] + [width] * layers
    blocks: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


def samples():
    """The benchmark's data (a ``--data`` plug-in): 64 seeded samples of the model's input width."""
    import torch
    from torch.utils.data import TensorDataset

    inputs = SIZES[os.environ.get("LSURF_BENCH_SIZE", "full")][0]
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, inputs, generator=g), torch.randint(0, 10, (64,), generator=g)), None


def run(ranks: int, args: list[str], env: dict) -> list[int]:
    """Each rank's peak RSS (bytes) of one configuration: ``mpirun -n RANKS`` (or one process)."""
    cmd = [sys.executable, "-c", _PROBE, *args]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), *cmd]
    with tempfile.TemporaryDirectory() as peaks:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BENCH_PEAKS": peaks})
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        return [int((Path(peaks) / str(r)).read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    a = ap.parse_args()
    if shutil.which("mpirun") is None:
        raise SystemExit("bench_shard needs mpirun")
    env = {**ENV, "LSURF_BENCH_SIZE": "smoke" if a.smoke else "full"}
    os.environ["LSURF_BENCH_SIZE"] = env["LSURF_BENCH_SIZE"]
    configs = {"unsharded, 1 rank": (1, []), "unsharded, 4 ranks per point": (4, ["--ranks-per-point", "4"]),
               "sharded G=2": (2, ["--ranks-per-point", "2", "--shard", "fsdp"]),
               "sharded G=4": (4, ["--ranks-per-point", "4", "--shard", "fsdp"])}
    if a.smoke:
        configs = {k: v for k, v in configs.items() if k in ("unsharded, 1 rank", "sharded G=2")}
    import h5py
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = wide_mlp()
        params = sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), d / "mlp.pt")
        del model
        fixed = max(run(1, ["import-only"], env))
        rows = {}
        for name, (ranks, extra) in configs.items():
            out = d / "s.h5"
            peaks = run(ranks, ["run", "surface", "--model", "bench_shard:wide_mlp", "--data", "bench_shard:samples",
                                "--checkpoint", str(d / "mlp.pt"), "--x", "-1:1:3", "--batch-size", "64",
                                "--threads", "1", "--no-progress", "--fidelity", "off", "--overwrite",
                                "--out", str(out), *extra], env)
            with h5py.File(out, "r") as f:
                per_point = float(f.attrs["wall_seconds"]) / f["done"].size
                held = [int(x) for x in f.attrs["rank_weights"]]
                losses = f["train_loss"][()]
            first = next(iter(rows.values()), None)
            differs = 0.0 if first is None else float(np.max(np.abs(losses / first["losses"] - 1)))
            rows[name] = {"ranks": ranks, "peak_per_rank": max(peaks), "seconds_per_point": per_point,
                          "weights_held_per_rank": max(held), "losses": losses, "loss_rel_diff": differs}
        hessians = hessian_runs(
            {k: v for k, v in configs.items() if k != "unsharded, 4 ranks per point"}, d / "mlp.pt", env)
    base = rows["unsharded, 1 rank"]
    print(f"MLP of {params / 1e6:.1f} M parameters ({params * 4 / 2**30:.2f} GiB in float32) from a torch "
          f"checkpoint; 64 samples, 3 points; fixed cost (imports) {fixed / 2**30:.2f} GiB per process")
    print(f"{'configuration':30s} {'ranks':>5s} {'peak/rank':>10s} {'vs 1 rank':>9s} {'beyond fixed':>12s} "
          f"{'weights held':>12s} {'s/point':>8s} {'loss vs 1 rank':>14s}")
    for name, r in rows.items():
        peak = r["peak_per_rank"]
        print(f"{name:30s} {r['ranks']:5d} {peak / 2**30:8.2f} G {peak / base['peak_per_rank']:9.2f} "
              f"{(peak - fixed) / (base['peak_per_rank'] - fixed):12.2f} "
              f"{r['weights_held_per_rank'] / params:12.2f} {r['seconds_per_point']:8.2f} "
              f"{r['loss_rel_diff']:14.1e}")
    print("loss vs 1 rank: the largest relative difference of the float32 losses from the unsharded "
          "one-rank run's")
    print(f"{'lsurf hessian (2 products)':30s} {'ranks':>5s} {'peak/rank':>10s} {'vs 1 rank':>9s} {'seconds':>8s} "
          f"{'λ vs 1 rank':>12s}")
    for name, r in hessians.items():
        print(f"{name:30s} {r['ranks']:5d} {r['peak_per_rank'] / 2**30:8.2f} G "
              f"{r['peak_per_rank'] / hessians['unsharded, 1 rank']['peak_per_rank']:9.2f} {r['seconds']:8.1f} "
              f"{r['top_rel_diff']:12.1e}")
    runs = {name: {k: v for k, v in r.items() if k != "losses"} for name, r in rows.items()}
    print(json.dumps({"params": params, "fixed_bytes": fixed, "runs": runs, "hessian": hessians}))


def hessian_runs(configs: dict[str, tuple[int, list[str]]], checkpoint: Path, env: dict) -> dict[str, dict]:
    """``lsurf hessian`` (two products) per configuration: peak per rank, seconds, top eigenvalue."""
    import h5py

    rows: dict[str, dict] = {}
    for name, (ranks, extra) in configs.items():
        out = checkpoint.with_name("h.h5")
        start = time.perf_counter()
        peaks = run(ranks, ["run", "hessian", "--model", "bench_shard:wide_mlp", "--data", "bench_shard:samples",
                            "--checkpoint", str(checkpoint), "--batch-size", "64", "--threads", "1", "--top-k", "1",
                            "--iters", "2", "--trace-samples", "0", "--out", str(out), *extra], env)
        seconds = time.perf_counter() - start
        with h5py.File(out, "r") as f:
            top = float(f["eigenvalues"][0])
        first = next(iter(rows.values()), None)
        rows[name] = {"ranks": ranks, "peak_per_rank": max(peaks), "seconds": seconds, "top": top,
                      "top_rel_diff": 0.0 if first is None else abs(top / first["top"] - 1)}
    return rows


if __name__ == "__main__":
    main()
