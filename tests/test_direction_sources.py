"""Interpolation between models, planes through three, PCA of a trajectory, BN recalibration."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import lsurf, mpirun, requires_mpi

from lsurf import UserError, load_data, load_model
from lsurf.engine.geometry.directions import target_tensors
from lsurf.engine.geometry.trajectory import pca_directions


@pytest.fixture(scope="module")
def run_dir(digits_run):
    """The digits CNN's checkpoints model_0.t7 … model_3.t7, as ``lsurf train --epochs 3`` writes them."""
    return digits_run(0)


def own_loss(ckpt) -> float:
    """The checkpoint's train loss by a plain forward, independent of lsurf's evaluator."""
    split = load_data("digits", ("train",))["train"]
    model = load_model("cnn", (1, 8, 8), 10, ckpt).eval()
    with torch.no_grad():
        return F.cross_entropy(model(split.x), split.y).item()


@pytest.mark.cli
def test_interpolation_endpoints_are_the_models(run_dir, tmp_path):
    out = tmp_path / "line.h5"
    lsurf("surface", "--model", "cnn", "--checkpoint", run_dir / "model_0.t7", "--model2", run_dir / "model_3.t7",
          "--x", "-0.5:1.5:5", "--out", out, "--no-progress", check=True)
    with h5py.File(out) as f:
        loss, x = f["train_loss"][()], f["x"][()]
        assert '"model 2", "x": 1.0' in f.attrs["markers"]
    with h5py.File(tmp_path / "line.directions.h5") as f:
        d = f["xdirection"]["0"][()]
    a = torch.load(run_dir / "model_0.t7", weights_only=True)["state_dict"]["conv1.weight"].numpy()
    b = torch.load(run_dir / "model_3.t7", weights_only=True)["state_dict"]["conv1.weight"].numpy()
    np.testing.assert_allclose(d, b - a, rtol=1e-6, atol=1e-7)  # the direction is θ₂ − θ₁, unnormalised
    assert list(x) == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert loss[1] == pytest.approx(own_loss(run_dir / "model_0.t7"), rel=1e-6)
    assert loss[3] == pytest.approx(own_loss(run_dir / "model_3.t7"), rel=1e-5)


@pytest.mark.mpi
@requires_mpi
def test_plane_through_three_models_under_mpi(run_dir, tmp_path):
    out = tmp_path / "plane.h5"
    mpirun(2, "surface", "--model", "cnn", "--checkpoint", run_dir / "model_1.t7", "--model2", run_dir / "model_2.t7",
           "--model3", run_dir / "model_3.t7", "--x", "0:1:3", "--y", "0:1:3", "--out", out, "--no-progress",
           check=True)
    with h5py.File(out) as f:
        loss = f["train_loss"][()]  # [j, i] at (x[i], y[j])
        assert "model 3" in f.attrs["markers"]
    assert loss[0, 0] == pytest.approx(own_loss(run_dir / "model_1.t7"), rel=1e-6)
    assert loss[0, 2] == pytest.approx(own_loss(run_dir / "model_2.t7"), rel=1e-5)
    assert loss[2, 0] == pytest.approx(own_loss(run_dir / "model_3.t7"), rel=1e-5)


@pytest.mark.cli
def test_other_architecture_is_refused(run_dir, tmp_path):
    torch.save(load_model("mlp", (1, 8, 8), 10).state_dict(), tmp_path / "mlp.pt")
    p = lsurf("surface", "--model", "cnn", "--checkpoint", run_dir / "model_0.t7", "--model2", tmp_path / "mlp.pt",
              "--x", "0:1:3", "--out", tmp_path / "o.h5")
    assert p.returncode == 2 and "does not fit this model" in p.stderr and "conv1.weight" in p.stderr


@pytest.mark.cli
def test_states_interpolation_moves_bn_statistics(tmp_path):
    torch.manual_seed(1)
    m1 = load_model("resnet20", None, None)
    m2 = load_model("resnet20", None, None)
    for m in (m1, m2):  # give each model its own BN statistics
        m.train()
        with torch.no_grad():
            m(torch.randn(16, 3, 32, 32) * (2 if m is m2 else 1))
    torch.save(m1.state_dict(), tmp_path / "a.pt")
    torch.save(m2.state_dict(), tmp_path / "b.pt")
    lsurf("surface", "--model", "resnet20", "--data", "synthetic:shape=3x32x32,n=40", "--checkpoint", tmp_path / "a.pt",
          "--model2", tmp_path / "b.pt", "--dir-type", "states", "--x", "0:1:2", "--out", tmp_path / "s.h5",
          "--no-progress", check=True)
    split = load_data("synthetic:shape=3x32x32,n=40", ("train",))["train"]
    with torch.no_grad():
        own = F.cross_entropy(m2.eval()(split.x), split.y).item()
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["train_loss"][1] == pytest.approx(own, rel=1e-5)


