"""Plots from small files with known values: every kind, partial files, Li et al.'s layout, overlays."""

from __future__ import annotations

import h5py
import matplotlib
import numpy as np
import pytest
from inprocess import cli

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402

from lsurf.engine.formats.surface_file import TileWriter, create, read_surface  # noqa: E402
from lsurf.engine.geometry.grid import Grid, Tile  # noqa: E402
from lsurf.engine.geometry.levels import color_range  # noqa: E402
from lsurf.post.plot import plot_curve, plot_surface  # noqa: E402


def write_surface(path, x, y, loss, acc, done=None, attrs=None):
    """A real lsurf file (through the writer) holding the given arrays."""
    grid = Grid(np.asarray(x, float), None if y is None else np.asarray(y, float))
    create(path, grid, ["train_loss", "train_acc", "test_loss", "test_acc"], {}, attrs or {})
    w = TileWriter(path, grid)
    done = np.ones(grid.shape, bool) if done is None else done
    for j in range(1 if y is None else len(y)):
        for i in range(len(x)):
            if (done[i] if y is None else done[j, i]):
                t = Tile(0, j, j + 1, i, i + 1)
                vals = {"train_loss": loss[..., j, i] if y is not None else loss[i],
                        "train_acc": acc[..., j, i] if y is not None else acc[i]}
                vals["test_loss"], vals["test_acc"] = vals["train_loss"] * 1.1, vals["train_acc"] - 1
                w.write(t, {k: np.full((1, 1) if y is not None else (1,), v) for k, v in vals.items()})
    w.close()
    return path


@pytest.fixture
def bowl(tmp_path):
    x, y = np.linspace(-1, 1, 9), np.linspace(-1, 1, 7)
    X, Y = np.meshgrid(x, y)
    return write_surface(tmp_path / "bowl.h5", x, y, 0.1 + X**2 + 2 * Y**2, 100 - 30 * (X**2 + Y**2),
                         attrs={"model": "cnn", "data": "digits", "directions": '{"norm": "filter"}'})


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap", "surface3d"])
def test_each_kind_writes_a_picture_of_the_requested_size(kind, bowl, tmp_path):
    p = cli("plot", bowl, "--kind", kind, "--size", "4x3", "--dpi", "50", "--out-dir", tmp_path / "out", check=True)
    assert "coverage: 63/63 points" in p.stdout
    img = mpimg.imread(tmp_path / "out" / f"bowl_train_loss_{kind}.png")
    assert img.shape[:2] == (150, 200)
    assert img[..., :3].std() > 0.05  # not blank


def test_title_and_labels_from_provenance(bowl):
    fig = plot_surface(read_surface(bowl), "train_loss", "filled")
    ax = fig.axes[0]
    assert "cnn on digits" in ax.get_title() and "filter" in ax.get_title()
    assert ax.get_xlabel() == "α" and ax.get_ylabel() == "β"


def test_partial_file_is_masked(tmp_path):
    x, y = np.linspace(0, 1, 6), np.linspace(0, 1, 4)
    X, Y = np.meshgrid(x, y)
    done = np.zeros((4, 6), bool)
    done[:2] = True
    path = write_surface(tmp_path / "part.h5", x, y, 1 + X, 50 + Y, done=done)
    p = cli("plot", path, "--kind", "heatmap", "--out-dir", tmp_path, check=True)
    assert "coverage: 12/24 points" in p.stdout
    mesh = next(c for c in plot_surface(read_surface(path), kind="heatmap").axes[0].collections
                if isinstance(c, QuadMesh))
    arr = np.ma.asarray(mesh.get_array()).reshape(4, 6)
    assert arr.mask[2:].all() and not arr.mask[:2].any()


