"""Fewer passes for the same picture (#17): coarse-to-fine points and passes stopped early.

The refiner and the fill against closed forms; real runs under 1, 2 and 4 ranks, resumed, plotted
and exported; the stopping rule of ``--tolerance`` recomputed independently with numpy.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import N, lsurf, mpirun, requires_mpi

from lsurf.engine.formats.surface_file import completion, read_surface
from lsurf.engine.geometry.levels import default_levels
from lsurf.engine.geometry.refine import Refiner, coarse_stride, fill, lattice
from lsurf.engine.model.models import load_model
from lsurf.post.info import describe
from lsurf.post.plot import figures

MLP = ["--model", "mlp", "--data", "digits", "--subset", "300", "--split", "train,test", "--dtype", "float64",
       "--x", "-1:1:17", "--y", "-1:1:17", "--batch-size", "100", "--points-per-pass", "1", "--fidelity", "off",
       "--no-progress"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> list:
    """The MLP options with a checkpoint (fixed weights: every run of a test samples one surface)."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.t7"
    torch.manual_seed(0)
    torch.save(load_model("mlp", (1, 8, 8), 10).state_dict(), path)
    return [*MLP, "--checkpoint", path]


def _contour_shift(a: np.ndarray, b: np.ndarray, levels: np.ndarray) -> float:
    """The largest distance (in grid cells) from a contour vertex of one surface to the other's contour
    at the same level: where their contour lines part."""
    import contourpy

    worst = 0.0
    for level in levels[(levels > np.nanmin(a)) & (levels < np.nanmax(a))]:  # not the extremes: single points
        lines = [np.concatenate(contourpy.contour_generator(z=z).lines(level) or [np.empty((0, 2))]) for z in (a, b)]
        if len(lines[0]) == 0 and len(lines[1]) == 0:
            continue
        if len(lines[0]) == 0 or len(lines[1]) == 0:
            return np.inf  # a contour one surface has and the other has not
        d = np.linalg.norm(lines[0][:, None] - lines[1][None], axis=-1)
        worst = max(worst, d.min(1).max(), d.min(0).max())
    return worst


def test_fill_is_exact_for_a_bilinear_surface_from_the_coarse_lattice_alone():
    rows, cols = 23, 37  # not 2^k + 1: the last row and column join the lattices
    j, i = np.mgrid[0:rows, 0:cols].astype(float)
    z = 0.3 + 0.7 * i - 0.2 * j + 0.05 * i * j
    known = np.zeros((rows, cols), bool)
    s = coarse_stride((rows, cols))
    known[np.ix_(lattice(rows, s), lattice(cols, s))] = True
    np.testing.assert_allclose(fill(z, known), z, rtol=0, atol=1e-12)
    z2 = z.copy()
    z2[~known] = 99.0  # values of points not known are never read
    np.testing.assert_allclose(fill(z2, known), z, rtol=0, atol=1e-12)


def _refine(z: np.ndarray, budget: int | None = None, tol: float | None = None) -> np.ndarray:
    refiner, chosen = Refiner(z.shape, budget, tol), np.zeros(z.shape, bool)
    while (mask := refiner.next_round({"train_loss": np.where(chosen, z, np.nan)})) is not None:
        assert not (mask & chosen).any()  # a point is chosen once
        chosen |= mask
    return chosen


