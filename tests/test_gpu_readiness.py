"""GPU readiness: what a review of the CUDA path found, checked on the CPU where the logic is
device-independent, and on a GPU (tests that skip without one) where it is not.

``bash jobs/gpu_check.sh`` runs the CUDA tests (marked ``gpu``) with the rest of the first check of
a GPU node.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import _env, lsurf, mpirun, requires_mpi
from torch import nn

import lsurf as api
from lsurf.engine.data.stores import save_store
from lsurf.engine.evaluation.evaluate import evaluator
from lsurf.run.runtime import configure_process, float32_precision, set_float32_precision
from lsurf.run.sampler import run_surface

CURVE = ["--x", "-1:1:3", "--no-progress"]


def cuda(test):
    """Needs a GPU: marked ``gpu`` (what jobs/gpu_check.sh runs, a skip counting as a failure there)
    and skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def _one_line(p, pattern: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], p.stderr


@pytest.mark.cli
def test_a_cuda_index_beyond_the_visible_devices_is_one_line(tmp_path):
    p = lsurf("surface", "--device", "cuda:99", "--model", "cnn", "--data", "digits", *CURVE,
              "--out", tmp_path / "s.h5")
    _one_line(p, f"sees {torch.cuda.device_count()} CUDA device")


@pytest.mark.cli
def test_labels_beyond_the_model_outputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "tenway.py").write_text(textwrap.dedent("""
        import torch
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    """))
    env = {"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"}
    p = lsurf("surface", "--model", "tenway:model", "--data", "synthetic:shape=64,classes=12,n=300", *CURVE,
              "--out", tmp_path / "s.h5", env=env)
    _one_line(p, "class labels 0 to 11, but the model gives 10 outputs per sample")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.cli
def test_int32_labels_give_the_int64_numbers(tmp_path, digits_checkpoint):
    data = api.load_data("digits", ("train",), 300)["train"]
    outs = {}
    for kind in (np.int64, np.int32):
        store = f"npy:{tmp_path / kind.__name__}"
        save_store(store, {"train": (data.x.numpy(), data.y.numpy().astype(kind))})
        outs[kind] = tmp_path / f"{kind.__name__}.h5"
        lsurf("surface", "--model", "cnn", "--checkpoint", digits_checkpoint, "--data", store, *CURVE,
              "--dtype", "float64", "--points-per-pass", "1", "--out", outs[kind], check=True)
    with h5py.File(outs[np.int64]) as a, h5py.File(outs[np.int32]) as b:
        for k in ("train_loss", "train_acc"):
            np.testing.assert_allclose(a[k][()], b[k][()], rtol=1e-12)


def test_float32_precision_is_pinned_to_ieee_unless_tf32(tf32_flags):
    configure_process(device="cpu", threads=torch.get_num_threads())
    assert float32_precision() == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    set_float32_precision(True)
    assert float32_precision() == "tf32"


def _surface_args(checkpoint, out) -> list:
    return ["surface", "--model", "cnn", "--checkpoint", checkpoint, "--data", "digits", "--subset", "50", *CURVE,
            "--out", out]


def _interrupted(out) -> None:
    with h5py.File(out, "r+") as f:  # pretend it was interrupted: resuming checks the identity
        f["done"][0] = False


@pytest.mark.cli
def test_the_precision_in_force_is_recorded_and_a_resume_across_another_is_refused(tmp_path, digits_checkpoint):
    """The file records what computes (on the CPU oneDNN's float32 precision; --tf32 is a GPU
    switch that changes nothing there), and a library call records it without changing it."""
    out = tmp_path / "s.h5"
    args = _surface_args(digits_checkpoint, out)
    lsurf(*args, "--tf32", check=True)
    with h5py.File(out) as f:
        assert json.loads(f.attrs["identity"])["float32_precision"] == "ieee"
    _interrupted(out)
    assert lsurf(*args, check=True).returncode == 0  # the same values: resumed
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # a notebook's choice: oneDNN matmuls may use bf16
        options = api.Options(model="cnn", checkpoint=str(digits_checkpoint), data="digits", subset=50, x="-1:1:3",
                              device="cpu", out=str(out), overwrite=True, progress=False)
        run_surface(options)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # recorded, not changed
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    _interrupted(out)
    _one_line(lsurf(*args), "another float32 precision ('matmul bf16, conv ieee', now 'ieee'): use --overwrite")


