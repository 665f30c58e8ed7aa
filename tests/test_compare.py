"""Comparison figures: shared levels, colour limits and axes read back from the matplotlib artists;
differences and ratios; refusals; 1-D overlays."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from inprocess import cli
from matplotlib.collections import QuadMesh
from matplotlib.contour import QuadContourSet
from test_plot import write_surface

from lsurf.engine.formats.surface_file import read_surface
from lsurf.engine.geometry.levels import color_range
from lsurf.errors import UserError
from lsurf.post.compare import plot_comparison


def _bowl(path, seed, x=None, y=None, scale=1.0, done=None):
    """A surface as two runs with different direction seeds give: same minimum, other curvatures."""
    x = np.linspace(-1, 1, 9) if x is None else x
    y = np.linspace(-1, 1, 7) if y is None else y
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.5, 4, size=2) * scale
    X, Y = np.meshgrid(x, y)
    attrs = {"model": "cnn", "data": "digits", "directions": json.dumps({"seed": seed, "norm": "filter"})}
    return read_surface(write_surface(path, x, y, 0.1 + cx * X**2 + cy * Y**2, 100 - 10 * (X**2 + Y**2),
                                      done=done, attrs=attrs))


@pytest.fixture
def two(tmp_path):
    return [_bowl(tmp_path / "seed0.h5", 0), _bowl(tmp_path / "seed1.h5", 1, scale=3.0)]


def _artists(fig, kind=QuadContourSet):
    """The panels' artists (the colour bar draws a QuadMesh of its own)."""
    return [a for ax in fig.axes if ax.get_label() != "<colorbar>" for a in ax.collections if isinstance(a, kind)]


def test_two_panels_share_levels_and_colour_limits(two):
    z0, z1 = (np.where(s.done, s.values["train_loss"], np.nan) for s in two)
    assert color_range(z0, None, None, False) != color_range(z1, None, None, False)  # alone they would differ
    fig = plot_comparison(two, "train_loss", kind="filled", levels=15)
    sets = _artists(fig)
    assert len(sets) == 2
    np.testing.assert_array_equal(sets[0].levels, sets[1].levels)
    assert len(sets[0].levels) == 15
    assert (sets[0].norm.vmin, sets[0].norm.vmax) == (sets[1].norm.vmin, sets[1].norm.vmax)
    lo, hi = color_range(np.concatenate([z0.ravel(), z1.ravel()]), None, None, False)
    assert sets[0].norm.vmin == pytest.approx(lo) and sets[0].norm.vmax == pytest.approx(hi)
    assert sets[0].levels[0] == pytest.approx(lo) and sets[0].levels[-1] == pytest.approx(hi)
    assert sets[0].colorbar is not None and sets[1].colorbar is None  # one colour bar serves both


@pytest.mark.parametrize("kind", ["contour", "heatmap"])
def test_other_kinds_share_the_norm(two, kind):
    fig = plot_comparison(two, kind=kind)
    arts = _artists(fig, QuadMesh if kind == "heatmap" else QuadContourSet)
    assert len(arts) == 2
    assert arts[0].norm.vmin == arts[1].norm.vmin and arts[0].norm.vmax == arts[1].norm.vmax


def test_shared_axes_one_colour_bar_and_titles_from_provenance(two):
    fig = plot_comparison(two)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and len(fig.axes) == 3  # two panels and one colour bar
    assert all(isinstance(ax.collections[0], QuadContourSet) for ax in panels)
    assert panels[0].get_shared_x_axes().joined(panels[0], panels[1])
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[1])
    assert panels[0].get_xlim() == panels[1].get_xlim()
    assert "seed0" in panels[0].get_title() and "seed 0" in panels[0].get_title()
    assert "seed1" in panels[1].get_title() and "seed 1" in panels[1].get_title()
    assert "cnn on digits" in panels[1].get_title()


def test_more_than_three_surfaces_make_a_grid_of_panels(tmp_path):
    surfaces = [_bowl(tmp_path / f"s{k}.h5", k) for k in range(4)]
    fig = plot_comparison(surfaces)
    sets = _artists(fig)
    assert len(sets) == 4
    assert all(np.array_equal(s.levels, sets[0].levels) for s in sets)
    geometry = {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes if ax.get_subplotspec()}
    assert (2, 2) in geometry


def test_difference_and_ratio_values(two):
    z0, z1 = (np.where(s.done, s.values["train_loss"], np.nan) for s in two)
    for diff, expect in (("difference", z1 - z0), ("ratio", z1 / z0)):
        fig = plot_comparison(two, diff=diff, kind="heatmap", vmin=-100 if diff == "difference" else 0.01, vmax=100)
        (mesh,) = _artists(fig, QuadMesh)
        np.testing.assert_allclose(np.ma.asarray(mesh.get_array()).reshape(z0.shape), expect)
        assert "seed1 − seed0" in fig.axes[0].get_title() or "seed1 / seed0" in fig.axes[0].get_title()
    (cs,) = _artists(plot_comparison(two, diff="difference"))
    assert cs.norm.vmin == pytest.approx(-cs.norm.vmax)  # diverging scale centred on zero


