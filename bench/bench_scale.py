"""Streamed vs resident data, and rank groups, measured in one run on this machine.

1. **Streaming** (1 rank, 1 torch thread, 1 loader worker): per-point cost of ``--resident never``
   over ``--resident always`` for ResNet-20 on the CIFAR-format fixture data, and for the digits
   CNN on a larger on-disk ``npy:`` store (``--rows`` samples of 1x8x8, default 200 000: 51 MB).
   Target: streamed <= 1.15x resident (loading overlapped with compute).
2. **Rank groups**: a 5-point curve of ResNet-20 on synthetic CIFAR-shaped data, ``mpirun -n 2
   --ranks-per-point 2`` against one rank. Target: speed-up >= 1.7.

Seconds come from the files (``eval_seconds_per_point``, ``wall_seconds``), so start-up is left out.
Run: ``python bench/bench_scale.py [--quick]``; the last line is JSON. ``--smoke``: 2 points on 32 CIFAR
images and a 2,000-row store, the groups on 32 images (seconds; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "fixtures" / "loss-landscape" / "cifar10-fake"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def surface(args: list[str], out: Path, ranks: int = 1) -> dict:
    launcher = ["mpirun", "-n", str(ranks), "--oversubscribe"] if ranks > 1 else []
    cmd = [*launcher, sys.executable, "-m", "lsurf", "surface", *args, "--threads", "1", "--points-per-pass", "1",
           "--no-progress", "--overwrite", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    with h5py.File(out) as f:
        return {"per_point": float(f.attrs["eval_seconds_per_point"]), "wall": float(f.attrs["wall_seconds"]),
                "streamed": str(f.attrs["streamed"])}


def streaming(tmp: Path, rows: int, points: int, cifar_subset: list[str]) -> list[dict]:
    from lsurf.engine.data.stores import save_store

    g = np.random.default_rng(0)
    x = g.random((rows, 1, 8, 8), dtype=np.float32)
    save_store(f"npy:{tmp / 'store'}", {"train": (x, g.integers(0, 10, rows))})
    cases = [(f"cnn npy {rows} rows", ["--model", "cnn", "--data", f"npy:{tmp / 'store'}"])]
    if CIFAR.is_dir():  # the shared fixtures beside the repository (a bare clone measures the store alone)
        cases.insert(0, ("resnet20 cifar10-fake", ["--model", "resnet20", "--data", f"cifar10:{CIFAR}", *cifar_subset]))
    out = []
    for name, args in cases:
        grid = ["--x", f"-1:1:{points}", "--workers", "1"]
        held = surface([*args, *grid, "--resident", "always"], tmp / "held.h5")
        streamed = surface([*args, *grid, "--resident", "never"], tmp / "streamed.h5")
        out.append({"case": name, "resident_s": held["per_point"], "streamed_s": streamed["per_point"],
                    "ratio": streamed["per_point"] / held["per_point"]})
    return out


def groups(tmp: Path, n: int, points: int = 5) -> dict:
    args = ["--model", "resnet20", "--data", f"synthetic:shape=3x32x32,n={n}", "--x", f"-1:1:{points}"]
    one = surface(args, tmp / "one.h5")
    two = surface([*args, "--ranks-per-point", "2"], tmp / "two.h5", ranks=2)
    return {"points": points, "one_rank_wall": one["wall"], "group_of_two_wall": two["wall"],
            "speedup": one["wall"] / two["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            rows = streaming(Path(tmp), 2000, 2, ["--subset", "32"])
            grouped = groups(Path(tmp), 32, 2)
        else:
            rows = streaming(Path(tmp), args.rows // (4 if args.quick else 1), 3 if args.quick else 5, [])
            grouped = groups(Path(tmp), 512 if args.quick else 2048)
    print(f"1 torch thread per rank, 1 loader worker; load before {load_before[0]:.2f}")
    for r in rows:
        print(f"streamed/resident {r['case']:<24} {r['streamed_s'] * 1e3:8.1f} / {r['resident_s'] * 1e3:8.1f} ms "
              f"per point = {r['ratio']:.3f}  (target <= 1.15: {'met' if r['ratio'] <= 1.15 else 'MISSED'})")
    print(f"{grouped['points']}-point curve, 2 ranks --ranks-per-point 2 vs 1 rank: {grouped['one_rank_wall']:.2f} s / "
          f"{grouped['group_of_two_wall']:.2f} s = {grouped['speedup']:.2f}x "
          f"(target >= 1.7: {'met' if grouped['speedup'] >= 1.7 else 'MISSED'})")
    print(json.dumps({"bench": "scale", "load_before": load_before, "streaming": rows, "groups": grouped}))


if __name__ == "__main__":
    main()