@pytest.mark.cli
def test_a_file_written_before_the_precision_was_recorded_still_resumes(tmp_path, digits_checkpoint):
    out = tmp_path / "s.h5"
    args = _surface_args(digits_checkpoint, out)
    lsurf(*args, check=True)
    with h5py.File(out, "r+") as f:
        identity = json.loads(f.attrs["identity"])
        del identity["float32_precision"]
        f.attrs["identity"] = json.dumps({**identity, "tf32": False})  # as files were written before
    _interrupted(out)
    lsurf(*args, check=True)
    with h5py.File(out) as f:
        assert f["done"][()].all()


@cuda
@pytest.mark.cli
def test_a_resume_on_another_gpu_model_is_refused(tmp_path, digits_checkpoint):
    out = tmp_path / "s.h5"
    args = [*_surface_args(digits_checkpoint, out), "--device", "cuda"]
    lsurf(*args, check=True)
    with h5py.File(out, "r+") as f:
        identity = json.loads(f.attrs["identity"])
        assert identity["gpu_model"] == torch.cuda.get_device_name(0) and identity["float32_precision"] == "ieee"
        f.attrs["identity"] = json.dumps({**identity, "gpu_model": "Another GPU"})
    _interrupted(out)
    _one_line(lsurf(*args), "another gpu model ('Another GPU'")


@pytest.fixture
def tf32_flags():
    """torch's TF32 switches as they were (the legacy getters are readable in torch's own state)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("tf32", [False, True])
def test_both_tf32_apis_stay_readable_and_agree_after_configure_process(tf32, tf32_flags):
    """Plug-ins, Hugging Face and compiled code read the legacy getters: torch raises from them
    when only the new ``fp32_precision`` flags were set."""
    configure_process(device="cpu", threads=torch.get_num_threads(), tf32=tf32)
    mode = "tf32" if tf32 else "ieee"
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        assert torch.backends.cuda.matmul.fp32_precision == mode
        assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cudnn.rnn.fp32_precision == mode
    assert float32_precision() == mode


JOBS = ["surface", "curve", "hessian", "sharpness"]


@pytest.mark.parametrize("command", JOBS)
def test_every_mpi_job_configures_through_the_device_binding_check(command):
    """Running it cannot show the check on a CPU (every rank's device is the CPU, never shared);
    what can be shown is that each job's entry point configures through configure_job, which
    makes it, and never around it."""
    source = inspect.getsource(importlib.import_module(f"lsurf.cli.{command}"))
    assert "configure_job(" in source and "configure_process(" not in source


@cuda
@requires_mpi
@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("command", JOBS)
def test_two_ranks_on_one_gpu_are_refused_by_every_job(command, tmp_path, digits_checkpoint):
    inputs = ["--model", "cnn", "--checkpoint", digits_checkpoint, "--data", "digits", "--subset", "100",
              "--device", "cuda"]
    args = {"surface": ["surface", *inputs, *CURVE, "--out", tmp_path / "s.h5"],
            "curve": ["curve", "train", *inputs, "--model2", digits_checkpoint, "--out", tmp_path / "c.h5"],
            "hessian": ["hessian", *inputs, "--top-k", "1", "--trace-samples", "0"],
            "sharpness": ["sharpness", *inputs, "--radius", "0.1", "--out", tmp_path / "h.h5"]}[command]
    p = mpirun(2, *args, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert p.returncode == 2 and "share GPU" in p.stderr, p.stderr


def test_recalibration_with_numeric_momentum_equals_the_cumulative_average():
    data = api.load_data("synthetic:shape=3x8x8,n=300", ("train",))
    model = api.load_model("resnet20", (3, 8, 8), 10, seed=0)
    reference = copy.deepcopy(model)
    dirs = api.random_directions(model, seed=0)
    with evaluator(model, data, dirs, bn="recalibrate", batch_size=64) as ev:
        ev.set_point(0.2, -0.1)
        ev._recalibrate_bn()
        got = [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean,
                                                                                              m.running_var)]
        ref_ev_weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # torch's own cumulative average: momentum None, one pass in train mode
        for p, w in zip(reference.parameters(), ref_ev_weights):
            p.copy_(w)
        bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        reference.train()
        x = data["train"].x
        for i in range(0, len(x), 64):
            reference(x[i:i + 64])
    want = [t for m in bns for t in (m.running_mean, m.running_var)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_directions_take_the_layout_of_channels_last_weights():
    model = api.load_model("resnet20", None, None, seed=0)
    dirs = api.random_directions(model, seed=0)
    weights = api.engine.geometry.directions.target_tensors(model.to(memory_format=torch.channels_last), "weights")[1]
    laid = dirs.like(weights)
    assert all(torch.equal(a, b) for a, b in zip(dirs.x, laid.x))
    assert all(d.stride() == w.stride() for d, w in zip(laid.x + laid.y, weights + weights))


class _Unbatchable(nn.Module):
    """A model vmap cannot stack (``.item()`` of a weight inside the forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)) * float(self.lin.weight.abs().max().item() > -1)