def test_refinement_spends_its_points_on_a_narrow_basin_and_keeps_the_contours():
    n = 65
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    z = 2.5 - 2.4 * np.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 0.05) + 0.3 * x  # a sharp well on a tilted plane
    chosen = _refine(z, budget=int(0.35 * n * n))
    assert chosen.sum() <= 0.35 * n * n
    near = (x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.1
    assert chosen[near].mean() > 2 * chosen[~near].mean()  # the basin is sampled far more densely
    shift = _contour_shift(z, fill(z, chosen), default_levels(z, "train_loss"))
    assert shift < 1.0, shift


def test_refine_tol_bounds_the_interpolation_error_of_a_smooth_surface():
    n = 33
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    z = np.exp(1.5 * x) * np.cos(2 * y) + 3
    chosen = _refine(z, tol=1e-3)
    assert chosen.sum() < z.size
    assert np.abs(fill(z, chosen) - z).max() < 1e-3


def test_a_budget_is_never_exceeded_and_the_rounds_are_a_pure_function_of_the_values():
    n = 33
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    z = np.log1p(20 * (x**2 + 0.3 * y**2)) + 0.01
    a, b = _refine(z, budget=200), _refine(z, budget=200)
    assert a.sum() <= 200 and (a == b).all()
    assert (_refine(z, budget=150) <= _refine(z, budget=300)).all()  # a bigger budget only adds points


@pytest.mark.mpi
@requires_mpi
def test_coarse_to_fine_run_is_the_same_under_1_and_4_ranks_and_equals_the_full_grid(mlp, tmp_path):
    lsurf("surface", *mlp, "--out", tmp_path / "full.h5", check=True, timeout=600)
    lsurf("surface", *mlp, "--budget", "110", "--out", tmp_path / "r1.h5", check=True, timeout=600)
    mpirun(4, "surface", *mlp, "--budget", "110", "--out", tmp_path / "r4.h5", check=True, timeout=600)
    full, runs = read_surface(tmp_path / "full.h5"), [read_surface(tmp_path / f"r{k}.h5") for k in (1, 4)]
    for r in runs:
        assert (r.done == runs[0].done).all()
        assert 81 <= r.done.sum() <= 110
        for name in ("train_loss", "test_acc", "test_loss_stderr"):
            np.testing.assert_allclose(r.values[name][r.done], full.values[name][r.done], rtol=1e-12, atol=1e-12)
        assert json.loads(r.attrs["refinement"])["finished"]
        assert completion(r.path) == (int(r.done.sum()),) * 2  # a finished refinement is complete
    info = lsurf("info", tmp_path / "r4.h5", check=True).stdout
    assert f"{int(runs[1].done.sum())} of 289 points computed, the rest interpolated (finished" in info


@pytest.mark.cli
def test_an_interrupted_refinement_resumes_into_the_run_it_would_have_been(mlp, tmp_path):
    lsurf("surface", *mlp, "--budget", "130", "--out", tmp_path / "straight.h5", check=True, timeout=600)
    lsurf("surface", *mlp, "--budget", "95", "--out", tmp_path / "resumed.h5", check=True, timeout=600)
    part = read_surface(tmp_path / "resumed.h5")
    p = lsurf("surface", *mlp, "--budget", "130", "--out", tmp_path / "resumed.h5", check=True, timeout=600)
    assert f"{int(part.done.sum())} of 289 points done" not in p.stderr  # it did resume, not restart
    a, b = read_surface(tmp_path / "straight.h5"), read_surface(tmp_path / "resumed.h5")
    assert part.done.sum() < b.done.sum() and (part.done <= b.done).all()
    assert (a.done == b.done).all()
    np.testing.assert_allclose(a.values["train_loss"][a.done], b.values["train_loss"][b.done], rtol=1e-12)
    # the whole grid on top of it: only the rest is computed
    lsurf("surface", *mlp, "--out", tmp_path / "resumed.h5", check=True, timeout=600)
    assert read_surface(tmp_path / "resumed.h5").done.all()


@pytest.mark.cli
def test_plots_and_vtk_fill_an_adaptive_surface_and_mark_what_was_computed(mlp, tmp_path):
    out = tmp_path / "ad.h5"
    lsurf("surface", *mlp, "--budget", "100", "--out", out, check=True, timeout=600)
    surface = read_surface(out)
    filled = surface.view().surface
    assert filled.done.all() and (filled.computed == surface.done).all()
    np.testing.assert_array_equal(filled.values["train_loss"][surface.done], surface.values["train_loss"][surface.done])
    assert np.isfinite(filled.values["train_loss"]).all()
    p = lsurf("plot", out, "--kind", "contour", "--dots", "--out-dir", tmp_path / "plots", check=True)
    assert "the rest interpolated" in p.stdout and (tmp_path / "plots" / "ad_train_loss_contour.png").exists()
    fig = figures(surface, "train_loss", ("contour",), dots=True)["surface_train_loss_contour"]
    ax = fig.axes[0]
    assert f"{int(surface.done.sum())} of 289 points computed" in ax.get_title()
    assert sum(len(line.get_xdata()) for line in ax.lines) == int(surface.done.sum())  # one dot per computed point
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    lsurf("vtk", out, "--out", tmp_path / "ad.vts", check=True)
    reader = vtk.vtkXMLStructuredGridReader()
    reader.SetFileName(str(tmp_path / "ad.vts"))
    reader.Update()
    data = reader.GetOutput().GetPointData()
    np.testing.assert_array_equal(vtk_to_numpy(data.GetArray("computed")), surface.done.ravel().astype(float))
    np.testing.assert_allclose(vtk_to_numpy(data.GetArray("train_loss")), filled.values["train_loss"].ravel())


def _stops(losses: np.ndarray, batch: int, tol: float, least: int) -> tuple[int, float, float]:
    """Independently: samples used, their mean and the subset standard error, checking after every batch."""
    size = len(losses)
    for n in range(batch, size + batch, batch):
        n = min(n, size)
        seen = losses[:n]
        se = np.sqrt(seen.var(ddof=1) / n * (1 - n / size)) if n < size else 0.0
        if n >= size or (n >= least and se <= tol):
            return n, seen.mean(), se
    raise AssertionError("unreachable")


@pytest.mark.cli
def test_tolerance_stops_each_pass_where_the_standard_error_says_and_not_before(regression, tmp_path):
    out = tmp_path / "tol.h5"
    tol, least, batch = 2.0, 24, 8
    lsurf("surface", "--model", "linear", "--data", "regdata:make", "--checkpoint", tmp_path / "lin.pt",
          "--loss", "mse", "--dtype", "float64", "--ignore", "none", "--seed", "5", "--x", "-2:2:9",
          "--batch-size", str(batch), "--tolerance", str(tol), "--min-samples", str(least), "--out", out,
          "--no-progress", env={"PYTHONPATH": str(tmp_path)}, check=True)
    s = read_surface(out)
    with h5py.File(tmp_path / "tol.directions.h5") as f:
        dx = [f["xdirection"][k][()] for k in ("0", "1")]
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5)).numpy()  # the seed's sample order
    x, y = regression["x"][order], regression["y"][order]
    used = []
    for k, a in enumerate(s.x):
        w, b = regression["w0"] + a * dx[0], regression["b0"] + a * dx[1]
        n, mean, se = _stops((x @ w.T + b - y[:, None]).ravel() ** 2, batch, tol, least)
        assert s.values["train_samples"][k] == n
        assert s.values["train_loss"][k] == pytest.approx(mean, rel=1e-10)
        assert s.values["train_loss_error"][k] == pytest.approx(se, rel=1e-8, abs=1e-12)
        used.append(n)
    assert min(used) < 0.6 * N and max(used) > 1.5 * min(used)  # the near points settle early, the far ones late
    assert json.loads(s.attrs["split_sizes"]) == {"train": N}
    assert "samples:" in "\n".join(describe(s))
