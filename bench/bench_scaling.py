"""Strong scaling of ``lsurf surface`` on one machine, and the share of the run spent writing.

Runs the same surface (the digits CNN on its full train split, a 41x41 grid; ``--quick``: 21x21)
with ``mpirun -n 1`` and ``mpirun -n 2``, one torch thread per rank, for both write paths
(``--writer mpio``: every rank writes through parallel HDF5; ``--writer root``: rank 0 writes what
the others send). From each file it reads ``wall_seconds`` (the sampling loop, slowest rank) and
``rank_write_seconds``; the whole command's time (start-up included) is shown next to it.

How to read it: ``speed-up`` is 1-rank wall / N-rank wall of the same writer; ``write %`` is the
largest rank's write time over the wall time. Targets (issue 3): speed-up >= 1.8 on 2 ranks, write < 1 %.

Run: ``python bench/bench_scaling.py [--quick] [--ranks 2]``; the last line is JSON. ``--smoke``: a 3x3
grid on 64 samples, the model trained one epoch on them (seconds; the figures mean nothing).
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

import h5py

REPO = Path(__file__).resolve().parents[1]


def lsurf_command(ranks: int, args: list[str]) -> list[str]:
    return ["mpirun", "-n", str(ranks), "--oversubscribe", "--allow-run-as-root",
            sys.executable, "-m", "lsurf", *args]


def run(ranks: int, writer: str, grid: str, ckpt: Path, out: Path, data: list[str]) -> dict:
    args = ["surface", "--device", "cpu", "--model", "cnn", *data, "--checkpoint", str(ckpt),
            "--x", f"-1:1:{grid}", "--y", f"-1:1:{grid}", "--threads", "1", "--writer", writer,
            "--points-per-pass", "1", "--no-progress", "--overwrite", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    t0 = time.perf_counter()
    subprocess.run(lsurf_command(ranks, args), check=True, capture_output=True, env=env)
    command = time.perf_counter() - t0
    with h5py.File(out) as f:
        wall = float(f.attrs["wall_seconds"])
        write = float(max(f.attrs["rank_write_seconds"]))
        points = [int(p) for p in f.attrs["rank_points"]]
    return {"ranks": ranks, "writer": writer, "wall": wall, "command": command, "write": write, "points": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    args = ap.parse_args()
    grid = "3" if args.smoke else "21" if args.quick else "41"
    data = ["--data", "digits"] + (["--subset", "64"] if args.smoke else [])
    epochs = "1" if args.smoke else "2"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "lsurf", "train", "--model", "cnn", *data, "--epochs", epochs,
                        "--out-dir", str(tmp / "runs")], check=True, capture_output=True, env=env)
        ckpt = tmp / "runs" / f"model_{epochs}.t7"
        rows = [run(n, w, grid, ckpt, tmp / f"s{n}{w}.h5", data) for w in ("mpio", "root") for n in (1, args.ranks)]
    print(f"digits CNN, {grid}x{grid} grid, 1 thread per rank; load before {load_before[0]:.2f}")
    print(f"{'writer':<6} {'ranks':>5} {'wall s':>8} {'command s':>10} {'speed-up':>9} {'write %':>8}  points per rank")
    base = {r["writer"]: r["wall"] for r in rows if r["ranks"] == 1}
    for r in rows:
        r["speedup"] = base[r["writer"]] / r["wall"]
        r["write_fraction"] = r["write"] / r["wall"]
        print(f"{r['writer']:<6} {r['ranks']:>5} {r['wall']:>8.2f} {r['command']:>10.2f} {r['speedup']:>9.2f} "
              f"{100 * r['write_fraction']:>7.3f}%  {r['points']}")
    multi = [r for r in rows if r["ranks"] > 1]
    ok_speed = all(r["speedup"] >= 1.8 for r in multi)
    ok_write = all(r["write_fraction"] < 0.01 for r in rows)
    print(f"targets: speed-up >= 1.8 {'met' if ok_speed else 'MISSED'}; write < 1 % {'met' if ok_write else 'MISSED'}")
    print(json.dumps({"bench": "scaling", "grid": grid, "load_before": load_before, "rows": rows}))


if __name__ == "__main__":
    main()
