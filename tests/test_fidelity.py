"""Projection fidelity: at the least-squares solution of a linear model under MSE the Hessian is
H = 2AᵀA/N (A = [X, 1]) exactly, so what each plane sees of it is known in closed form."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import D, N, lsurf, mpirun, requires_mpi

import lsurf as api
from lsurf.engine.curvature.fidelity import Fidelity, title_line, verdict
from lsurf.engine.data.splits import Split
from lsurf.engine.formats.surface_file import Surface
from lsurf.errors import UserError
from lsurf.post.plot import figure_title
from lsurf.run.curvature import fidelity_skipped, hessian_plane
from lsurf.run.options import Options
from lsurf.run.sources import grid_for


def _least_squares(regression, tmp_path):
    a = np.hstack([regression["x"], np.ones((N, 1))])
    theta = np.linalg.lstsq(a, regression["y"], rcond=None)[0]
    torch.save({"net.0.weight": torch.tensor(theta[None, :D]), "net.0.bias": torch.tensor(theta[D:])},
               tmp_path / "lsq.pt")
    return 2 * a.T @ a / N


@pytest.mark.mpi
@requires_mpi
def test_stored_quotients_and_extremes_match_the_closed_form_under_two_ranks(regression, tmp_path):
    h = _least_squares(regression, tmp_path)
    out = tmp_path / "plane.h5"
    mpirun(2, "surface", "--model", "linear", "--data", "regdata:make", "--checkpoint", tmp_path / "lsq.pt",
           "--loss", "mse", "--dtype", "float64", "--ignore", "none", "--seed", "5", "--fidelity", "on",
           "--threads", "1", "--x", "-1:1:5", "--y", "-2:2:9", "--out", out, "--no-progress",
           env={"PYTHONPATH": f"{tmp_path}:{api.__path__[0]}/.."}, check=True)
    with h5py.File(tmp_path / "plane.directions.h5") as f:
        dirs = [np.concatenate([f[k]["0"][()].ravel(), f[k]["1"][()]]) for k in ("xdirection", "ydirection")]
    surface = api.read_surface(out)
    fid = surface.fidelity
    assert fid is not None and fid.split == "train" and fid.parameters == D + 1
    for got, norm2, d in zip(fid.quotients[0], fid.norms2[0], dirs):
        assert got == pytest.approx(d @ h @ d / (d @ d), rel=1e-10)
        assert norm2 == pytest.approx(d @ d, rel=1e-12)
    exact = np.linalg.eigvalsh(h)
    assert fid.lambda_max == pytest.approx(exact[-1], rel=1e-8)
    assert fid.lambda_min == pytest.approx(exact[0], rel=1e-8)
    assert abs(fid.mean_eigenvalue - np.trace(h) / (D + 1)) <= 4 * fid.mean_eigenvalue_stderr + 1e-12
    # the quadratic surface's own second differences at the centre are dᵀHd exactly
    (cx, cy), = surface.centre_curvatures("train")
    assert cx / fid.norms2[0][0] == pytest.approx(fid.quotients[0][0], rel=1e-6)
    assert cy / fid.norms2[0][1] == pytest.approx(fid.quotients[0][1], rel=1e-6)
    info = lsurf("info", out, check=True).stdout
    assert "curvature at θ*:" in info and f"λ_max {fid.lambda_max:.4g}" in info
    assert "plane fidelity:" in info and "sampled" in info
    assert "curvature x " in figure_title(surface, "train_loss")


def test_a_hessian_plane_is_sharp_along_lambda_max(regression, tmp_path):
    """One process, the λ_max, λ_min plane: its quotients are the eigenvalues themselves."""
    h = _least_squares(regression, tmp_path)
    opts = Options(model="linear", checkpoint=str(tmp_path / "lsq.pt"), data="regdata:make", loss="mse",
                   dtype="float64", directions="hessian:max,min", fidelity="on",
                   x="-1:1:3", y="-1:1:3", out=str(tmp_path / "h.h5"), progress=False)
    model, data = api.load_inputs(opts)
    dirs = hessian_plane(opts, model, data)
    surface = api.sample_surface(model, data, dirs, grid_for(opts), opts.out, opts)
    fid = surface.fidelity
    exact = np.linalg.eigvalsh(h)
    assert fid.quotients[0] == pytest.approx((exact[-1], exact[0]), rel=1e-8)
    assert verdict(fid.quotients[0][0], fid.mean_eigenvalue) == ("sharp-biased" if exact[-1] > 3 * np.mean(exact)
                                                                 else "typical")


def test_auto_measures_only_where_it_is_cheap():
    data = {"train": Split(torch.zeros(100, 3), torch.zeros(100, dtype=torch.long))}
    fine = Options(x="-1:1:101", y="-1:1:101")
    assert fidelity_skipped(fine, data, grid_for(fine), 1, []) is None
    coarse = Options(x="-1:1:11", y="-1:1:11")
    assert "cost" in fidelity_skipped(coarse, data, grid_for(coarse), 1, [])
    assert fidelity_skipped(coarse.replace(fidelity="on"), data, grid_for(coarse), 1, []) is None
    assert "off" in fidelity_skipped(fine.replace(fidelity="off"), data, grid_for(fine), 1, [])
    assert "streamed" in fidelity_skipped(fine, data, grid_for(fine), 1, ["train"])
    assert "low precision" in fidelity_skipped(fine.replace(dtype="bfloat16"), data, grid_for(fine), 1, [])
    tokens = {"train": Split(torch.zeros(100, 8, dtype=torch.long), torch.zeros(100, 8, dtype=torch.long))}
    assert "token targets" in fidelity_skipped(fine, tokens, grid_for(fine), 1, [])
    with pytest.raises(UserError, match="`fidelity` on"):
        fidelity_skipped(fine.replace(fidelity="on"), tokens, grid_for(fine), 1, [])
    sharded = fine.replace(ranks_per_point=2, shard="fsdp")  # measured where one group holds every rank
    assert fidelity_skipped(sharded, data, grid_for(fine), 1, [], groups=1) is None
    assert "one group of every rank; this run has 2 groups" in fidelity_skipped(sharded, data, grid_for(fine), 1, [],
                                                                                groups=2)
    with pytest.raises(UserError, match="`fidelity` on: the Hessian of a sharded model takes one group"):
        fidelity_skipped(sharded.replace(fidelity="on"), data, grid_for(fine), 1, [], groups=2)


def test_an_ensemble_title_shows_the_median_and_each_plane_its_own():
    fid = Fidelity("train", 2.0, -0.5, 0.1, 0.01, 10, [(0.1, 0.2), (0.4, 0.5), (1.0, 0.02)],
                   [(1.0, 1.0)] * 3, 20, 10)
    assert title_line(fid).startswith("median curvature of 3 planes x 0.4 (sharp), y 0.2 (typical);")
    x = np.linspace(-1, 1, 3)
    surface = Surface("e.h5", x, x, {"train_loss": np.zeros((3, 3, 3))}, np.ones((3, 3, 3), bool),
                      {"fidelity": fid.to_json()}, planes=3)
    assert surface.plane(2).fidelity.quotients == [(1.0, 0.02)]
    assert "curvature x 1 (sharp), y 0.02 (flat)" in figure_title(surface.plane(2), "train_loss")
