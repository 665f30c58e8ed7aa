"""Ensembles of planes (``--planes K``): plane k is the single-plane run with seed s+k, under MPI and
on resume; the spread numbers against values computed here; the band plot's artists."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import lsurf, mpirun, requires_mpi

from lsurf import UserError
from lsurf.engine.formats.surface_file import Surface, read_surface
from lsurf.post.ensemble import basin_radius, summarise, t_interval
from lsurf.post.plot import figures
from lsurf.run.options import Options

RUN = ("--model", "cnn", "--data", "digits", "--subset", "64", "--threads", "1", "--points-per-pass", "1")


@pytest.mark.mpi
@requires_mpi
def test_three_planes_under_two_ranks_equal_three_single_plane_runs(tmp_path, digits_checkpoint):
    grid = ("--x=-1:1:5", "--y=-0.5:0.5:3")
    mpirun(2, "surface", *RUN, *grid, "--checkpoint", digits_checkpoint, "--planes", "3", "--seed", "4",
           "--out", tmp_path / "ens.h5", check=True)
    with h5py.File(tmp_path / "ens.h5") as f:
        assert f["train_loss"].shape == (3, 3, 5) and list(f["plane"][()]) == [0, 1, 2]
        assert [d[0].name for d in f["train_loss"].dims] == ["/plane", "/y", "/x"]  # dimension scales
        ens = {n: f[n][()] for n in ("train_loss", "train_acc", "train_loss_stderr")}
        assert f["done"][()].all()
    assert not (tmp_path / "ens.directions.h5").exists()  # an ensemble's directions come from its seeds
    for k in range(3):
        lsurf("surface", *RUN, *grid, "--checkpoint", digits_checkpoint, "--seed", 4 + k,
              "--out", tmp_path / f"one{k}.h5", check=True)
        one = read_surface(tmp_path / f"one{k}.h5")
        for name, values in ens.items():
            np.testing.assert_allclose(values[k], one.values[name], rtol=0, atol=1e-6)


@pytest.mark.cli
def test_a_curve_ensemble_resumes_per_point(tmp_path, digits_checkpoint):
    args = (*RUN, "--x=-1:1:7", "--checkpoint", digits_checkpoint, "--planes", "2", "--out", tmp_path / "c.h5")
    lsurf("surface", *args, check=True)
    whole = read_surface(tmp_path / "c.h5")
    assert whole.planes == 2 and whole.values["train_loss"].shape == (2, 7)
    with h5py.File(tmp_path / "c.h5", "r+") as f:  # as a killed run leaves it: some points of each plane missing
        for name in ("done", "train_loss", "train_acc"):
            f[name][1, 2:5] = 0 if name == "done" else np.nan
            f[name][0, 6] = 0 if name == "done" else np.nan
    p = lsurf("surface", *args, check=True)
    assert "4 of 14 points to do" in p.stderr
    resumed = read_surface(tmp_path / "c.h5")
    np.testing.assert_array_equal(resumed.values["train_loss"], whole.values["train_loss"])
    # the same file asked for with another number of planes is another run: refused, untouched
    before = (tmp_path / "c.h5").read_bytes()
    p = lsurf("surface", *RUN, "--x=-1:1:7", "--checkpoint", digits_checkpoint, "--planes", "3",
              "--out", tmp_path / "c.h5")
    assert p.returncode != 0 and "another grid" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "c.h5").read_bytes() == before


@pytest.mark.cli
def test_planes_refuse_other_direction_sources(tmp_path):
    with pytest.raises(UserError, match="`planes` 2 draws random planes.*`dir_file`"):
        Options(planes=2, dir_file="d.h5")
    with pytest.raises(UserError, match="`planes` 0: must be at least 1"):
        Options(planes=0)
    p = lsurf("surface", "--planes", "2", "--model2", "b.t7", "--out", tmp_path / "s.h5")
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "planes" in p.stderr and "model2" in p.stderr
    assert not (tmp_path / "s.h5").exists()


def _synthetic(curvatures: list[float], centre: float = 0.5) -> Surface:
    """Quadratic curves z_k(α) = centre + c_k α² on a grid that holds α = 0."""
    x = np.linspace(-1, 1, 21)
    z = np.array([centre + c * x**2 for c in curvatures])
    return Surface("synthetic.h5", x, None, {"train_loss": z}, np.ones_like(z, bool), planes=len(curvatures))


def test_basin_radius_and_spread_against_hand_computation():
    curv = [1.0, 2.0, 4.0, 0.25]
    s = _synthetic(curv)
    summary = summarise(s, radii=(0.5,))
    x = s.x
    # twice the centre's loss: c α² > 0.5 first at the grid point just beyond sqrt(0.5 / c)
    expected = [np.abs(x)[0.5 + c * x**2 > 1.0].min() if (0.5 + c * x**2 > 1.0).any() else np.inf for c in curv]
    np.testing.assert_allclose(summary.basin, expected)
    assert np.isinf(summary.basin[3])  # 0.25 α² never doubles the loss on [-1, 1]
    np.testing.assert_allclose(summary.at_radii[:, 0], [0.5 + c * 0.25 for c in curv])
    np.testing.assert_allclose(summary.centre, 0.5)
    lines = summary.describe()
    assert any(line.startswith("basin radius:") and "beyond the grid (> 1) in 1 of 4 planes" in line for line in lines)
    assert basin_radius(np.abs(x), 0.5 + x**2, threshold=0.74) == pytest.approx(0.5)  # 0.75 > 0.74 at |α| = 0.5
    mean, lo, hi = t_interval(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and hi - mean == pytest.approx(4.302652729749464 / np.sqrt(3))  # t(0.975, 2) · sd / √n


@pytest.mark.cli
def test_info_prints_each_plane_and_the_interval(tmp_path, digits_checkpoint):
    lsurf("surface", *RUN, "--x=-1:1:9", "--checkpoint", digits_checkpoint, "--planes", "3",
          "--out", tmp_path / "e.h5", check=True)
    out = lsurf("info", tmp_path / "e.h5", "--basin-threshold", "0.0", check=True).stdout
    assert "grid:               9 points in each of 3 planes" in out
    assert [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  plane")] == [
        "plane 0 (seed 0)", "plane 1 (seed 1)", "plane 2 (seed 2)"]
    # a threshold below every value: the basin ends at the grid point nearest the centre (distance 0)
    assert "basin radius:       0, 95 % CI [0, 0] across 3 planes (loss above 0)" in out


def test_band_plot_of_a_curve_ensemble_and_mean_over_spread_of_a_plane():
    s = _synthetic([1.0, 2.0, 3.0, 4.0, 5.0])
    fig = figures(s, "train_loss", stem="e")["e_train_loss_ensemble"]
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 6  # five faint planes and the median
    np.testing.assert_allclose(lines[-1].get_ydata(), 0.5 + 3.0 * s.x**2)  # the median plane
    band = ax.collections[0].get_paths()[0].vertices  # 10–90 % band: plane percentiles at each α
    lo = np.percentile(s.values["train_loss"], 10, axis=0)
    assert np.isclose(band[:, 1].min(), lo.min())
    y = np.linspace(-1, 1, 5)
    z = np.stack([np.add.outer(c * y**2, s.x**2) for c in (1.0, 3.0)])
    plane = Surface("p.h5", s.x, y, {"train_loss": z}, np.ones_like(z, bool), planes=2)
    fig = figures(plane, "train_loss", stem="p")["p_train_loss_ensemble"]
    mesh = fig.axes[0].collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(5, 21), np.std(z, axis=0, ddof=1))


def test_single_plane_consumers_refuse_an_ensemble_clearly(tmp_path):
    s = _synthetic([1.0, 2.0])
    with pytest.raises(UserError, match="holds an ensemble of 2 planes; export takes one plane"):
        from lsurf.post.export import export_surface

        export_surface(s, tmp_path / "e.csv", "csv")
    one = s.plane(1)
    assert one.planes is None and np.array_equal(one.values["train_loss"], s.values["train_loss"][1])
    with pytest.raises(UserError, match="`plane` 2: 'synthetic.h5' holds planes 0 to 1"):
        s.plane(2)