def test_pca_recovers_a_known_plane():
    torch.manual_seed(0)
    model = load_model("linear", (5,), 1)  # 6 numbers: weight (1, 5) and bias (1,)
    names, centre = target_tensors(model, "weights")
    flat = torch.cat([t.reshape(-1) for t in centre]).double()
    u, v = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 2)))[0].T
    coeffs = np.array([[3.0, 1.0], [2.0, -0.5], [1.2, 0.4], [0.5, -0.2], [0.0, 0.0]])
    states = []
    for c1, c2 in coeffs:
        vec = flat.numpy() + c1 * u + c2 * v
        states.append({"net.0.weight": torch.tensor(vec[:5]).reshape(1, 5), "net.0.bias": torch.tensor(vec[5:])})
    dirs, proj = pca_directions(model, states, [f"t{k}" for k in range(5)], ignore="none")
    comps = np.stack([torch.cat([t.reshape(-1) for t in d]).double().numpy() for d in (dirs.x, dirs.y)])
    basis = np.stack([u, v])
    assert np.linalg.svd(comps @ basis.T, compute_uv=False) == pytest.approx([1, 1], abs=1e-6)  # same plane
    assert proj.explained_variance.sum() == pytest.approx(1.0, abs=1e-9)
    assert proj.distance.max() < 1e-6
    np.testing.assert_allclose(proj.x**2 + proj.y**2, (coeffs**2).sum(1), rtol=1e-6)
    assert proj.x[-1] == pytest.approx(0) and proj.y[-1] == pytest.approx(0)  # the centre is θ_final


@pytest.mark.cli
def test_trajectory_needs_three_checkpoints(run_dir, tmp_path):
    p = lsurf("trajectory", run_dir / "model_0.t7", run_dir / "model_1.t7", "--model", "cnn",
              "--dir-out", tmp_path / "d.h5", "--proj-out", tmp_path / "p.h5")
    assert p.returncode == 2 and "at least 3 checkpoints" in p.stderr


@pytest.mark.cli
def test_trajectory_command_then_surface(run_dir, tmp_path):
    lsurf("trajectory", run_dir, "--model", "cnn", "--dir-out", tmp_path / "d.h5", "--proj-out", tmp_path / "p.h5",
          check=True)
    with h5py.File(tmp_path / "p.h5") as f:
        assert len(f["proj_x"]) == 4 and f.attrs["explained_variance"].sum() <= 1 + 1e-9
        assert f["proj_x"][-1] == 0 and f["proj_y"][-1] == 0
    lsurf("surface", "--model", "cnn", "--checkpoint", run_dir / "model_3.t7", "--dir-file", tmp_path / "d.h5",
          "--x", "-1:1:3", "--y", "-1:1:3", "--out", tmp_path / "s.h5", "--no-progress", check=True)


def test_bn_recalibration_uses_training_statistics(tmp_path):
    """After recalibration at α=0, the first BN layer's statistics are those of the training data."""
    from lsurf import Evaluator, random_directions
    from lsurf.engine.data.batches import resident_batches
    from lsurf.engine.evaluation.evaluate import evaluator
    from lsurf.engine.evaluation.losses import resolve_loss

    torch.manual_seed(0)
    split = load_data("synthetic:shape=3x32x32,n=64", ("train",))["train"]
    model = load_model("resnet20", None, None).eval()
    dirs = random_directions(model, seed=0)
    with evaluator(model, {"train": split}, dirs, batch_size=16, bn="recalibrate") as ev:
        ev.set_point(0.0, 0.0)
        ev._recalibrate_bn()
        with torch.no_grad():
            h = model.conv1(split.x)
        torch.testing.assert_close(model.bn1.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(model.bn1.running_mean, torch.zeros(16))  # put back afterwards
    names, targets = target_tensors(model, "weights")
    batches = {"train": resident_batches(split, 16, torch.device("cpu"), torch.float32)}
    with pytest.raises(UserError):
        Evaluator(model, names, targets, dirs, batches, resolve_loss("cross_entropy"), bn="recalibrate",
                  points_per_pass=4)


def test_hessian_directions_refuse_other_sources():
    from lsurf.run.options import Options

    with pytest.raises(UserError, match="a curve needs one, e.g. hessian:max"):
        Options(directions="hessian:max,min")
    with pytest.raises(UserError, match="cannot be combined with `dir_file`"):
        Options(directions="hessian:max", dir_file="d.h5")
    with pytest.raises(UserError, match="cannot be combined with `planes` > 1"):
        Options(directions="hessian:max,max2", y="-1:1:3", planes=2)


@pytest.mark.cli
def test_a_hessian_plane_is_reused_on_resume(run_dir, tmp_path):
    """The second run finds the plane's direction file made the same way and walks it: nothing is
    recomputed and the file is not rewritten; --overwrite computes it again, to the same vectors."""
    args = ("surface", "--model", "cnn", "--data", "digits", "--subset", "64", "--checkpoint", run_dir / "model_3.t7",
            "--directions", "hessian:max,max2", "--x=-0.2:0.2:3", "--y=-0.2:0.2:3", "--dtype", "float64",
            "--threads", "1", "--no-progress", "--out", tmp_path / "h.h5")
    lsurf(*args, check=True)
    dirs = tmp_path / "h.directions.h5"
    first, stamp = _vectors(dirs), dirs.stat().st_mtime_ns
    p = lsurf(*args, check=True)
    assert "0 of 9 points to do" in p.stderr and dirs.stat().st_mtime_ns == stamp
    lsurf(*args, "--overwrite", check=True)
    with h5py.File(dirs) as f, h5py.File(tmp_path / "h.h5") as s:
        assert s.attrs["dir_file"] == str(dirs) and f.attrs["source"] == "hessian"
        values = np.array(json.loads(f.attrs["eigenvalues"]))
        assert values[0] >= values[1] > 0
    assert dirs.stat().st_mtime_ns != stamp
    for a, b in zip(_vectors(dirs), first):
        np.testing.assert_array_equal(a, b)


def _vectors(path) -> list[np.ndarray]:
    with h5py.File(path) as f:
        return [f[g][k][()] for g in ("xdirection", "ydirection") for k in sorted(f[g], key=int)]