def test_diff_refuses_other_grids(tmp_path):
    a = _bowl(tmp_path / "a.h5", 0)
    b = _bowl(tmp_path / "b.h5", 1, x=np.linspace(-2, 2, 9))
    with pytest.raises(UserError, match=r"`diff` needs surfaces on the same grid: a has x -1:1:9, y -1:1:7, "
                                        r"b has x -2:2:9, y -1:1:7"):
        plot_comparison([a, b], diff="difference")
    c = _bowl(tmp_path / "c.h5", 2, x=np.array([-1, -0.9, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1]))
    with pytest.raises(UserError, match="other coordinates"):
        plot_comparison([a, c], diff="ratio")
    plot_comparison([a, b])  # side by side is fine on different grids


def test_partial_files_are_masked(tmp_path):
    done = np.zeros((7, 9), bool)
    done[:3] = True
    a, b = _bowl(tmp_path / "a.h5", 0, done=done), _bowl(tmp_path / "b.h5", 1)
    (m0, m1) = _artists(plot_comparison([a, b], kind="heatmap"), QuadMesh)
    assert np.ma.getmaskarray(m0.get_array()).reshape(7, 9)[3:].all()
    assert not np.ma.getmaskarray(m1.get_array()).any()


def test_curves_overlay_in_one_axes_with_a_legend(tmp_path):
    x = np.linspace(-1, 1, 11)
    paths = [write_surface(tmp_path / f"line{k}.h5", x, None, 0.1 + (k + 1) * x**2, 100 - x**2,
                           attrs={"model": "mlp", "directions": json.dumps({"seed": k})}) for k in range(3)]
    fig = plot_comparison([read_surface(p) for p in paths])
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["line0 (mlp, seed 0)", "line1 (mlp, seed 1)", "line2 (mlp, seed 2)"]
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), 0.1 + 3 * x**2)
    diff = plot_comparison([read_surface(p) for p in paths], diff="difference")
    np.testing.assert_allclose(diff.axes[0].get_lines()[0].get_ydata(), x**2)


def test_refusals_name_the_parameter(tmp_path, two):
    line = read_surface(write_surface(tmp_path / "line.h5", np.linspace(0, 1, 5), None, np.ones(5), np.ones(5)))
    with pytest.raises(UserError, match="`surfaces` mixes 1-D and 2-D"):
        plot_comparison([two[0], line])
    with pytest.raises(UserError, match="`kind`"):
        plot_comparison(two, kind="pie")
    with pytest.raises(UserError, match="`diff`"):
        plot_comparison(two, diff="sum")
    with pytest.raises(UserError, match="`diff` needs at least two"):
        plot_comparison(two[:1], diff="ratio")
    with pytest.raises(UserError, match="`quantity`.*no quantity 'val_loss'"):
        plot_comparison(two, "val_loss")
    with pytest.raises(UserError, match="`surfaces` is empty"):
        plot_comparison([])


def test_library_figure_leaves_pyplot_and_backend_alone(two, tmp_path):
    import matplotlib.pyplot as plt

    backend, before = matplotlib.get_backend(), plt.get_fignums()
    fig = plot_comparison(two)
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend
    fig.savefig(tmp_path / "cmp.png", dpi=50)
    img = matplotlib.image.imread(tmp_path / "cmp.png")
    assert img[..., :3].std() > 0.05


def test_cli_compares_files_and_writes_the_page(two, tmp_path):
    """``lsurf plot A B`` draws one comparison figure; ``--diff`` and ``--html`` through the real CLI;
    a difference of files on other grids ends in one line and exit 2."""
    a, b = two[0].path, two[1].path
    p = cli("plot", a, b, "--kind", "contour", "--out-dir", tmp_path / "figs", check=True)
    assert (tmp_path / "figs" / "compare_train_loss.png").stat().st_size > 10_000, p.stdout
    p = cli("plot", a, b, "--diff", "difference", "--out-dir", tmp_path / "figs", check=True)
    assert (tmp_path / "figs" / "compare_train_loss_difference.png").is_file()
    other = _bowl(tmp_path / "other.h5", 2, x=np.linspace(-2, 2, 9)).path
    p = cli("plot", a, other, "--diff", "ratio", "--out-dir", tmp_path / "figs")
    assert p.returncode == 2 and "--diff" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    pytest.importorskip("plotly")
    cli("plot", a, "--html", "--kind", "filled", "--out-dir", tmp_path / "page", check=True)
    assert (tmp_path / "page" / "seed0.html").stat().st_size > 1_000_000  # plotly's JavaScript inlined