def test_reference_layout_non_square_keeps_orientation(tmp_path):
    """A surface rising only along x, stored as Li et al.'s code stores it, rises along the plot's x axis."""
    x, y = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 4)
    flat = np.empty(len(x) * len(y))
    for iy in range(len(y)):
        for ix in range(len(x)):
            flat[iy * len(x) + ix] = 2.0 + x[ix]  # their loop: flat index iy*nx + ix holds (x[ix], y[iy])
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        f["xcoordinates"], f["ycoordinates"] = x, y
        f["train_loss"] = flat.reshape(len(x), len(y))  # allocated (nx, ny)
        f["train_acc"] = np.full((len(x), len(y)), -1.0)  # not computed
    s = read_surface(tmp_path / "ref.h5")
    assert s.reference and s.values["train_loss"].shape == (4, 7)
    mesh = next(c for c in plot_surface(s, kind="heatmap").axes[0].collections if isinstance(c, QuadMesh))
    edges = mesh.get_coordinates()  # cell corners: (ny + 1, nx + 1, 2)
    centre_x = (edges[:-1, :-1, 0] + edges[1:, 1:, 0]) / 2
    values = np.asarray(mesh.get_array()).reshape(centre_x.shape)
    np.testing.assert_allclose(values, 2.0 + centre_x)  # a function of the plot's x alone
    assert (np.diff(values, axis=1) > 0).all() and (np.diff(values, axis=0) == 0).all()
    cli("plot", tmp_path / "ref.h5", "--kind", "filled", "--out-dir", tmp_path, check=True)


def test_robust_color_range_ignores_an_exploding_corner():
    z = np.full((10, 10), 1.0) + np.linspace(0, 1, 100).reshape(10, 10)
    z[0, 0] = 1e6
    lo, hi = color_range(z, None, None, log=False)
    assert lo == z[z < 1e5].min() and hi < 3
    assert color_range(z, None, 5.0, log=False)[1] == 5.0


def test_one_dimensional_curve_on_twin_axes(tmp_path):
    x = np.linspace(-1, 2, 13)
    path = write_surface(tmp_path / "line.h5", x, None, 1 + (x - 1) ** 2, 90 - 10 * abs(x - 1),
                         attrs={"markers": '[{"label": "model 1", "x": 0.0}, {"label": "model 2", "x": 1.0}]'})
    fig = plot_curve(read_surface(path))
    loss_ax, acc_ax = fig.axes[0], fig.axes[1]
    labels = {ln.get_label() for ln in loss_ax.lines} | {ln.get_label() for ln in acc_ax.lines}
    assert {"train loss", "test loss", "train accuracy", "test accuracy"} <= labels
    train = next(ln for ln in loss_ax.lines if ln.get_label() == "train loss")
    np.testing.assert_allclose(train.get_ydata(), 1 + (x - 1) ** 2)
    assert sorted(ln.get_xdata()[0] for ln in loss_ax.lines if ln.get_label().startswith("_")) == [0.0, 1.0]
    p = cli("plot", path, "--out-dir", tmp_path, check=True)
    assert "line_curve.png" in p.stdout


def test_trajectory_and_markers_are_drawn(bowl, tmp_path):
    with h5py.File(tmp_path / "proj.h5", "w") as f:
        f["proj_x"], f["proj_y"] = np.array([0.8, 0.4, 0.1, 0.0]), np.array([0.5, 0.2, 0.05, 0.0])
        f.attrs["explained_variance"] = [0.931, 0.042]
    from lsurf.post.plot import read_projection

    s = read_surface(bowl)
    s.attrs["markers"] = '[{"label": "model 3", "x": 0.0, "y": 1.0}]'
    fig = plot_surface(s, kind="contour", projection=read_projection(tmp_path / "proj.h5"))
    ax = fig.axes[0]
    path = next(ln for ln in ax.lines if ln.get_label() == "training path")
    np.testing.assert_allclose(path.get_xdata(), [0.8, 0.4, 0.1, 0.0])
    assert ax.get_xlabel() == "α: PC1 (93.1 %)" and ax.get_ylabel() == "β: PC2 (4.2 %)"
    assert any(t.get_text() == "model 3" for t in ax.texts)


def test_bad_plot_input(bowl, tmp_path):
    p = cli("plot", bowl, "--quantity", "val_loss")
    assert p.returncode == 2 and "'val_loss'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli("plot", tmp_path / "missing.h5")
    assert p.returncode == 2 and "does not exist" in p.stderr
