"""The stacked (vmap) path gives the per-point path's values; calibration picks a valid K."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

from lsurf import Evaluator, load_data, load_model, random_directions
from lsurf.engine.data.batches import resident_batches
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.geometry.directions import target_tensors


def _evaluator(model_name: str, data_spec: str, dir_type: str, k: int, loss: str = "cross_entropy") -> Evaluator:
    torch.manual_seed(0)
    data = load_data(data_spec, ("train", "test"))
    first = data["train"]
    model = load_model(model_name, tuple(first.x.shape[1:]), first.num_outputs).eval()
    dirs = random_directions(model, seed=3, dir_type=dir_type, ignore="none")
    names, targets = target_tensors(model, dir_type)
    batches = {s: resident_batches(sp, 48, torch.device("cpu"), torch.float32) for s, sp in data.items()}
    return Evaluator(model, names, targets, dirs, batches, resolve_loss(loss), points_per_pass=k)


# (With ignore=none a BN weight moves to w·(1+a+b): a+b = -1 would zero every activation and tie the logits.)
POINTS = [(a, b) for a in (-0.7, 0.0, 0.4) for b in (-0.2, 0.5)]


@pytest.mark.parametrize("model,data,dir_type,loss", [
    ("mlp", "digits", "weights", "cross_entropy"),
    ("cnn", "digits", "weights", "cross_entropy"),
    ("resnet20", "synthetic:shape=3x32x32,n=60", "weights", "cross_entropy"),
    ("resnet20", "synthetic:shape=3x32x32,n=60", "states", "cross_entropy"),
    ("mlp", "synthetic:shape=6,n=80,task=regression", "weights", "mse"),
])
def test_stacked_equals_per_point(model, data, dir_type, loss):
    single = _evaluator(model, data, dir_type, 1, loss).evaluate_many(POINTS)
    stacked = _evaluator(model, data, dir_type, 4, loss).evaluate_many(POINTS)
    for s1, s4 in zip(single, stacked, strict=True):
        assert list(s1) == list(s4) and "test_acc_stderr" in s1
        np.testing.assert_allclose(list(s4.values()), list(s1.values()), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("k", [1, 3])
def test_reductions_in_chunks_equal_an_independent_computation(monkeypatch, k):
    """Outputs reduced a few batches at a time (a tiny threshold forces many uneven chunks) give
    the mean cross-entropy, its standard error and the accuracy that plain torch computes."""
    import lsurf.engine.evaluation.evaluate

    monkeypatch.setattr(lsurf.engine.evaluation.evaluate, "_REDUCE_EVERY", 700)  # 48 x 10 logits a batch: 2 a chunk
    ev = _evaluator("mlp", "digits", "weights", k)
    got = ev.evaluate_many(POINTS[:3])
    for (a, b), values in zip(POINTS[:3], got, strict=True):
        ev.set_point(a, b)
        for split in ("train", "test"):
            x = torch.cat([bx for bx, _ in ev.batches[split]])
            y = torch.cat([by for _, by in ev.batches[split]])
            with torch.no_grad():
                logits = ev.model(x).double()
            losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
            hits = (logits.argmax(1) == y).double().numpy()
            assert values[f"{split}_loss"] == pytest.approx(losses.mean(), rel=1e-6)
            assert values[f"{split}_loss_stderr"] == pytest.approx(losses.std(ddof=1) / np.sqrt(len(y)), rel=1e-4)
            assert values[f"{split}_acc"] == pytest.approx(100 * hits.mean(), abs=1e-9)


def test_calibration_keeps_what_its_timings_favour_and_restores_data():
    """The K kept is the fastest timed one if it beats K=1 by 10 %, else 1: read from the timings the
    calibration logs (2 decimals of a millisecond, so a ratio within 0.5 % of the 0.9 line is not judged)."""
    ev = _evaluator("mlp", "digits", "weights", 1)
    before = {s: len(b) for s, b in ev.batches.items()}
    lines: list[str] = []
    k = ev.calibrate(candidates=(1, 2, 4), log=lines.append)
    timings = {int(c): float(ms) for c, ms in re.findall(r"K=(\d+): ([\d.]+) ms", lines[0])}
    assert 1 in timings and set(timings) <= {1, 2, 4} and ev.points_per_pass == k, lines
    best = min(timings, key=timings.__getitem__)
    if abs(timings[best] / timings[1] - 0.9) > 0.0045:
        assert k == (best if timings[best] < 0.9 * timings[1] else 1), lines
    assert lines[0].endswith(f"-> points per pass {k}")
    assert {s: len(b) for s, b in ev.batches.items()} == before
    assert ev.evaluate(0.2, 0.1)["train_loss"] == pytest.approx(
        _evaluator("mlp", "digits", "weights", 1).evaluate(0.2, 0.1)["train_loss"], rel=1e-5)


@pytest.mark.parametrize("points", [10, 10_000, None])
def test_calibration_is_skipped_when_the_run_cannot_pay_for_it(points):
    """Digits in batches of 48 is 38 batches. Timing K=1 and K=2 (warm-up and 3 repeats each, on
    2 batches) and the per-point estimate cost at least (4·3 + 4)·2/38 = 0.84 points: more than 3 %
    of a 10-point run, so nothing is timed; a 10,000-point run (or an unbounded call) times both."""
    ev = _evaluator("mlp", "digits", "weights", 1)
    sizes, messages = [], []
    timed = ev.evaluate_many
    ev.evaluate_many = lambda pts: sizes.append(len(pts)) or timed(pts)
    k = ev.calibrate(points=points, log=messages.append)
    if points == 10:
        assert (sizes, k) == ([], 1) and messages == ["calibration skipped: 10 points are too few to pay for it "
                                                      "-> points per pass 1"]
    else:
        assert {1, 2} <= set(sizes) and k in sizes and messages[0].startswith("calibration (per point, 2 batches)")


def test_calibration_needs_the_per_point_baseline_and_leaves_k_alone_on_error():
    ev = _evaluator("mlp", "digits", "weights", 1)
    with pytest.raises(ValueError, match="must start with 1"):
        ev.calibrate(candidates=(2, 4))
    def interrupted_at_k4(pts):
        if len(pts) == 4:
            raise KeyboardInterrupt

    ev.evaluate_many = interrupted_at_k4
    with pytest.raises(KeyboardInterrupt):
        ev.calibrate(candidates=(1, 4))
    assert ev.points_per_pass == 1 and set(ev.batches) == {"train", "test"}


def test_channels_last_and_bf16_autocast(tmp_path):
    """channels-last changes only the layout; bf16 autocast changes values at the 1e-2 level only."""
    from lsurf import Grid, sample_surface

    def run(name, **kw):
        torch.manual_seed(0)
        data = load_data("synthetic:shape=3x16x16,n=24", ("train",))  # bf16 without AVX-512: ~10x float32
        model = load_model("resnet20", None, None).eval()
        dirs = random_directions(model, seed=1)
        grid = Grid.parse("-0.5:0.5:3", "-0.5:0.5:2")
        return sample_surface(model, data, dirs, grid, tmp_path / name, progress=False, **kw).values["train_loss"]

    plain = run("plain.h5", layout="contiguous")
    np.testing.assert_allclose(run("cl.h5", layout="channels-last"), plain, rtol=1e-5)
    np.testing.assert_allclose(run("auto.h5"), plain, rtol=1e-5)  # layout measured at start
    with h5py.File(tmp_path / "cl.h5") as f, h5py.File(tmp_path / "plain.h5") as g:
        assert f.attrs["channels_last"] == 1 and g.attrs["channels_last"] == 0
    amp = run("amp.h5", amp="bf16", layout="contiguous")
    assert not np.array_equal(amp, plain)
    np.testing.assert_allclose(amp, plain, rtol=3e-2)
