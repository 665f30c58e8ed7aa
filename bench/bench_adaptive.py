"""Fewer passes for the same picture (issue 17): coarse-to-fine points and passes stopped early.

Coarse to fine: ``lsurf surface --budget B`` (B = 35 % of the grid), then the same file resumed
without a budget, which computes only the points the adaptive run left out: the full grid at the
cost of one run, every computed value shared. The metric is the contour shift: for each level
``lsurf plot`` draws for the full grid's train loss (strictly between its minimum and maximum), the
symmetric Hausdorff distance between the full grid's contour lines and those of the adaptive
surface as plots fill it, in grid cells (lines densified to 0.1 cell); the worst level counts.
Target: < 1 cell while computing <= 35 % of the points.

Adaptive precision (the CNN): ``--tolerance`` at 1 % of the full grid's train-loss range. Reported:
the samples evaluated over all points and splits as a share of whole passes (target <= 50 %), and
each point's |value − exact| in units of its stored ``loss_error`` (target: all within 3).

Cases: the demo CNN (65×65; its trained checkpoint, train and test splits) and Li et al.'s
ResNet-20 fixture (33×33, its own direction file, the first ``--resnet-subset`` fake-CIFAR train
images: all 1,000 would take hours on 2 cores). float32, one torch thread per rank.

Run: ``python bench/bench_adaptive.py [--ranks 2] [--out DIR] [--figure docs/adaptive_pair.png]``;
the last line is JSON. ``--smoke``: the CNN's rows only, a 17x17 grid (the least a budget of 35 % allows) on 64
images, trained one epoch, files and figure in a temporary folder (the figures mean nothing).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "loss-landscape"
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}


def surface(ranks: int, args: list[str]) -> float:
    """Seconds of one ``lsurf surface`` job under mpirun."""
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, "-m", "lsurf", "surface", "--threads", "1",
           "--no-progress", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def contour_shift(x: np.ndarray, y: np.ndarray, exact: np.ndarray, approx: np.ndarray, levels: np.ndarray) -> float:
    """The worst symmetric Hausdorff distance over ``levels`` between the contour lines, in grid cells."""
    import contourpy
    from scipy.spatial import cKDTree

    def points(z: np.ndarray, level: float) -> np.ndarray:
        lines = contourpy.contour_generator(np.arange(len(x)), np.arange(len(y)), z).lines(level)
        dense = [np.concatenate([a + np.linspace(0, 1, max(2, int(np.hypot(*(b - a)) / 0.1) + 1))[:, None] * (b - a)
                                 for a, b in zip(line[:-1], line[1:])]) for line in lines if len(line) > 1]
        return np.concatenate(dense) if dense else np.empty((0, 2))

    worst = 0.0
    for level in levels[(levels > np.nanmin(exact)) & (levels < np.nanmax(exact))]:
        a, b = points(exact, level), points(approx, level)
        if len(a) == 0 and len(b) == 0:
            continue
        if len(a) == 0 or len(b) == 0:
            return float("inf")
        worst = max(worst, cKDTree(a).query(b)[0].max(), cKDTree(b).query(a)[0].max())
    return float(worst)


def coarse_to_fine(name: str, inputs: list[str], n: int, ranks: int, out: Path) -> dict:
    from lsurf.engine.formats.surface_file import read_surface
    from lsurf.engine.geometry.levels import default_levels

    grid = ["--x", f"-1:1:{n}", "--y", f"-1:1:{n}"]
    adaptive, full = out / f"{name}_adaptive.h5", out / f"{name}_full.h5"
    budget = int(0.35 * n * n)
    t_adaptive = surface(ranks, [*inputs, *grid, "--budget", str(budget), "--out", str(adaptive), "--overwrite"])
    shutil.copy(adaptive, full)
    t_rest = surface(ranks, [*inputs, *grid, "--out", str(full)])  # resumes: only the points left out
    a, f = read_surface(adaptive), read_surface(full)
    filled = a.view().surface
    row = {"case": name, "grid": f"{n}x{n}", "budget": budget, "computed": int(a.done.sum()), "points": n * n,
           "computed_share": float(a.done.mean()), "seconds_adaptive": t_adaptive,
           "seconds_full_estimate": t_adaptive + t_rest, "same_values": bool(np.array_equal(
               a.values["train_loss"][a.done], f.values["train_loss"][a.done]))}
    for q in [k for k in f.values if k.endswith("_loss")]:
        row[f"shift_cells_{q}"] = contour_shift(f.x, f.y, f.values[q], filled.values[q], default_levels(f.values[q], q))
        row[f"max_abs_error_{q}"] = float(np.nanmax(np.abs(filled.values[q] - f.values[q])))
    return row


def tolerance(name: str, inputs: list[str], n: int, ranks: int, out: Path) -> dict:
    from lsurf.engine.formats.surface_file import read_surface

    full = read_surface(out / f"{name}_full.h5")
    tol = 0.01 * float(np.ptp(full.values["train_loss"]))
    path = out / f"{name}_tolerance.h5"
    seconds = surface(ranks, [*inputs, "--x", f"-1:1:{n}", "--y", f"-1:1:{n}", "--tolerance", f"{tol:.6g}",
                              "--out", str(path), "--overwrite"])
    s = read_surface(path)
    sizes = json.loads(s.attrs["split_sizes"])
    used = sum(float(s.values[f"{k}_samples"].sum()) for k in sizes)
    z = {k: np.abs(s.values[f"{k}_loss"] - full.values[f"{k}_loss"]) / np.maximum(s.values[f"{k}_loss_error"], 1e-300)
         for k in sizes}
    z_all = np.concatenate([v[s.values[f"{k}_samples"] < sizes[k]] for k, v in z.items()])  # exact points: 0 error
    return {"case": name, "tolerance": tol, "samples_share": used / (n * n * sum(sizes.values())),
            "seconds": seconds, "max_error_in_se": float(z_all.max()) if z_all.size else 0.0,
            "points_beyond_3se": int((z_all > 3).sum()), "points_beyond_2se": int((z_all > 2).sum()),
            "points_subsampled": int(z_all.size), "max_abs_error": float(max(np.nanmax(
                np.abs(s.values[f"{k}_loss"] - full.values[f"{k}_loss"])) for k in sizes))}


def figure(out: Path, path: Path) -> None:
    """The README pair: the full grid and the adaptive surface on shared levels, computed points dotted."""
    from lsurf.engine.formats.surface_file import read_surface
    from lsurf.post.compare import plot_comparison

    full, adaptive = read_surface(out / "cnn_full.h5"), read_surface(out / "cnn_adaptive.h5")
    fig = plot_comparison([full, adaptive], "train_loss", kind="contour", size=(11.0, 5.0))
    filled = adaptive.view().surface
    X, Y = np.meshgrid(filled.x, filled.y)
    fig.axes[1].plot(X[filled.computed], Y[filled.computed], ".", color="black", markersize=1.2)
    fig.axes[0].set_title(f"full grid: {full.done.size} points", fontsize=10)
    fig.axes[1].set_title(f"coarse to fine: {int(adaptive.done.sum())} points computed (dots)", fontsize=10)
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="out/bench_adaptive")
    ap.add_argument("--resnet-subset", type=int, default=100)
    ap.add_argument("--figure", help="write the README figure pair here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes in a temporary folder: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.out, args.figure = tmp, str(Path(tmp) / "pair.png")
            measure(args, Path(tmp) / "runs" / "model_1.t7", sides=(17, 17), cnn_subset=64)
    else:
        measure(args, REPO / "out" / "demo" / "runs" / "model_10.t7", sides=(65, 33))


def measure(args: argparse.Namespace, ckpt: Path, sides: tuple[int, int], cnn_subset: int | None = None) -> None:
    """Both cases on ``sides`` grids (the CNN's, ResNet-20's), the CNN trained for ``ckpt``'s epochs
    if not there yet: the rows, the figure if asked for, the JSON line."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    subset = ["--subset", str(cnn_subset)] if cnn_subset else []
    if not ckpt.exists():
        epochs = ckpt.stem.split("_")[-1]
        subprocess.run([sys.executable, "-m", "lsurf", "train", "--model", "cnn", "--data", "digits", *subset,
                        "--epochs", epochs, "--out-dir", str(ckpt.parent)], cwd=REPO, env=ENV, check=True,
                       capture_output=True)
    cnn = ["--model", "cnn", "--data", "digits", *subset, "--checkpoint", str(ckpt), "--split", "train,test",
           "--fidelity", "off"]
    resnet = ["--model", "resnet20", "--checkpoint", str(FIXTURES / "resnet20" / "model_300.t7"),
              "--dir-file", str(FIXTURES / "resnet20" / "directions_weights_filter_biasbn.h5"),
              "--data", f"cifar10:{FIXTURES / 'cifar10-fake'}", "--subset", str(args.resnet_subset),
              "--fidelity", "off"]
    rows = [coarse_to_fine("cnn", cnn, sides[0], args.ranks, out)]
    rows.append(tolerance("cnn", cnn, sides[0], args.ranks, out))
    if FIXTURES.is_dir() and not cnn_subset:  # a smoke: the CNN's rows already run every code path
        rows.append(coarse_to_fine("resnet20", resnet, sides[1], args.ranks, out))
    for row in rows:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.figure:
        figure(out, Path(args.figure))
        print(f"wrote {args.figure}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
