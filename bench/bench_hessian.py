"""Strong scaling of the distributed Hessian: the top eigenpair of the digits CNN's mean loss.

Runs the same Lanczos (``--iters`` steps, top-1 eigenvalue and its eigenvector, no trace) over the
digits train split with ``mpirun -n 1`` and ``mpirun -n 2``, one torch thread per rank. Each rank
holds its share of the batches and the ranks add their Hessian-vector products with one allreduce
per product. The worker (this script with ``--worker``) times the library call
(:func:`lsurf.run.curvature.model_spectrum`) on the slowest rank, after the inputs are loaded;
the whole command's time (start-up included) is shown next to it.

How to read it: ``speed-up`` is the 1-rank time over the N-rank time of the computation; the
eigenvalues of both runs must agree to 1e-6 (float64). Target (issue 14): speed-up >= 1.7 on 2 ranks.

Memory of the Ritz step (issue 30): in a fresh process, an MLP of ``--ritz-params`` float32
weights (random data) runs the same number of Lanczos steps twice: alone (the SLQ density: Lanczos,
no Ritz vectors), then for its top eigenpair (Lanczos, then the Ritz vector from the basis). Each
peak resident set above the one before, over the basis's bytes (steps × parameters × 4), is shown:
Lanczos's peak is the basis and a few vectors of products; the Ritz step's is what forming the
vector adds on top (0: nothing beyond Lanczos's own peak; a copy of the basis in float64 was 3).
glibc's mmap threshold is fixed at 1 MiB so that freed vectors leave the resident set.
To see the figure of an older lsurf, copy this script into a checkout of it and run it there.

Run: ``python bench/bench_hessian.py [--iters 30] [--subset N] [--ranks 2] [--ritz-params 4000000]``;
the last line is JSON.
``--smoke``: 3 Lanczos steps on 64 samples, the model trained one epoch, a 20 000-weight MLP for the
Ritz step (seconds; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scaling import REPO


def worker(args: argparse.Namespace) -> None:
    """One rank of the measured job: load, synchronise, time the distributed top eigenpair."""
    from mpi4py import MPI

    from lsurf.engine.curvature.hessian import SpectrumSpec
    from lsurf.run.curvature import model_spectrum
    from lsurf.run.options import Options
    from lsurf.run.runtime import configure_process
    from lsurf.run.sources import load_inputs
    from lsurf.run.world import World

    comm = MPI.COMM_WORLD
    device = configure_process(World.of(comm), "cpu", threads=1)
    options = Options(model="cnn", data="digits", checkpoint=args.worker, dtype=args.dtype, subset=args.subset)
    model, data = load_inputs(options)
    assert data is not None
    comm.Barrier()
    t0 = time.perf_counter()
    done = model_spectrum(model, data["train"], options, SpectrumSpec(top_k=1, iters=args.iters, trace_samples=0,
                                                                      directions=True), device, comm)
    seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    if done is not None:
        results, _ = done
        print(json.dumps({"seconds": seconds, "eigenvalue": float(results["eigenvalues"][0]),
                          "samples": len(data["train"])}))


def measure(ranks: int, ckpt: Path, args: argparse.Namespace) -> dict:
    """``mpirun -n ranks`` of the worker: its timing line, and the whole command's time."""
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--allow-run-as-root", sys.executable, __file__,
           "--worker", str(ckpt), "--iters", str(args.iters), "--dtype", args.dtype]
    cmd += ["--subset", str(args.subset)] if args.subset else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    command = time.perf_counter() - t0
    return {"ranks": ranks, **json.loads(p.stdout.strip().splitlines()[-1]), "command": command}


def ritz_worker(params: int, steps: int) -> None:
    """Peak resident-set rises of Lanczos alone and of the Ritz step after it, over the basis's bytes."""
    import resource

    import torch
    from torch import nn

    from lsurf.engine.curvature.hessian import Hessian

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    width = params // 1010  # 1000 inputs, 10 outputs: the weights of the two layers (biases aside)
    model = nn.Sequential(nn.Linear(1000, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(64, 1000, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    h = Hessian(model, [(x, y)], nn.CrossEntropyLoss(reduction="none"))
    basis = steps * h.size * 4

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    h.hvp(torch.randn(h.size, generator=gen))  # the product's own transients are in the first peak
    start = peak()
    h.density(runs=1, steps=steps)
    lanczos = peak()
    h.top_eigenvalues(k=1, iters=steps)
    print(json.dumps({"params": h.size, "steps": steps, "basis_bytes": basis, "lanczos": (lanczos - start) / basis,
                      "ritz_extra": (peak() - lanczos) / basis}))


def ritz_memory(params: int, steps: int) -> dict:
    """:func:`ritz_worker` in a fresh process (its peaks are its own), with vectors mapped one by one."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    p = subprocess.run([sys.executable, __file__, "--ritz-worker", str(params), "--iters", str(steps)], check=True,
                       capture_output=True, text=True, env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30, help="Lanczos steps (default 30)")
    ap.add_argument("--subset", type=int, default=None, help="samples of the train split (default: all)")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    ap.add_argument("--ritz-params", type=int, default=4_000_000,
                    help="weights of the MLP whose Ritz step's memory is measured (default 4 000 000)")
    ap.add_argument("--worker", metavar="CKPT", help=argparse.SUPPRESS)
    ap.add_argument("--ritz-worker", type=int, metavar="PARAMS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.ritz_worker:
        return ritz_worker(args.ritz_worker, args.iters)
    if args.smoke:
        args.iters, args.subset, args.ritz_params = 3, 64, 20_000
    epochs = "1" if args.smoke else "2"
    train_subset = ["--subset", str(args.subset)] if args.smoke else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        subprocess.run([sys.executable, "-m", "lsurf", "train", "--model", "cnn", "--data", "digits", *train_subset,
                        "--epochs", epochs, "--out-dir", str(runs)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        rows = [measure(n, runs / f"model_{epochs}.t7", args) for n in (1, args.ranks)]
    print(f"digits CNN, top-1 eigenpair, {rows[0]['samples']} samples, {args.iters} Lanczos steps, {args.dtype}, "
          f"1 thread per rank; load before {load_before[0]:.2f}")
    print(f"{'ranks':>5} {'compute s':>10} {'command s':>10} {'speed-up':>9} {'eigenvalue':>14}")
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        print(f"{r['ranks']:>5} {r['seconds']:>10.2f} {r['command']:>10.2f} {r['speedup']:>9.2f} "
              f"{r['eigenvalue']:>14.10g}")
    agree = abs(rows[1]["eigenvalue"] - rows[0]["eigenvalue"]) <= 1e-6 * abs(rows[0]["eigenvalue"])
    print(f"targets: speed-up >= 1.7 {'met' if rows[1]['speedup'] >= 1.7 else 'MISSED'}; "
          f"eigenvalues agree to 1e-6 {'yes' if agree else 'NO'}")
    ritz = ritz_memory(args.ritz_params, args.iters)
    print(f"Ritz step, MLP of {ritz['params']} float32 weights, {ritz['steps']} steps (basis "
          f"{ritz['basis_bytes'] / 2**20:.1f} MiB): peak rise of Lanczos {ritz['lanczos']:.2f} x basis, "
          f"then of the Ritz vector {ritz['ritz_extra']:.2f} x basis")
    print(json.dumps({"bench": "hessian", "iters": args.iters, "dtype": args.dtype, "load_before": load_before,
                      "rows": rows, "ritz_memory": ritz}))


if __name__ == "__main__":
    main()
