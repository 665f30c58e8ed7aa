"""Mode connectivity (#16): curves between two trained models, trained and evaluated for real.

Two digits CNNs from different seeds are the ends; the CNN has no BatchNorm, so a job over two MPI
ranks must take the very steps one process takes."""

from __future__ import annotations

import hashlib
import json
import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, lsurf, mpirun, requires_mpi
from test_metric_plugins import METRICS

from lsurf import load_data, load_model, read_surface
from lsurf.engine.data.splits import Split
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.geometry.curve import Curve, parameters_of, weights
from lsurf.engine.training.curve import Progress, Training, train_curve

DIGITS = ["--model", "cnn", "--data", "digits"]


@pytest.fixture(scope="module")
def pair(digits_run):
    """Models A and B: digits CNNs trained for 3 epochs from seeds 0 and 1."""
    return digits_run(0) / "model_3.t7", digits_run(1) / "model_3.t7"


def _ends(a, b):
    return ["--checkpoint", a, "--model2", b]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bends(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {f"{k}/{n}": f[k][n][()] for k in f if k.startswith("bend_") for n in f[k]}


def test_bezier_and_chain_closed_forms():
    """θ(0) = θ_A and θ(1) = θ_B exactly; the quadratic Bezier at 1/2 is (θ_A + 2θ_1 + θ_B)/4; a chain
    passes through its bends at equally spaced t; the bends start on the straight line."""
    model = load_model("mlp", (1, 8, 8), 10, seed=0)
    names, a = parameters_of(model)
    b = [torch.randn_like(x) for x in a]
    curve = Curve.straight("bezier", names, a, b, 1)
    for x, y, m in zip(a, b, curve.bends[0]):
        torch.testing.assert_close(m, (x + y) / 2, rtol=0, atol=1e-6)
    curve.bends = [[torch.randn_like(x) for x in a]]
    for got, want in zip(curve.point(0.0), a):
        assert torch.equal(got, want)
    for got, want in zip(curve.point(1.0), b):
        assert torch.equal(got, want)
    for got, x, m, y in zip(curve.point(0.5), a, curve.bends[0], b):
        torch.testing.assert_close(got, 0.25 * x + 0.5 * m + 0.25 * y, rtol=1e-6, atol=1e-6)
    chain = Curve("polychain", names, a, b, [[torch.randn_like(x) for x in a] for _ in range(3)])
    for k, t in enumerate((0.25, 0.5, 0.75)):
        for got, m in zip(chain.point(t), chain.bends[k]):
            torch.testing.assert_close(got, m, rtol=0, atol=1e-6)
    assert weights("bezier", 3, 0.3) == pytest.approx([0.7**4, 4 * 0.3 * 0.7**3, 6 * 0.09 * 0.49,
                                                       4 * 0.027 * 0.7, 0.3**4])


def test_training_leaves_the_model_as_it_was():
    """A library call: the caller's model keeps its weights and its eval flag."""
    model = load_model("mlp", (1, 8, 8), 10, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names, a = parameters_of(model)
    b = [x + 0.1 for x in a]
    split = Split(torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    curve, progress = train_curve(model, Curve.straight("bezier", names, a, b, 1), split,
                                  Training(epochs=2, batch_size=16), Progress(), loss_fn=resolve_loss("cross_entropy"))
    assert progress.epochs_done == 2 and len(progress.train_loss) == 2
    assert not torch.equal(curve.bends[0][0], (a[0] + b[0]) / 2)  # the bend moved
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _own_loss(checkpoint) -> float:
    """Mean train cross-entropy of a checkpoint, computed with plain torch (no lsurf evaluator)."""
    model = load_model("cnn", (1, 8, 8), 10, checkpoint, dtype=torch.float64).eval()
    train = load_data("digits", ("train",))["train"].materialise()
    with torch.no_grad():
        return F.cross_entropy(model(train.x.double()), train.y).item()


@pytest.mark.cli
def test_the_curve_ends_at_the_models_and_lowers_the_barrier(pair, tmp_path):
    a, b = pair
    curve, along = tmp_path / "curve.h5", tmp_path / "along.h5"
    lsurf("curve", "train", *DIGITS, *_ends(a, b), "--epochs", "2", "--dtype", "float64", "--out", curve, check=True)
    p = lsurf("curve", "eval", curve, *DIGITS, *_ends(a, b), "--points", "7", "--dtype", "float64",
              "--out", along, check=True)
    s = read_surface(along)
    assert s.done.all() and np.allclose(s.x, np.linspace(0, 1, 7))
    loss_a, loss_b = _own_loss(a), _own_loss(b)
    for name in ("train_loss", "line_train_loss"):
        assert s.values[name][0] == pytest.approx(loss_a, abs=1e-6)
        assert s.values[name][-1] == pytest.approx(loss_b, abs=1e-6)
    line, bent = float(s.attrs["barrier_line"]), float(s.attrs["barrier_curve"])
    assert bent < line
    assert f"line {line:.4g}, curve {bent:.4g}" in p.stdout
    for key in ("checkpoint_sha256", "model2_sha256", "curve_sha256"):
        assert len(s.attrs[key]) == 64
    with h5py.File(curve) as f:
        assert f.attrs["curve_type"] == "bezier" and int(f.attrs["bends"]) == 1 and int(f.attrs["epochs_done"]) == 2
        assert len(f["train_loss"]) == 2 and f["bend_1"]["conv1.weight"].dtype == np.float64
    info = lsurf("info", curve, check=True).stdout
    assert "bezier, 1 bend" in info and "epochs done:        2" in info and _sha(a) in info and _sha(b) in info
    plotted = lsurf("plot", along, "--out-dir", tmp_path, check=True)
    assert (tmp_path / "along_curve.png").is_file(), plotted.stdout


@pytest.mark.mpi
@requires_mpi
def test_two_ranks_train_and_evaluate_the_curve_one_process_does(pair, tmp_path):
    """Each rank takes its share of every batch and the gradients are added; the points t of an
    evaluation are dealt to the ranks."""
    a, b = pair
    args = ["curve", "train", *DIGITS, "--subset", "400", *_ends(a, b), "--epochs", "2", "--batch-size", "50"]
    lsurf(*args, "--out", tmp_path / "one.h5", check=True)
    mpirun(2, *args, "--out", tmp_path / "two.h5", check=True, env={"OMP_NUM_THREADS": "1"})
    one, two = _bends(tmp_path / "one.h5"), _bends(tmp_path / "two.h5")
    assert one.keys() == two.keys() and one
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-5, err_msg=k)
    evaluate = ["curve", "eval", tmp_path / "one.h5", *DIGITS, "--subset", "300", *_ends(a, b), "--points", "5"]
    lsurf(*evaluate, "--out", tmp_path / "along1.h5", check=True)
    mpirun(2, *evaluate, "--out", tmp_path / "along2.h5", check=True, env={"OMP_NUM_THREADS": "1"})
    alone, shared = read_surface(tmp_path / "along1.h5"), read_surface(tmp_path / "along2.h5")
    assert shared.attrs["mpi_ranks"] == 2 and shared.done.all()
    for name, values in alone.values.items():  # float32: each run's plan measures its faster layout
        np.testing.assert_allclose(shared.values[name], values, rtol=1e-6, err_msg=name)


@pytest.mark.mpi
@requires_mpi
def test_the_evaluation_runs_on_the_surfaces_runner(pair, tmp_path):
    """``curve eval`` is sampled by the surfaces' runner: a plug-in metric along the curve and the line
    (top-1 accuracy by another road: equal to the built-in), a rank group of 2 equal to one process, a
    finished file run again left as it is (nothing to do), one asked for other points refused, untouched."""
    a, b = pair
    (tmp_path / "hitsmetric.py").write_text(METRICS)  # hits(): top-1 accuracy as a plug-in
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1"}
    lsurf("curve", "train", *DIGITS, "--subset", "300", *_ends(a, b), "--epochs", "1", "--out", tmp_path / "c.h5",
          check=True)
    evaluate = ["curve", "eval", tmp_path / "c.h5", "--subset", "300", "--points", "5", "--dtype", "float64",
                "--metric", "hitsmetric:hits", "--no-progress"]
    lsurf(*evaluate, "--out", tmp_path / "one.h5", env=env, check=True)
    mpirun(2, *evaluate, "--ranks-per-point", "2", "--out", tmp_path / "group.h5", env=env, check=True)
    one, group = read_surface(tmp_path / "one.h5"), read_surface(tmp_path / "group.h5")
    for prefix in ("", "line_"):
        for split in ("train", "test"):
            np.testing.assert_array_equal(one.values[f"{prefix}{split}_hits"], one.values[f"{prefix}{split}_acc"])
    assert group.attrs["rank_layout"].startswith("2 ranks in 1 groups of 2")
    assert json.loads(one.attrs["plan"])["batch_size"] == 128  # a surface's plan: its default batch size here
    assert one.values.keys() == group.values.keys()
    for name, values in one.values.items():
        np.testing.assert_allclose(group.values[name], values, rtol=1e-12, err_msg=name)
    again = lsurf(*evaluate, "--out", tmp_path / "one.h5", env=env, check=True)
    assert "0 of 5 points to do" in again.stderr and "barrier" in again.stdout
    np.testing.assert_array_equal(read_surface(tmp_path / "one.h5").values["train_loss"], one.values["train_loss"])
    other = lsurf(*evaluate, "--points", "7", "--out", tmp_path / "one.h5", env=env)
    assert other.returncode == 2 and "--overwrite" in other.stderr, other.stderr
    np.testing.assert_array_equal(read_surface(tmp_path / "one.h5").x, np.linspace(0, 1, 5))


@pytest.mark.cli
def test_a_curve_resumes_where_it_stopped(pair, tmp_path):
    """One epoch, then the same command asking for two, is the straight two-epoch run; a finished
    curve run again is left as it is; one trained otherwise is refused."""
    a, b = pair
    args = ["curve", "train", *DIGITS, "--subset", "300", *_ends(a, b), "--curve-type", "polychain", "--bends", "2"]
    lsurf(*args, "--epochs", "1", "--out", tmp_path / "resumed.h5", check=True)
    lsurf(*args, "--epochs", "2", "--out", tmp_path / "resumed.h5", check=True)
    log = lsurf(*args, "--epochs", "2", "--out", tmp_path / "straight.h5", check=True).stderr
    assert re.search(r"epoch 1/2: train loss [\d.]+, lr 0.05; \d+ s, about \d+ s left\n", log), log  # with its ETA
    resumed, straight = _bends(tmp_path / "resumed.h5"), _bends(tmp_path / "straight.h5")
    assert resumed.keys() == straight.keys() and len(resumed) == 2 * 6  # 2 bends x 6 tensors
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    with h5py.File(tmp_path / "resumed.h5") as f, h5py.File(tmp_path / "straight.h5") as g:
        np.testing.assert_array_equal(f["train_loss"][()], g["train_loss"][()])
    before = (tmp_path / "straight.h5").read_bytes()
    again = lsurf(*args, "--epochs", "2", "--out", tmp_path / "straight.h5", check=True)
    assert "nothing to do" in again.stderr and (tmp_path / "straight.h5").read_bytes() == before
    other = lsurf(*args, "--epochs", "2", "--lr", "0.2", "--out", tmp_path / "straight.h5")
    assert other.returncode == 2 and "--overwrite" in other.stderr and "lr" in other.stderr
    assert (tmp_path / "straight.h5").read_bytes() == before


@pytest.mark.cli
def test_the_plane_of_the_curve_is_an_ordinary_surface(pair, tmp_path):
    """``surface --curve-plane`` (centred on the curve's model A unless told otherwise): (0, 0) is
    model A, (1, 0) model B, the bend lies at β = 1; ``plot --curve`` draws the curve on it, and
    refuses a plane the curve does not lie in."""
    a, b = pair
    curve, plane = tmp_path / "curve.h5", tmp_path / "plane.h5"
    lsurf("curve", "train", *DIGITS, "--subset", "300", *_ends(a, b), "--epochs", "1", "--out", curve, check=True)
    lsurf("surface", "--curve-plane", curve, "--x", "0:1:3", "--y", "0:1:2",  # model, checkpoint A, data: the curve's
          "--dtype", "float64", "--no-progress", "--out", plane, check=True)
    s = read_surface(plane)
    assert s.values["train_loss"][0, 0] == pytest.approx(_own_loss(a), abs=1e-6)
    assert s.values["train_loss"][0, 2] == pytest.approx(_own_loss(b), abs=1e-6)
    marks = {m["label"]: (m["x"], m["y"]) for m in json.loads(s.attrs["markers"])}
    assert marks["model A"] == (0.0, 0.0) and marks["model B"] == (1.0, 0.0)
    assert marks["bend"][1] == pytest.approx(1.0, abs=1e-6)
    lsurf("plot", plane, "--curve", curve, "--kind", "contour", "--out-dir", tmp_path, check=True)
    assert (tmp_path / "plane_train_loss_contour.png").is_file()
    random = tmp_path / "random.h5"
    lsurf("surface", *DIGITS, "--subset", "100", "--checkpoint", a, "--x", "0:1:2", "--y", "0:1:2", "--no-progress",
          "--out", random, check=True)
    refused = lsurf("plot", random, "--curve", curve, "--out-dir", tmp_path)
    assert refused.returncode == 2 and "--curve-plane" in refused.stderr


def test_recorded_inputs_fill_what_is_not_given_and_a_missing_end_is_named(tmp_path):
    from lsurf.engine.formats.curve_file import save_curve
    from lsurf.errors import UserError
    from lsurf.run.curve import with_curve_inputs

    (tmp_path / "a.t7").write_bytes(b"")
    x = [torch.zeros(2)]
    config = {"model": "mlp", "checkpoint": str(tmp_path / "a.t7"), "model2": "gone/b.t7", "data": "digits",
              "subset": 300, "dtype": "float64", "seq_len": None}
    save_curve(tmp_path / "c.h5", Curve.straight("bezier", ["w"], x, x, 1), Progress(),
               {"config": json.dumps(config)})
    with pytest.raises(UserError, match="'gone/b.t7', which is not found from here: give `model2`"):
        with_curve_inputs(str(tmp_path / "c.h5"), {})
    got = with_curve_inputs(str(tmp_path / "c.h5"), {"model2": "mine.t7", "data": "synthetic"})
    assert got == {"model": "mlp", "checkpoint": str(tmp_path / "a.t7"), "model2": "mine.t7", "data": "synthetic"}
    plane = with_curve_inputs(str(tmp_path / "c.h5"), {}, plane=True)  # centred on A: no model2 to look for
    assert plane == {"model": "mlp", "checkpoint": str(tmp_path / "a.t7"), "data": "digits"}


BN_MODEL = """
import torch
def make():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 10))
"""


@pytest.mark.cli
def test_a_batchnorm_model_is_evaluated_with_recalibrated_statistics(tmp_path):
    """BatchNorm statistics between two models are neither's: ``eval`` recalibrates them at every t,
    and its straight line is what ``lsurf surface --model2 --bn recalibrate`` samples. ``eval`` takes
    the model, data and ends from the curve file."""
    (tmp_path / "bnnet.py").write_text(BN_MODEL)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}"}
    model = ["--model", "bnnet:make", "--data", "digits", "--subset", "300"]
    for seed in (0, 1):
        lsurf("train", *model, "--epochs", "1", "--seed", seed, "--out-dir", tmp_path / f"s{seed}", env=env, check=True)
    ends = _ends(tmp_path / "s0" / "model_1.t7", tmp_path / "s1" / "model_1.t7")
    lsurf("curve", "train", *model, *ends, "--epochs", "1", "--out", tmp_path / "c.h5", env=env, check=True)
    lsurf("curve", "eval", tmp_path / "c.h5", "--subset", "300", "--points", "3", "--out", tmp_path / "along.h5",
          env=env, check=True)  # the plug-in model, its data and both ends as `curve train` recorded them
    lsurf("surface", *model, *ends, "--bn", "recalibrate", "--x", "0:1:3", "--no-progress",
          "--out", tmp_path / "line.h5", env=env, check=True)
    along, line = read_surface(tmp_path / "along.h5"), read_surface(tmp_path / "line.h5")
    assert along.config["bn"] == "recalibrate"
    np.testing.assert_allclose(along.values["line_train_loss"], line.values["train_loss"], rtol=1e-6)
    assert np.isfinite(along.values["train_loss"]).all()
