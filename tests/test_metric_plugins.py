"""A user's own additive metric (``metric`` ``pkg.module:factory``): its values against numpy on
the linear model's closed form, the same on every evaluation path, part of the identity, and
every way a plug-in can be wrong refused in one line before any file is written."""

from __future__ import annotations

import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, D, lsurf, mpirun, requires_mpi

import lsurf as api
from lsurf.errors import UserError

METRICS = '''
import torch

class MeanOutput:
    """The mean model output: sums [Σ out, samples]."""
    name = "mean_out"
    def sums(self, outputs, targets):
        return torch.stack([outputs.double().sum(), torch.tensor(float(len(outputs)), dtype=torch.float64)])
    def value(self, sums):
        return sums[0] / sums[1]

class Hits:
    """Top-1 accuracy in percent, as a plug-in: the built-in ``acc`` by another road."""
    name = "hits"
    def sums(self, outputs, targets):
        right = (outputs.argmax(-1) == targets).sum().double()
        return torch.stack([right, torch.tensor(float(len(targets)), dtype=torch.float64)])
    def value(self, sums):
        return 100 * (sums[0] / sums[1])  # the built-in order: the same float

def mean_output():
    return MeanOutput()

def hits():
    return Hits()

def raises():
    raise RuntimeError("no licence")

def no_value():
    m = MeanOutput()
    return type("Half", (), {"name": "half", "sums": m.sums})()

def named(name):
    m = MeanOutput()
    m.name = name
    return m

def clash():
    return named("loss_stderr")

def bad_name():
    return named("mean out")

class PerSample(MeanOutput):
    name = "per_sample"
    def sums(self, outputs, targets):  # one value per sample: its length follows the batch
        return outputs.double().reshape(len(outputs), -1).sum(1)

def per_sample():
    return PerSample()

class TwoD(MeanOutput):
    name = "two_d"
    def sums(self, outputs, targets):
        return super().sums(outputs, targets)[None]

def two_d():
    return TwoD()
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(METRICS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_metrics", raising=False)  # this test's file, not an earlier one's
    return tmp_path


def _linear(regression, two: bool = False):
    data = api.load_data("regdata:make")
    model = api.load_model("linear", (D,), 1, regression["dir"] / "lin.pt", dtype=torch.float64)
    return model, data, api.random_directions(model, seed=5, two=two)


@pytest.mark.parametrize("k", [1, 3])
def test_a_plugin_metric_is_its_closed_form_at_every_point(k, regression, plugins, tmp_path):
    model, data, dirs = _linear(regression, two=True)
    grid = api.Grid.parse("-1:1:5", "-0.5:0.5:3")
    surface = api.sample_surface(model, data, dirs, grid, tmp_path / "s.h5", loss="mse", dtype=torch.float64,
                                 metric=("my_metrics:mean_output",), points_per_pass=k, progress=False)
    dx, dy = [t.numpy() for t in dirs.x], [t.numpy() for t in dirs.y]
    expected = np.empty(grid.plane_shape)
    for j, b in enumerate(grid.y):
        for i, a in enumerate(grid.x):
            w = regression["w0"] + a * dx[0] + b * dy[0]
            expected[j, i] = np.mean(regression["x"] @ w.T + regression["b0"] + a * dx[1] + b * dy[1])
    np.testing.assert_allclose(surface.values["train_mean_out"], expected, rtol=1e-12, atol=1e-12)
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["train_mean_out"].shape == (3, 5) and f["done"][()].all()


def test_the_metrics_are_part_of_the_identity(regression, plugins, tmp_path):
    model, data, dirs = _linear(regression)
    grid, out = api.Grid.parse("-1:1:3"), tmp_path / "s.h5"
    run = lambda **kw: api.sample_surface(model, data, dirs, grid, out, loss="mse", dtype=torch.float64,  # noqa: E731
                                          progress=False, **kw)
    run(metric=("my_metrics:mean_output",))
    before = out.read_bytes()
    for other in [(), ("my_metrics:hits",)]:
        with pytest.raises(UserError, match="overwrite"):
            run(metric=other)
        assert out.read_bytes() == before  # refused, untouched
    assert run(metric=["my_metrics:mean_output"]).done.all()  # the same plug-in resumes (a list from a notebook)


BAD = {
    "raises": "metric plug-in 'my_metrics:raises' raised RuntimeError: no licence",
    "no_value": "has no value (expected name, sums(outputs, targets), value(sums))",
    "clash": "name 'loss_stderr' is already a quantity",
    "bad_name": "name 'mean out' must be a word of letters, digits and _",
    "per_sample": "sums returned (1,), but its first call returned 2 values",
    "two_d": "sums must return a 1-D float tensor",
    "nowhere": "cannot import 'my_metricz'",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_is_one_line_before_any_file(case, regression, plugins, tmp_path):
    model, data, dirs = _linear(regression)
    spec = "my_metricz:x" if case == "nowhere" else f"my_metrics:{case}"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        api.sample_surface(model, data, dirs, api.Grid.parse("-1:1:3"), tmp_path / "s.h5", loss="mse",
                           dtype=torch.float64, metric=(spec,), progress=False)
    assert BAD[case] in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "s.h5").exists() and not list(tmp_path.glob("*.h5*"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_two_plugins_with_one_name_are_refused(regression, plugins, tmp_path):
    model, data, dirs = _linear(regression)
    with pytest.raises(UserError, match="name 'mean_out' is already a quantity"):
        api.sample_surface(model, data, dirs, api.Grid.parse("-1:1:3"), tmp_path / "s.h5", loss="mse",
                           metric=("my_metrics:mean_output", "my_metrics:mean_output"), progress=False)


@pytest.mark.cli
def test_the_flag_is_one_line_and_exit_2_on_a_bad_plugin(plugins, tmp_path):
    p = lsurf("surface", "--data", "digits", "--subset", "64", "--x", "-1:1:3", "--metric", "my_metrics:clash",
              "--out", tmp_path / "s.h5", "--no-progress", env={"PYTHONPATH": str(plugins)})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already a quantity" in p.stderr, p.stderr
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.mpi
@requires_mpi
def test_rank_groups_add_a_plugins_sums(plugins, tmp_path):
    """4 ranks in groups of 2, stacked passes: the plug-in's accuracy is the built-in one, exactly."""
    out = tmp_path / "s.h5"
    mpirun(4, "surface", "--data", "digits", "--subset", "301", "--split", "train,test", "--x", "-1:1:3",
           "--y", "-1:1:2", "--ranks-per-point", 2, "--points-per-pass", 2, "--metric", "my_metrics:hits",
           "--metric", "my_metrics:mean_output", "--out", out, "--no-progress",
           env={"PYTHONPATH": str(plugins)}, check=True)
    with h5py.File(out) as f:
        for split in ("train", "test"):
            np.testing.assert_array_equal(f[f"{split}_hits"][()], f[f"{split}_acc"][()])
        assert np.isfinite(f["test_mean_out"][()]).all()
        assert '"metrics": ["my_metrics:hits", "my_metrics:mean_output"]' in f.attrs["identity"]


def test_the_readme_example_metric_runs_and_is_top5(tmp_path, monkeypatch):
    """The README's ``my_metrics.py``, as printed there, against top-5 accuracy counted by hand at θ*."""
    text = (REPO / "README.md").read_text().split("**Your own metric**")[1]
    block = text.split("```python\n")[1].split("```")[0]
    (tmp_path / "my_metrics.py").write_text(textwrap.dedent(block))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_metrics", raising=False)
    data = api.load_data("digits", splits=("train",), subset=200)
    model = api.load_model("cnn", (1, 8, 8), 10, dtype=torch.float64)
    surface = api.sample_surface(model, data, api.random_directions(model, seed=1, two=False), api.Grid.parse("-1:1:3"),
                                 tmp_path / "s.h5", dtype=torch.float64, metric=("my_metrics:top5",), progress=False)
    x, y = data["train"].rows(0, len(data["train"]))
    with torch.no_grad():
        hits = (model(x.double()).topk(5, -1).indices == y[:, None]).any(-1).double().mean().item()
    assert surface.values["train_top5"][1] == pytest.approx(100 * hits, abs=1e-12)
    assert (surface.values["train_top5"] >= surface.values["train_acc"]).all()
