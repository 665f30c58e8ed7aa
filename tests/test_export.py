"""Export to Li et al.'s layout (read back by lsurf's reader of that layout, checked against the layout
rules of ../shared/fixtures/README.md), to OBJ meshes and CSV; atomic writes."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FIXTURES, requires_fixtures
from inprocess import cli
from test_plot import write_surface

from lsurf.engine.formats.surface_file import read_surface
from lsurf.errors import UserError
from lsurf.post import export
from lsurf.post.export import export_surface


@pytest.fixture
def partial(tmp_path):
    """Non-square (nx=5, ny=3), partially done, values that say where they sit: 10·i + j."""
    x, y = np.linspace(-1, 1, 5), np.linspace(0, 0.5, 3)
    i, j = np.meshgrid(np.arange(5), np.arange(3))
    done = np.ones((3, 5), bool)
    done[2, 3:] = False
    done[0, 0] = False
    path = write_surface(tmp_path / "part.h5", x, y, 10.0 * i + j + 0.5, 50.0 + i - j, done=done,
                         attrs={"model": "cnn", "dir_file": "dirs.h5"})
    return read_surface(path)


def test_ll_non_square_rereads_equal_and_follows_the_layout(partial, tmp_path):
    out = export_surface(partial, tmp_path / "ll.h5", "ll")
    nx, ny = len(partial.x), len(partial.y)
    with h5py.File(out, "r") as f:
        assert set(f) == {"xcoordinates", "ycoordinates", "dir_file", "train_loss", "train_acc", "test_loss",
                          "test_acc"}
        assert f["dir_file"][()].decode() == "dirs.h5"
        raw = f["train_loss"][()]
        assert raw.shape == (nx, ny) and raw.dtype == np.float64
        np.testing.assert_array_equal(f["xcoordinates"][()], partial.x)
        np.testing.assert_array_equal(f["ycoordinates"][()], partial.y)
    flat = raw.ravel()
    for j in range(ny):
        for i in range(nx):
            expect = 10.0 * i + j + 0.5 if partial.done[j, i] else -1.0
            assert flat[j * nx + i] == expect, (i, j)
    back = read_surface(out)
    assert back.reference and back.y is not None
    np.testing.assert_array_equal(back.x, partial.x)
    np.testing.assert_array_equal(back.y, partial.y)
    np.testing.assert_array_equal(back.done, partial.done)
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_array_equal(back.values[name], np.where(partial.done, partial.values[name], np.nan))
    assert back.attrs["dir_file"] == "dirs.h5"


@requires_fixtures
def test_ll_of_the_reference_fixture_round_trips(tmp_path):
    ref = read_surface(FIXTURES / "resnet20" / "surface_11x11.h5")
    out = export_surface(ref, tmp_path / "again.h5", "ll")
    with h5py.File(FIXTURES / "resnet20" / "surface_11x11.h5", "r") as a, h5py.File(out, "r") as b:
        for name in ("xcoordinates", "ycoordinates", "train_loss", "train_acc"):
            np.testing.assert_array_equal(a[name][()], b[name][()])
        assert a["dir_file"][()] == b["dir_file"][()]


def test_ll_of_a_curve(tmp_path):
    x = np.linspace(0, 1, 6)
    done = np.array([1, 1, 1, 0, 1, 0], bool)
    src = read_surface(write_surface(tmp_path / "c.h5", x, None, x + 1, 90 + x, done=done))
    out = export_surface(src, tmp_path / "c_ll.h5", "ll")
    with h5py.File(out, "r") as f:
        assert "ycoordinates" not in f and f["train_loss"].shape == (6,)
        np.testing.assert_array_equal(f["train_loss"][()], np.where(done, x + 1, -1))
        assert f["dir_file"][()].decode() == ""
    back = read_surface(out)
    assert back.y is None
    np.testing.assert_array_equal(back.values["train_acc"], np.where(done, 90 + x, np.nan))


def _obj(path):
    lines = path.read_text().splitlines()
    verts = np.array([[float(t) for t in ln.split()[1:]] for ln in lines if ln.startswith("v ")])
    faces = np.array([[int(t) for t in ln.split()[1:]] for ln in lines if ln.startswith("f ")])
    return verts, faces


def test_obj_mesh_skips_cells_around_a_missing_point(tmp_path):
    x, y = np.linspace(0, 3, 4), np.linspace(0, 2, 3)  # 4 x 3 points, 3 x 2 cells
    X, Y = np.meshgrid(x, y)
    done = np.ones((3, 4), bool)
    done[1, 1] = False  # an inner point: four cells touch it
    src = read_surface(write_surface(tmp_path / "m.h5", x, y, 1 + X + 10 * Y, 0 * X, done=done))
    verts, faces = _obj(export_surface(src, tmp_path / "m.obj", "obj"))
    assert verts.shape == (12, 3)
    assert faces.shape == (2 * (6 - 4), 3)
    assert faces.min() >= 1 and faces.max() <= 12
    assert 1 * 4 + 1 + 1 not in faces  # the missing point (j=1, i=1) is no face's corner
    np.testing.assert_array_equal(verts[:, 0], X.ravel())
    np.testing.assert_array_equal(verts[:, 1], Y.ravel())
    ok = done.ravel()
    np.testing.assert_allclose(verts[ok, 2], (1 + X + 10 * Y).ravel()[ok])
    # every face is a real triangle of neighbouring grid points, counter-clockwise seen from above
    a, b, c = (verts[faces[:, k] - 1] for k in range(3))
    assert (np.cross(b - a, c - a)[:, 2] > 0).all()
    verts_log, _ = _obj(export_surface(src, tmp_path / "log.obj", "obj", log=True))
    np.testing.assert_allclose(verts_log[ok, 2], np.log10((1 + X + 10 * Y).ravel()[ok]))
    _, acc_faces = _obj(export_surface(src, tmp_path / "acc.obj", "obj", quantity="train_acc"))
    assert len(acc_faces) == 4


def test_csv_rows_and_values(partial, tmp_path):
    out = export_surface(partial, tmp_path / "p.csv", "csv")
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["x", "y", "train_loss", "train_acc", "test_loss", "test_acc", "done"]
    assert len(rows) == 1 + 15
    nx = len(partial.x)
    for j in range(len(partial.y)):
        for i in range(nx):
            row = rows[1 + j * nx + i]
            assert float(row[0]) == partial.x[i] and float(row[1]) == partial.y[j]
            if partial.done[j, i]:
                assert float(row[2]) == 10.0 * i + j + 0.5 and float(row[3]) == 50.0 + i - j
                assert row[-1] == "1"
            else:
                assert row[2:6] == ["", "", "", ""] and row[-1] == "0"
    x = np.linspace(0, 1, 4)
    line = read_surface(write_surface(tmp_path / "l.h5", x, None, x, x))
    rows = list(csv.reader(open(export_surface(line, tmp_path / "l.csv", "csv"), newline="")))
    assert rows[0][:2] == ["x", "train_loss"] and len(rows) == 5


def test_refusals(partial, tmp_path):
    line = read_surface(write_surface(tmp_path / "l.h5", np.linspace(0, 1, 3), None, np.ones(3), np.ones(3)))
    with pytest.raises(UserError, match="`fmt` 'obj' needs a 2-D surface"):
        export_surface(line, tmp_path / "l.obj", "obj")
    with pytest.raises(UserError, match="`fmt` 'vtk'"):
        export_surface(partial, tmp_path / "p.vtk", "vtk")
    with pytest.raises(UserError, match="`path`: folder"):
        export_surface(partial, tmp_path / "missing" / "p.csv", "csv")
    with pytest.raises(UserError, match="`path` .* is the source file itself"):
        export_surface(partial, partial.path, "ll")
    with pytest.raises(UserError, match="`quantity`"):
        export_surface(partial, tmp_path / "p.obj", "obj", quantity="val_loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.h5", "part.h5"]


def test_failed_write_keeps_the_existing_file_and_leaves_no_tmp(partial, tmp_path, monkeypatch):
    target = tmp_path / "p.csv"
    target.write_text("precious\n")

    def broken(surface, tmp):
        tmp.write_text("half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_csv", broken)
    with pytest.raises(UserError, match="cannot write `path` .*No space left on device"):
        export_surface(partial, target, "csv")
    assert target.read_text() == "precious\n"
    assert not (tmp_path / "p.csv.tmp").exists()
    monkeypatch.undo()
    export_surface(partial, target, "csv")  # and a good write replaces it
    assert target.read_text().startswith("x,y,")


def test_cli_export_writes_beside_the_source_and_rereads(partial, tmp_path):
    src = partial.path
    p = cli("export", src, "--format", "ll", check=True)
    out = Path(src).with_name(Path(src).stem + "_ll.h5")
    assert str(out) in p.stdout
    back, orig = read_surface(out), read_surface(src)
    np.testing.assert_array_equal(back.values["train_loss"], np.where(orig.done, orig.values["train_loss"], np.nan))
    p = cli("export", src, "--format", "obj", "--out", tmp_path / "nowhere" / "m.obj")
    assert p.returncode == 2 and "does not exist" in p.stderr
