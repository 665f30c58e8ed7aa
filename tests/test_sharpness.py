"""Sharpness against closed forms (linear regression under MSE is exactly quadratic) and the command
end to end: one process against two MPI ranks, bad input, an existing file left whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import lsurf, mpirun, requires_mpi, write_data_plugin

import lsurf as api
from lsurf import Options, UserError
from lsurf.engine.evaluation.sharpness import Probe, SharpnessSpec
from lsurf.engine.geometry.directions import zero_directions
from lsurf.run.sharpness import sharpness

N, D = 150, 4
RHO = 0.1


@pytest.fixture
def regression(tmp_path, monkeypatch):
    """A data plug-in and a float64 checkpoint of ``linear`` at the least-squares solution θ*, where
    L(θ* + δ) − L(θ*) = ½ δᵀHδ exactly, H = 2AᵀA/n with A = [X, 1]."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, D)) * np.array([3.0, 1.5, 1.0, 0.7]) + 0.5
    y = x @ rng.normal(size=D) + 1.0 + 0.3 * rng.normal(size=N)
    write_data_plugin(tmp_path, monkeypatch, "sharpdata", x, y)
    a = np.hstack([x, np.ones((N, 1))])
    theta = np.linalg.lstsq(a, y, rcond=None)[0]
    torch.save({"net.0.weight": torch.tensor(theta[None, :D]), "net.0.bias": torch.tensor(theta[D:])},
               tmp_path / "lstsq.pt")
    options = Options(model="linear", data="sharpdata:make", checkpoint=str(tmp_path / "lstsq.pt"), loss="mse",
                      dtype="float64", device="cpu", batch_size=64, out=str(tmp_path / "s.h5"), overwrite=True,
                      progress=False)
    return options, 2 * a.T @ a / N, theta


def test_worst_case_is_half_rho_squared_lambda_max(regression):
    options, h, _ = regression
    r = sharpness(options, SharpnessSpec(radius=RHO, kind="worst"))
    assert r is not None and r["values"].shape == (3,)
    exact = 0.5 * RHO**2 * np.linalg.eigvalsh(h)[-1]
    assert float(r["sharpness"]) == pytest.approx(exact, rel=1e-6)
    assert float(r["sharpness_stderr"]) == 0.0 and r["values"].max() == r["sharpness"]
    assert (r["values"] <= exact * (1 + 1e-9)).all()  # nothing in the ball beats the maximum


def test_average_case_is_half_rho_squared_mean_eigenvalue(regression):
    options, h, _ = regression
    r = sharpness(options, SharpnessSpec(radius=RHO, kind="average", samples=2000))
    assert r is not None and r["values"].shape == (2000,)
    exact = 0.5 * RHO**2 * np.trace(h) / len(h)  # E[uuᵀ] = ρ²I/p on the sphere
    se = float(r["sharpness_stderr"])
    assert se == pytest.approx(r["values"].std(ddof=1) / np.sqrt(2000))
    assert abs(float(r["sharpness"]) - exact) < 4 * se
    # every draw lies on the sphere: its rise lies between the extreme eigenvalues' ½ρ²λ
    lam = np.linalg.eigvalsh(h)
    assert (r["values"] >= 0.5 * RHO**2 * lam[0] * (1 - 1e-9)).all()
    assert (r["values"] <= 0.5 * RHO**2 * lam[-1] * (1 + 1e-9)).all()


def test_adaptive_worst_case_is_in_scaled_coordinates(regression):
    options, h, theta = regression
    d = np.diag(np.abs(theta))
    r = sharpness(options, SharpnessSpec(radius=RHO, kind="worst", adaptive=True))
    assert r is not None
    exact = 0.5 * RHO**2 * np.linalg.eigvalsh(d @ h @ d)[-1]
    assert float(r["sharpness"]) == pytest.approx(exact, rel=1e-6)
    avg = sharpness(options, SharpnessSpec(radius=RHO, kind="average", adaptive=True, samples=500))
    assert avg is not None
    assert abs(float(avg["sharpness"]) - 0.5 * RHO**2 * np.trace(d @ h @ d) / len(h)) < 4 * float(
        avg["sharpness_stderr"])


def test_probe_hands_the_model_back_and_draws_depend_on_the_index_alone(regression):
    options, h, _ = regression
    model = api.load_model("linear", (D,), 1, options.checkpoint, dtype=torch.float64)
    data = api.load_data("sharpdata:make")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with api.evaluator(model, data, zero_directions(model, "weights"), dtype=torch.float64, loss="mse") as ev:
        probe = Probe(ev, "train", RHO, seed=4)
        first = [probe.average(i) for i in (0, 7)]
        assert [probe.average(7), probe.average(0)] == first[::-1]  # the order of draws does not matter
        u = torch.cat([t.reshape(-1) for t in probe.sphere(3)]).numpy()
        assert np.linalg.norm(u) == pytest.approx(RHO, rel=1e-12)
        assert probe.rise(probe.sphere(3)) == pytest.approx(0.5 * u @ h @ u, rel=1e-8)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad, param", [({"radius": 0.0}, "radius"), ({"radius": -1.0}, "radius"),
                                        ({"radius": 0.1, "samples": 0}, "samples"),
                                        ({"radius": 0.1, "kind": "worst", "steps": 0}, "steps"),
                                        ({"radius": 0.1, "kind": "median"}, "kind")])
