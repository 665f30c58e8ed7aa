"""The VTK file, read back with the official vtk package's XML reader."""

from __future__ import annotations

import numpy as np
import pytest
from inprocess import cli
from test_plot import write_surface

vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402


def dims(g) -> tuple[int, int, int]:
    d = [0, 0, 0]
    g.GetDimensions(d)
    return tuple(d)


def read(path):
    r = vtk.vtkXMLStructuredGridReader()
    r.SetFileName(str(path))
    r.Update()
    g = r.GetOutput()
    pts = vtk_to_numpy(g.GetPoints().GetData())
    data = {g.GetPointData().GetArrayName(k): vtk_to_numpy(g.GetPointData().GetArray(k))
            for k in range(g.GetPointData().GetNumberOfArrays())}
    return g, pts, data


@pytest.fixture
def surface(tmp_path):
    x, y = np.linspace(-1, 1, 5), np.linspace(0, 2, 3)
    X, Y = np.meshgrid(x, y)
    loss = 1 + X**2 + Y
    done = np.ones((3, 5), bool)
    done[2, 4] = False
    return write_surface(tmp_path / "s.h5", x, y, loss, 90 - X, done=done), loss, done


def test_points_bounds_and_values(surface, tmp_path):
    path, loss, done = surface
    cli("vtk", path, "--out", tmp_path / "s.vts", check=True)
    g, pts, data = read(tmp_path / "s.vts")
    assert g.GetNumberOfPoints() == 15 and dims(g) == (5, 3, 1)
    bounds = g.GetBounds()
    assert bounds[:4] == (-1.0, 1.0, 0.0, 2.0)
    np.testing.assert_allclose(data["train_loss"][done.ravel()], loss[done])
    assert np.isnan(data["train_loss"][~done.ravel()]).all()
    np.testing.assert_array_equal(data["done"], done.ravel().astype(float))
    np.testing.assert_allclose(pts[done.ravel(), 2], loss[done])  # height = loss where computed
    np.testing.assert_allclose(pts[:, 0], np.tile(np.linspace(-1, 1, 5), 3))


def test_log_clip_and_interpolation(surface, tmp_path):
    path, loss, done = surface
    cli("vtk", path, "--log", "--zmax", "0.5", "--interp", "3", "--out", tmp_path / "f.vts", check=True)
    g, pts, data = read(tmp_path / "f.vts")
    assert dims(g) == (13, 7, 1)
    assert pts[:, 2].max() <= 0.5
    assert pts[0, 2] == pytest.approx(np.log10(loss[0, 0]))
    fine = data["train_loss"].reshape(7, 13)
    assert fine[0, 1] == pytest.approx(loss[0, 0] + (loss[0, 1] - loss[0, 0]) / 3)  # linear between samples


def test_one_dimensional_file(tmp_path):
    x = np.linspace(0, 1, 4)
    path = write_surface(tmp_path / "c.h5", x, None, 2 + x, 50 + x)
    cli("vtk", path, check=True)
    g, pts, data = read(tmp_path / "c.vts")
    assert dims(g) == (4, 1, 1)
    np.testing.assert_allclose(pts[:, 2], 2 + x)
