"""A linear model under MSE has an exactly quadratic surface: every grid point against numpy, float64."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import D, N, lsurf, mpirun, requires_mpi

import lsurf as api


def closed_form(r, dirs_x, dirs_y, xs, ys):
    """L(α, β) = mean_n ((W0 + αDW1 + βDW2)·x_n + (b0 + αdb1 + βdb2) − y_n)², as (ny, nx)."""
    out = np.empty((len(ys), len(xs)))
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            w = r["w0"] + a * dirs_x[0] + b * dirs_y[0]
            bias = r["b0"] + a * dirs_x[1] + b * dirs_y[1]
            out[j, i] = np.mean((r["x"] @ w.T + bias - r["y"][:, None]) ** 2)
    return out


@pytest.mark.cli
def test_quadratic_surface_via_cli(regression, tmp_path):
    out = tmp_path / "quad.h5"
    lsurf("surface", "--model", "linear", "--data", "regdata:make", "--checkpoint", tmp_path / "lin.pt",
          "--loss", "mse", "--dtype", "float64", "--ignore", "none", "--seed", "3",
          "--x", "-2:1.5:8", "--y", "-1:2:5", "--out", out, "--no-progress",
          env={"PYTHONPATH": f"{tmp_path}:{api.__path__[0]}/.."}, check=True)
    with h5py.File(tmp_path / "quad.directions.h5") as f:
        dx = [f["xdirection"][k][()] for k in ("0", "1")]
        dy = [f["ydirection"][k][()] for k in ("0", "1")]
        assert f["xdirection"]["0"].dtype == np.float64
    # ignore=none: the bias direction equals the bias itself; filter norm: row norm of W0.
    np.testing.assert_array_equal(dx[1], regression["b0"])
    # rtol 1e-9: Li et al.'s rule scales by |w| / (|d| + 1e-10)
    np.testing.assert_allclose(np.linalg.norm(dx[0]), np.linalg.norm(regression["w0"]), rtol=1e-9)
    with h5py.File(out) as f:
        xs, ys, loss = f["xcoordinates"][()], f["ycoordinates"][()], f["train_loss"][()]
        acc, done = f["train_acc"][()], f["done"][()]
    np.testing.assert_array_equal(xs, np.linspace(-2, 1.5, 8))
    np.testing.assert_array_equal(ys, np.linspace(-1, 2, 5))
    assert loss.shape == (5, 8) and done.all()
    np.testing.assert_allclose(loss, closed_form(regression, dx, dy, xs, ys), rtol=1e-10, atol=1e-10)
    assert np.isnan(acc).all()  # regression: accuracy is NaN, not an error


def test_quadratic_surface_via_api(regression, tmp_path):
    data = api.load_data("regdata:make")
    model = api.load_model("linear", (D,), 1, tmp_path / "lin.pt", dtype=torch.float64)
    dirs = api.random_directions(model, seed=11, ignore="biasbn")
    grid = api.Grid.parse("-1:1:7", "-0.5:0.5:3")
    surface = api.sample_surface(model, data, dirs, grid, tmp_path / "api.h5", loss="mse",
                                 dtype=torch.float64, progress=False)
    dx = [t.numpy() for t in dirs.x]
    dy = [t.numpy() for t in dirs.y]
    assert not dx[1].any() and not dy[1].any()  # biasbn zeroes the bias direction
    expected = closed_form(regression, dx, dy, grid.x, grid.y)
    np.testing.assert_allclose(surface.values["train_loss"], expected, rtol=1e-10, atol=1e-10)
    # The standard error is that of the mean of per-sample squared errors.
    j, i = 1, 3
    w = regression["w0"] + grid.x[i] * dx[0] + grid.y[j] * dy[0]
    per_sample = (regression["x"] @ w.T + regression["b0"] - regression["y"][:, None]).ravel() ** 2
    assert surface.values["train_loss_stderr"][j, i] == pytest.approx(per_sample.std(ddof=1) / np.sqrt(N), rel=1e-9)
    # The model is put back exactly at θ* afterwards.
    np.testing.assert_array_equal(model.net[0].weight.detach().numpy(), regression["w0"])


def test_one_dimensional_curve(regression, tmp_path):
    data = api.load_data("regdata:make")
    model = api.load_model("linear", (D,), 1, tmp_path / "lin.pt", dtype=torch.float64)
    dirs = api.random_directions(model, seed=1, two=False)
    grid = api.Grid.parse("-1:3:9")
    surface = api.sample_surface(model, data, dirs, grid, tmp_path / "c.h5", loss="mse", dtype=torch.float64,
                                 progress=False)
    dx = [t.numpy() for t in dirs.x]
    zero = [np.zeros_like(t) for t in dx]
    expected = closed_form(regression, dx, zero, grid.x, [0.0])[0]
    assert surface.values["train_loss"].shape == (9,)
    np.testing.assert_allclose(surface.values["train_loss"], expected, rtol=1e-10)


@pytest.mark.mpi
@requires_mpi
def test_hessian_saddle_plane_at_the_least_squares_solution(regression, tmp_path):
    """``--directions hessian:max,min`` under two ranks: the stored directions are the extreme
    eigenvectors of H = 2AᵀA/N (A = [X, 1]) and the surface is the quadratic they span."""
    a = np.hstack([regression["x"], np.ones((N, 1))])
    theta = np.linalg.lstsq(a, regression["y"], rcond=None)[0]
    torch.save({"net.0.weight": torch.tensor(theta[None, :D]), "net.0.bias": torch.tensor(theta[D:])},
               tmp_path / "lsq.pt")
    out = tmp_path / "saddle.h5"
    mpirun(2, "surface", "--model", "linear", "--data", "regdata:make", "--checkpoint", tmp_path / "lsq.pt",
           "--loss", "mse", "--dtype", "float64", "--directions", "hessian:max,min", "--threads", "1",
           "--x", "-1:1:5", "--y", "-2:2:5", "--out", out, "--no-progress",
           env={"PYTHONPATH": f"{tmp_path}:{api.__path__[0]}/.."}, check=True)
    h = 2 * a.T @ a / N
    exact, vectors = np.linalg.eigh(h)
    with h5py.File(tmp_path / "saddle.directions.h5") as f:
        dx = [f["xdirection"][k][()] for k in ("0", "1")]
        dy = [f["ydirection"][k][()] for k in ("0", "1")]
        stored = json.loads(f.attrs["meta"])["eigenvalues"]
    np.testing.assert_allclose(stored, [exact[-1], exact[0]], rtol=1e-8)
    for d, lam in ((dx, exact[-1]), (dy, exact[0])):
        v = np.concatenate([d[0].ravel(), d[1]])
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-10)
        assert np.linalg.norm(h @ v - lam * v) <= 1e-6 * abs(lam)
    with h5py.File(out) as f:
        assert f.attrs["dir_file"] == str(tmp_path / "saddle.directions.h5")
        xs, ys, loss = f["x"][()], f["y"][()], f["train_loss"][()]
    np.testing.assert_allclose(loss, closed_form(regression | {"w0": theta[None, :D], "b0": theta[D:]}, dx, dy, xs, ys),
                               rtol=1e-10, atol=1e-10)
    # at the minimum, along eigenvectors: L0 + ½(λ_max α² + λ_min β²)
    l0 = np.mean((a @ theta - regression["y"]) ** 2)
    quad = l0 + 0.5 * (exact[-1] * xs[None, :] ** 2 + exact[0] * ys[:, None] ** 2)
    np.testing.assert_allclose(loss, quad, rtol=1e-6)
