"""The cost of coarse-first tiles (issue 34): the demo surface dealt coarse-first vs in contiguous bands.

The demo's job (jobs/demo.toml: the digits CNN, train and test splits, a 31x31 plane) run with
``tile_order`` coarse (the default: every 4th row and column first, then the gaps) and contiguous
(bands of rows, the order before), under ``mpirun -n 1`` and ``-n 2``, one torch thread per rank,
``fidelity`` off. Rounds alternate which order goes first, so a load that drifts hits both alike.
Points per pass and the layout are chosen once (the first, untimed run) and then pinned, so both
orders run the same passes. Each run's ``wall_seconds`` (the sampling loop, slowest rank) is read from its file.

Reported per rank count: the median wall time of each order and their ratio (coarse / contiguous,
target <= 1.02), the ratio of the fastest runs and the ratio in each round (on a shared machine a
run's wall time swings by tens of percent with the other processes' load: read the spread), the
share of the wall time spent writing, and how much of the run was done when the whole coarse
lattice (every 4th row and column) was (from ``finished_at``): the first picture of the whole plane.
Values of the two orders are checked to agree (bit for bit at one point a pass).

Run: ``python bench/bench_tile_order.py [--rounds 3] [--ranks 1,2]``; the last line is JSON.
``--smoke``: a 9x9 grid on 64 samples, the model trained one epoch, one round, 2 ranks only (the figures
mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMP_NUM_THREADS": "1"}
ORDERS = ("contiguous", "coarse")


def job_file(folder: Path, side: int, ckpt: Path, subset: int | None, order: str, plan: dict) -> Path:
    """jobs/demo.toml's surface with this bench's checkpoint, grid side, order and ``plan`` (points
    per pass and layout pinned; empty: chosen by the run)."""
    keys = {"model": "cnn", "data": "digits", "checkpoint": str(ckpt), "split": "train,test",
            "x": f"-1:1:{side}", "y": f"-1:1:{side}", "seed": 0, "norm": "filter", "ignore": "biasbn",
            "threads": 1, "fidelity": "off", "progress": False, "overwrite": True, "tile_order": order,
            **({"subset": subset} if subset else {}), **plan}
    path = folder / f"{order}.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))
    return path


def run(ranks: int, job: Path, out: Path) -> dict:
    """One ``lsurf surface`` job: its sampling wall time, the share of it spent writing, the share
    of its points done when the coarse lattice was, its points per pass, layout and values."""
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "lsurf", "surface",
           "--config", str(job), "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    with h5py.File(out) as f:
        stamps = f["finished_at"][()]
        wall = float(f.attrs["wall_seconds"])
        return {"wall": wall, "write_share": float(max(f.attrs["rank_write_seconds"])) / wall,
                "k": int(f.attrs["points_per_pass"]),
                "layout": "channels-last" if f.attrs["channels_last"] else "contiguous",
                "lattice_share": float((stamps <= stamps[::4, ::4].max()).mean()),
                "loss": f["train_loss"][()], "acc": f["test_acc"][()]}


def measure(ranks: int, rounds: int, folder: Path, side: int, ckpt: Path, subset: int | None) -> dict:
    """Both orders, ``rounds`` times each, alternating which goes first."""
    chosen = run(ranks, job_file(folder, side, ckpt, subset, "coarse", {}), folder / "calibrate.h5")
    k, plan = chosen["k"], {"points_per_pass": chosen["k"], "layout": chosen["layout"]}
    jobs = {order: job_file(folder, side, ckpt, subset, order, plan) for order in ORDERS}
    runs: dict[str, list[dict]] = {order: [] for order in ORDERS}
    for r in range(rounds):
        for order in (ORDERS if r % 2 == 0 else ORDERS[::-1]):
            runs[order].append(run(ranks, jobs[order], folder / f"{order}.h5"))
    first = {order: runs[order][0] for order in ORDERS}
    for q in ("loss", "acc"):
        a, b = first["coarse"][q], first["contiguous"][q]
        if not (np.array_equal(a, b) if k == 1 else np.allclose(a, b, rtol=1e-6, atol=0)):
            sys.exit(f"{q} differs between the orders (K={k}): max |diff| {np.nanmax(np.abs(a - b))}")
    walls = {order: [x["wall"] for x in runs[order]] for order in ORDERS}
    ratios = [c / o for c, o in zip(walls["coarse"], walls["contiguous"])]
    return {"ranks": ranks, "points_per_pass": k, "layout": plan["layout"], "wall_contiguous": walls["contiguous"],
            "wall_coarse": walls["coarse"],
            "ratio": statistics.median(walls["coarse"]) / statistics.median(walls["contiguous"]),
            "ratio_min": min(walls["coarse"]) / min(walls["contiguous"]), "ratio_per_round": ratios,
            "write_share": {order: statistics.median(x["write_share"] for x in runs[order]) for order in ORDERS},
            "bit_identical": k == 1,
            "lattice_share": {order: statistics.median(x["lattice_share"] for x in runs[order]) for order in ORDERS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    args = ap.parse_args()
    side, subset, epochs, rounds = (9, 64, 1, 1) if args.smoke else (31, None, 10, args.rounds)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = ["--data", "digits", *(["--subset", str(subset)] if subset else [])]
        subprocess.run([sys.executable, "-m", "lsurf", "train", "--model", "cnn", *data, "--epochs", str(epochs),
                        "--out-dir", str(folder / "runs")], check=True, capture_output=True, env=ENV)
        ckpt = folder / "runs" / f"model_{epochs}.t7"
        ranks = ["2"] if args.smoke else args.ranks.split(",")  # a smoke: one rank count, the one with MPI
        rows = [measure(int(n), rounds, folder, side, ckpt, subset) for n in ranks]
    print(f"demo surface: digits CNN, train+test, {side}x{side}, 1 thread per rank, {rounds} rounds; "
          f"load before {load_before[0]:.2f}, {time.perf_counter() - t0:.0f} s in all")
    for r in rows:
        walls, write, share = (r["wall_contiguous"], r["wall_coarse"]), r["write_share"], r["lattice_share"]
        print(f"{r['ranks']} rank(s), K={r['points_per_pass']}, {r['layout']}: contiguous vs coarse-first")
        print(f"  sampling wall s, median {statistics.median(walls[0]):.2f} vs {statistics.median(walls[1]):.2f}: "
              f"ratio {r['ratio']:.3f} (of the minima {r['ratio_min']:.3f}; per round "
              f"{', '.join(f'{x:.3f}' for x in r['ratio_per_round'])})")
        print(f"  writing: {100 * write['contiguous']:.2f} % vs {100 * write['coarse']:.2f} % of the wall time; "
              f"done when the 4x4 lattice was: {100 * share['contiguous']:.0f} % vs {100 * share['coarse']:.0f} %")
    ok = all(r["ratio"] <= 1.02 for r in rows)
    print(f"target: coarse-first costs <= 2 % (median wall time) {'met' if ok else 'MISSED'}; values agree (checked)")
    print(json.dumps({"bench": "tile_order", "side": side, "rounds": rounds, "load_before": load_before, "rows": rows}))


if __name__ == "__main__":
    main()