def test_calibration_says_why_stacking_stopped():
    data = api.load_data("digits", ("train",), 200)
    model = _Unbatchable()
    lines: list[str] = []
    with evaluator(model, data, api.random_directions(model, seed=0)) as ev:
        assert ev.calibrate(log=lines.append) == 1
    assert "stopped: K=2 failed" in lines[-1], lines


# --- on a GPU ---------------------------------------------------------------------------------

def _cnn_and_data():
    data = api.load_data("digits", ("train",), 256)
    model = api.load_model("cnn", (1, 8, 8), 10, seed=0)
    return model, data, api.random_directions(model, seed=1)


@cuda
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_stacked_equals_per_point(amp):
    model, data, dirs = _cnn_and_data()
    configure_process(device="cuda", threads=1)
    points = [(a, b) for a in (-0.5, 0.0, 0.5) for b in (-0.25, 0.25)]
    with evaluator(model, data, dirs, device="cuda", amp=amp) as ev:
        single = ev.evaluate_many(points)
        ev.points_per_pass = 3
        stacked = ev.evaluate_many(points)
    tol = 2e-2 if amp else 1e-5
    for s, k in zip(single, stacked):
        for q in s:
            assert k[q] == pytest.approx(s[q], rel=tol, abs=tol), q


@cuda
def test_cuda_equals_cpu_in_ieee_float32():
    model, data, dirs = _cnn_and_data()
    configure_process(device="cuda", threads=1)  # pins IEEE float32
    with evaluator(model, data, dirs) as ev:
        cpu = ev.evaluate(0.3, -0.2)
    with evaluator(model, data, dirs, device="cuda") as ev:
        gpu = ev.evaluate(0.3, -0.2)
    assert gpu["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-6)


@cuda
def test_cuda_pass_makes_no_host_sync_beyond_the_one_per_point():
    model, data, dirs = _cnn_and_data()
    configure_process(device="cuda", threads=1)
    with evaluator(model, data, dirs, device="cuda") as ev:
        ev.evaluate(0.1, 0.1)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = ev._single(0.2, 0.1)  # one pass, sums left on the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pending.is_cuda


@cuda
def test_cuda_hessian_start_vectors_match_the_cpu():
    model, data, _ = _cnn_and_data()
    split = data["train"]
    from lsurf.engine.curvature.hessian import Hessian
    from lsurf.engine.evaluation.losses import resolve_loss

    values = []
    for dev in ("cpu", "cuda"):
        m = copy.deepcopy(model).double().to(dev)
        batches = [(split.x.double().to(dev), split.y.to(dev))]
        values.append(Hessian(m, batches, resolve_loss("cross_entropy")).extreme_eigenvalues(20))
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6)


@cuda
def test_cuda_tensors_from_a_plugin_fingerprint():
    split = api.engine.data.splits.Split(torch.randn(4, 3, device="cuda"), torch.arange(4, device="cuda"))
    assert len(split.fingerprint()) == 64