def test_bad_settings_name_the_parameter(bad, param):
    with pytest.raises(UserError) as e:
        SharpnessSpec(**bad)
    assert e.value.params[0] == param


CNN = ("--model", "cnn", "--data", "digits", "--subset", "120", "--threads", "1")


@pytest.mark.mpi
@requires_mpi
@pytest.mark.parametrize("kind", ["average", "worst"])
def test_two_ranks_give_what_one_process_gives(tmp_path, digits_checkpoint, kind):
    settings = ["--kind", kind, "--radius", "0.05", "--samples", "5", "--steps", "3", "--restarts", "3"]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    p1 = lsurf("sharpness", *CNN, "--checkpoint", digits_checkpoint, *settings, "--out", one, check=True)
    p2 = mpirun(2, "sharpness", *CNN, "--checkpoint", digits_checkpoint, *settings, "--out", two, check=True)
    for p in (p1, p2):
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sharpness ({kind}, rho 0.05"), p.stdout
    f, g = api.read_surface(one), api.read_surface(two)  # 1-D files of the one runner: draws or restarts
    assert f.done.all() and g.done.all() and f.values["rise"].shape == ((5,) if kind == "average" else (3,))
    np.testing.assert_allclose(g.values["rise"], f.values["rise"], rtol=1e-6, atol=1e-9)
    for name in ("sharpness", "sharpness_stderr", "centre_loss"):
        assert float(g.attrs[name]) == pytest.approx(float(f.attrs[name]), rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(f.values["train_loss"] - f.values["rise"], float(f.attrs["centre_loss"]), rtol=1e-9)
    assert json.loads(f.attrs["versions"])["lsurf"] == api.__version__ and g.attrs["mpi_ranks"] == 2
    assert json.loads(f.attrs["sharpness_spec"])["radius"] == 0.05 and json.loads(f.attrs["axis_names"]) == [
        "draw" if kind == "average" else "restart"]
    if kind == "worst":  # a trained net rises more at the worst point than at random ones
        assert (f.values["rise"] > 0).all()
    info = lsurf("info", one, check=True).stdout
    assert f"sharpness:          {f.attrs['sharpness']}" in info and '"kind": "' + kind in info, info
    again = lsurf("sharpness", *CNN, "--checkpoint", digits_checkpoint, *settings, "--out", one, check=True)
    assert again.stdout == p1.stdout and "0 of" in again.stderr  # a finished file: resumed, nothing to do
    other = lsurf("sharpness", *CNN, "--checkpoint", digits_checkpoint, *settings, "--radius", "0.1", "--out", one)
    assert other.returncode == 2 and "--overwrite" in other.stderr, other.stderr


@pytest.mark.mpi
@requires_mpi
@pytest.mark.parametrize("kind", ["average", "worst"])
def test_rank_groups_sharded_or_not_give_what_one_process_gives(tmp_path, digits_checkpoint, kind):
    """A group of 2 shares each draw or restart (the split's sums and the ascent's gradients added
    over it); with ``--shard fsdp`` each rank also holds half of the model, of every draw and of the
    ascent, by rows. In float64 the rises are the one process's to 1e-10."""
    settings = [*CNN, "--checkpoint", digits_checkpoint, "--dtype", "float64", "--kind", kind, "--radius", "0.05",
                "--samples", "3", "--steps", "3", "--restarts", "2", "--no-progress"]
    one, groups, sharded = (tmp_path / f"{n}.h5" for n in ("one", "groups", "sharded"))
    lsurf("sharpness", *settings, "--out", one, check=True)
    mpirun(4, "sharpness", *settings, "--ranks-per-point", 2, "--out", groups, check=True)
    mpirun(2, "sharpness", *settings, "--ranks-per-point", 2, "--shard", "fsdp", "--out", sharded, check=True)
    f = api.read_surface(one)
    assert f.done.all() and np.isfinite(f.values["rise"]).all() and (f.values["rise"] != 0).all()
    for other in (groups, sharded):
        g = api.read_surface(other)
        np.testing.assert_allclose(g.values["rise"], f.values["rise"], rtol=1e-10, atol=1e-14, err_msg=other.name)
        assert float(g.attrs["centre_loss"]) == pytest.approx(float(f.attrs["centre_loss"]), rel=1e-12)
    info = lsurf("info", sharded, check=True).stdout
    assert "in 1 groups of 2" in info and "sharded 2 ways, fsdp" in info, info


@pytest.mark.cli
@pytest.mark.parametrize("flags, flag", [(("--radius", "0"), "--radius"), (("--radius", "0.1", "--samples", "0"),
                                                                             "--samples"),
                                         (("--radius", "0.1", "--kind", "worst", "--steps", "0"), "--steps")])
def test_bad_input_is_one_line_and_leaves_the_file_whole(tmp_path, flags, flag):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"precious")
    p = lsurf("sharpness", *CNN, *flags, "--out", out)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and flag in p.stderr and p.stderr.startswith("lsurf: error:")
    assert out.read_bytes() == b"precious" and not (tmp_path / "keep.h5.tmp").exists()


@pytest.mark.cli
def test_missing_output_folder_and_unknown_kind_are_refused(tmp_path):
    p = lsurf("sharpness", *CNN, "--radius", "0.1", "--out", tmp_path / "nowhere" / "s.h5")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--out" in p.stderr
    assert p.stderr.strip().count("\n") == 0
    p = lsurf("sharpness", *CNN, "--radius", "0.1", "--kind", "median", "--out", tmp_path / "s.h5")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--kind" in p.stderr
