"""Surface.view: a file resolved once (kind, named axes, values filled, the one-plane refusal)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from lsurf.engine.formats.surface_file import CURVE, CURVES, GRID, PLANE, PLANES, create, read_surface
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.geometry.refine import fill
from lsurf.errors import UserError


def written(path, grid: Grid, done: np.ndarray, attrs: dict | None = None):
    """A real file through create(): a bowl where ``done``, NaN elsewhere; read back."""
    create(path, grid, ["train_loss", "test_acc"], {}, attrs or {})
    loss = 0.5 + np.broadcast_to(grid.x, grid.shape) ** 2
    if grid.y is not None:
        loss = loss + 2 * np.broadcast_to(grid.y[:, None], grid.shape) ** 2
    with h5py.File(path, "r+") as f:
        f["train_loss"][...] = np.where(done, loss, np.nan)
        f["test_acc"][...] = np.where(done, 100 - loss, np.nan)
        f["done"][...] = done.astype(np.uint8)
    return read_surface(path)


def test_a_curve_is_one_named_axis_and_itself(tmp_path):
    x = np.linspace(-1, 1, 7)
    s = written(tmp_path / "c.h5", Grid(x), np.ones(7, bool))
    view = s.view("export")
    assert view.kind == CURVE and [a.name for a in view.axes] == ["x"]
    np.testing.assert_array_equal(view.x, x)
    assert view.surface is s and view.source is s and view.computed is None and view.planes is None


def test_a_refined_plane_is_filled_by_its_interpolation_and_keeps_what_was_measured(tmp_path):
    x, y = np.linspace(-1, 1, 9), np.linspace(-2, 2, 9)
    done = np.zeros((9, 9), bool)
    done[::2, ::2] = done[3, 3] = True  # the coarse lattice, and one point a finer round measured
    ref = json.dumps({"finished": True, "rounds": 2, "budget": int(done.sum()), "refine_tol": 0.01})
    s = written(tmp_path / "r.h5", Grid(x, y), done, {"refinement": ref})
    view = s.view("VTK")
    assert view.kind == PLANE and [a.name for a in view.axes] == ["x", "y"]
    np.testing.assert_array_equal(view.y, y)
    for name, stored in s.values.items():
        np.testing.assert_array_equal(view.values[name], fill(stored, done))
    np.testing.assert_array_equal(view.computed, done)
    assert view.done.all() and view.source is s
    assert view.surface.view().surface is view.surface  # filled once: a view of it fills nothing again


def test_fill_draws_an_unfinished_grid_whole_only_when_asked(tmp_path):
    x = np.linspace(-1, 1, 9)
    done = np.zeros((9, 9), bool)
    done[::2, ::2] = True
    s = written(tmp_path / "u.h5", Grid(x, x), done)
    assert s.view().surface is s
    filled = s.view(fill=True)
    np.testing.assert_array_equal(filled.values["train_loss"], fill(s.values["train_loss"], done))
    assert filled.done.all() and int(filled.computed.sum()) == 25


def test_an_ensemble_is_refused_where_one_plane_is_needed(tmp_path):
    x, y = np.linspace(-1, 1, 5), np.linspace(-1, 1, 3)
    planes = written(tmp_path / "e.h5", Grid(x, y, 4), np.ones((4, 3, 5), bool))
    curves = written(tmp_path / "k.h5", Grid(x, None, 2), np.ones((2, 5), bool))
    assert planes.view().kind == PLANES and curves.view().kind == CURVES and planes.view().planes == 4
    assert planes.view("a picture", ensembles=True).kind == PLANES
    assert planes.view(fill=True).surface is planes  # an ensemble's draws are never interpolated
    with pytest.raises(UserError) as e:
        planes.view("export")
    assert str(e.value) == (f"{str(tmp_path / 'e.h5')!r} holds an ensemble of 4 planes; export takes one plane: "
                            "`lsurf plot` draws the ensemble, Surface.plane(k) picks one")


def test_a_three_axis_grid_names_its_axes_and_is_refused_until_sliced(tmp_path):
    x, y, z = np.linspace(-1, 1, 5), np.linspace(0, 1, 3), np.array([0.0, 0.5, 2.0])
    s = written(tmp_path / "g.h5", Grid(x, y, z=z), np.ones((3, 3, 5), bool), {"axis_names": '["a", "b", "c"]'})
    view = s.view()
    assert view.kind == GRID and [a.name for a in view.axes] == ["a", "b", "c"]
    for axis, coords in zip(view.axes, (x, y, z)):
        np.testing.assert_array_equal(axis.coords, coords)
    assert [a.name for a in view.plane_axes] == ["a", "b"]
    for use in ("a picture", "export"):
        with pytest.raises(UserError, match=rf"holds a grid of three axes \(a, b, c\); {use} takes one plane: "
                                            r"pick one with `slice` c=VALUE"):
            s.view(use, ensembles=True)
    with pytest.raises(UserError, match="holds a grid of three axes"):
        s.plane(1).view("export")  # one plane taken out by index still names three axes: refused, as before
    cut = s.slice("c=0.4").view("export")
    assert cut.kind == PLANE and [a.name for a in cut.axes] == ["a", "b"]
    np.testing.assert_array_equal(cut.values["train_loss"], s.values["train_loss"][1])
