"""The steps of jobs/gpu_check.py, one function each, run one per process by ``gpu_check.py --step NAME``.

A step returns (ok, one line saying why) and records its figures with ``ctx.record``; it raises
:class:`Skip` when it cannot apply here, :class:`Fatal` when the node cannot run the check at all.
Models are ResNet-20 with BatchNorm statistics and affine parameters drawn from a seed (a fresh
model's BatchNorm is the identity up to eps and would hide a BatchNorm bug). In ``--cpu`` mode the
comparisons use 3x8x8 images and the headline a few hundred 3x32x32 ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

import lsurf
from lsurf.engine.data.batches import head
from lsurf.engine.evaluation.evaluate import evaluator
from lsurf.engine.evaluation.plan import default_batch_size, faster_in_channels_last
from lsurf.run.runtime import configure_process, float32_precision, set_float32_precision

ROOT = Path(__file__).resolve().parents[1]
POINTS = [(0.0, 0.0), (0.4, -0.3), (-0.7, 0.5)]
Values = list[dict[str, float]]


class Skip(Exception):
    """The step does not apply on this node (e.g. no mpirun): reported as skipped, with why."""


class Fatal(Exception):
    """The node cannot run the check at all (no CUDA): the driver stops with this one line."""


@dataclass
class Ctx:
    cpu: bool
    out: Path
    partial: Path  # figures recorded so far, for the driver if the step is stopped
    numbers: dict = field(default_factory=dict)

    @property
    def dev(self) -> torch.device:
        return torch.device("cpu" if self.cpu else "cuda")

    def size(self, gpu: int, cpu: int) -> int:
        return cpu if self.cpu else gpu

    @property
    def batch(self) -> int:
        """Batch size of the comparison steps: several batches per split."""
        return self.size(128, 16)

    @property
    def shape(self) -> str:
        """Image shape of the comparison steps (small on the CPU: the check's own plumbing)."""
        return "3x8x8" if self.cpu else "3x32x32"

    def record(self, **figures) -> None:
        self.numbers.update(figures)
        self.partial.write_text(json.dumps(self.numbers, default=str))

    def configure(self) -> None:
        """What the CLI sets: threads (one in --cpu mode: CI machines are small), IEEE float32."""
        configure_process(device=self.dev.type, threads=1 if self.cpu else None)


# --- shared pieces ----------------------------------------------------------------------------

def bn_resnet20(shape: str = "3x32x32", seed: int = 0) -> nn.Module:
    """ResNet-20 whose BatchNorm layers act in eval mode, as a trained checkpoint's do."""
    in_shape = tuple(int(s) for s in shape.split("x"))
    model = lsurf.load_model("resnet20", in_shape, 10, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                assert m.running_mean is not None and m.running_var is not None  # tracked in the zoo's models
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model


def setup(ctx: Ctx, n: int, splits: tuple[str, ...] = ("train", "test"), shape: str | None = None):
    """(model, data, directions): BatchNorm ResNet-20, ``n`` synthetic training images (and n/5 test)."""
    shape = shape or ctx.shape
    model = bn_resnet20(shape)
    data = lsurf.load_data(f"synthetic:shape={shape},n={n}", splits)
    return model, data, lsurf.random_directions(model, seed=1)


def values(model: nn.Module, data, dirs, points: Sequence[tuple[float, float]], points_per_pass: int = 1,
           **kw) -> Values:
    with evaluator(model, data, dirs, points_per_pass=points_per_pass, **kw) as ev:
        return ev.evaluate_many(list(points))


def worst(ref: Values, got: Values, suffix: str = "_loss") -> float:
    """Largest relative difference of the quantities named ``*suffix`` (absolute for ``_acc``)."""
    def diff(a: float, b: float) -> float:
        return abs(a - b) if suffix == "_acc" else abs(a - b) / max(abs(a), 1e-30)
    return max(diff(r[q], g[q]) for r, g in zip(ref, got) for q in r if q.endswith(suffix))


def same(ref: Values, got: Values) -> bool:
    """Bit for bit (NaN equal to NaN)."""
    return all(np.array_equal(np.array(list(r.values())), np.array(list(g.values())), equal_nan=True)
               and r.keys() == g.keys() for r, g in zip(ref, got)) and len(ref) == len(got)


def run_logged(cmd: Sequence[object], timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` from the repository root, its output copied to this step's log as it comes."""
    print("$", " ".join(map(str, cmd)), flush=True)
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return p.wait(timeout=timeout), "".join(lines)


def last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


# --- preflight --------------------------------------------------------------------------------

OPTIONAL = {"sklearn": "the digits data of the CUDA tests", "tqdm": "progress bars", "mpi4py": "MPI runs",
            "transformers": "hf: models", "pytest": "the CUDA tests", "scipy": "standard errors"}


def preflight(ctx: Ctx) -> tuple[bool, str]:
    """Versions, the GPUs, h5py's MPI build, mpirun; no CUDA (without --cpu) ends the check."""
    n: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "lsurf": f"{lsurf.__version__} ({Path(lsurf.__file__).parent})", "numpy": np.__version__,
               "h5py": h5py.version.version, "h5py_mpi": bool(h5py.get_config().mpi),
               "mpirun": shutil.which("mpirun"), "modules": {m: bool(importlib.util.find_spec(m)) for m in OPTIONAL}}
    n["mpi_library"] = _mpirun_version(n["mpirun"])
    n["fp32_precision_api"] = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
        getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
    n["gpus"] = [_gpu(i) for i in range(torch.cuda.device_count())] if cuda else []
    ctx.record(**n)
    if not n["fp32_precision_api"]:
        raise Fatal(f"torch {torch.__version__} lacks torch.backends.cudnn.conv.fp32_precision, which lsurf's "
                    "float32 pinning needs (torch >= 2.9)")
    if not cuda and not ctx.cpu:
        why = f" ({last_line(str(caught[-1].message))})" if caught else ""
        raise Fatal(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees "
                    f"{torch.cuda.device_count()} GPU(s){why}; run on a GPU node, or pass --cpu")
    return True, _describe(n)


def _gpu(i: int) -> dict:
    p = torch.cuda.get_device_properties(i)
    return {"name": p.name, "uuid": str(getattr(p, "uuid", "")), "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}"}


def _mpirun_version(mpirun: str | None) -> str | None:
    if mpirun is None:
        return None
    try:
        p = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "unknown"


def _describe(n: dict) -> str:
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in n["gpus"]) or "no GPU"
    missing = [f"{m} ({OPTIONAL[m]})" for m, ok in n["modules"].items() if not ok]
    return (f"Python {n['python']}, torch {n['torch']}, CUDA {n['cuda']}, cuDNN {n['cudnn']}; {gpus}; "
            f"h5py {n['h5py']} {'with' if n['h5py_mpi'] else 'without'} MPI; mpirun: {n['mpirun'] or 'none'}"
            + (f"; missing: {', '.join(missing)}" if missing else ""))


# --- the CUDA tests ---------------------------------------------------------------------------

def cuda_tests(ctx: Ctx) -> tuple[bool, str]:
    """The tests in tests/ marked ``gpu``; one skipped is a failure (it did not run on the GPU). A
    module skipped whole for want of an optional module (vtk, ...) is only reported."""
    report = ctx.out / "cuda_tests.xml"
    report.unlink(missing_ok=True)
    rc, text = run_logged([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--junitxml={report}", "-m", "gpu", "tests"])
    if not report.exists():
        return False, f"pytest exit status {rc}, no report: {last_line(text)}"
    counts = junit_counts(report)
    ctx.record(**counts)
    why = f"{counts['passed']} passed, {len(counts['failed'])} failed, {len(counts['skipped'])} skipped"
    if counts["failed"]:
        why += f"; failed: {', '.join(counts['failed'][:4])}"
    if counts["skipped"]:
        why += f"; skipped (a failure here: it did not run on the GPU): {counts['skipped'][0]}"
    if counts["not_collected"]:
        why += f"; modules not collected: {', '.join(counts['not_collected'])}"
    return not counts["failed"] and not counts["skipped"] and counts["passed"] > 0, why


def junit_counts(path: Path) -> dict:
    """{passed: n, failed: [test], skipped: ['test: reason'], not_collected: [module]} from pytest's
    junit xml (a module skipped at collection has an empty class name)."""
    counts: dict = {"passed": 0, "failed": [], "skipped": [], "not_collected": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name, skip = case.get("name", "?"), case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"].append(name)
        elif skip is not None and not case.get("classname"):
            counts["not_collected"].append(name)
        elif skip is not None:
            counts["skipped"].append(f"{name}: {skip.get('message', '')}")
        else:
            counts["passed"] += 1
    return counts


# --- GPU = CPU --------------------------------------------------------------------------------

def bn_ieee(ctx: Ctx) -> tuple[bool, str]:
    """ResNet-20 with BatchNorm: the GPU's IEEE float32 = the CPU's; TF32's distance shown beside."""
    ctx.configure()
    model, data, dirs = setup(ctx, ctx.size(512, 64))
    cpu = values(model, data, dirs, POINTS, batch_size=ctx.batch)
    gpu = values(model, data, dirs, POINTS, batch_size=ctx.batch, device=ctx.dev)
    set_float32_precision(True)
    try:
        tf32_mode = float32_precision()
        tf32 = values(model, data, dirs, POINTS, batch_size=ctx.batch, device=ctx.dev)
    finally:
        set_float32_precision(False)
    ieee, t = worst(cpu, gpu), worst(cpu, tf32)
    ctx.record(ieee_rel_loss=ieee, ieee_abs_acc=worst(cpu, gpu, "_acc"), tf32_rel_loss=t, tf32_mode=tf32_mode,
               ieee_mode=float32_precision(), cpu=cpu, gpu=gpu)
    return ieee <= 1e-5, f"IEEE float32 rel {ieee:.1e} (need <= 1e-5); TF32 rel {t:.1e} (shown only)"


def bn_recalibrate(ctx: Ctx) -> tuple[bool, str]:
    """``--bn recalibrate``: statistics re-estimated at each point on the GPU = on the CPU."""
    ctx.configure()
    model, data, dirs = setup(ctx, ctx.size(512, 64))
    cpu = values(model, data, dirs, POINTS[1:], bn="recalibrate", batch_size=ctx.batch)
    gpu = values(model, data, dirs, POINTS[1:], bn="recalibrate", batch_size=ctx.batch, device=ctx.dev)
    err = worst(cpu, gpu)
    ctx.record(rel_loss=err, abs_acc=worst(cpu, gpu, "_acc"), cpu=cpu, gpu=gpu)
    return err <= 1e-5, f"rel {err:.1e} (need <= 1e-5)"


def hessian(ctx: Ctx) -> tuple[bool, str]:
    """λ_max, λ_min at a point in float64 (what ``--hessian`` stores): GPU = CPU."""
    ctx.configure()
    # Small images: double back-propagation in float64 is slow on the CPU, and the image size
    # changes nothing in what is compared.
    model, data, dirs = setup(ctx, ctx.size(64, 32), ("train",), shape="3x8x8")
    kw: dict[str, Any] = dict(dtype=torch.float64, hessian_iters=ctx.size(20, 10), batch_size=ctx.batch)
    cpu = values(model, data, dirs, [(0.2, -0.1)], **kw)[0]
    gpu = values(model, data, dirs, [(0.2, -0.1)], device=ctx.dev, **kw)[0]
    scale = max(abs(cpu["hessian_max"]), abs(cpu["hessian_min"]), 1e-30)
    errs = {q: abs(cpu[q] - gpu[q]) / scale for q in ("hessian_max", "hessian_min")}
    errs["train_loss"] = abs(cpu["train_loss"] - gpu["train_loss"]) / abs(cpu["train_loss"])
    ctx.record(rel=errs, cpu=cpu, gpu=gpu)
    ok = max(errs["hessian_max"], errs["hessian_min"]) <= 1e-6 and errs["train_loss"] <= 1e-10
    return ok, (f"λ_max {cpu['hessian_max']:.4g}: rel {errs['hessian_max']:.1e}, λ_min rel {errs['hessian_min']:.1e} "
                f"(need <= 1e-6); loss rel {errs['train_loss']:.1e} (need <= 1e-10)")


# --- equal paths on one device ----------------------------------------------------------------

def stacked(ctx: Ctx) -> tuple[bool, str]:
    """K=3 points per vmap-ed forward = one per pass, in float32/bf16 x NCHW/NHWC, with BatchNorm."""
    ctx.configure()
    model, data, dirs = setup(ctx, ctx.size(512, 64))
    points = [(a, b) for a in (-0.5, 0.0, 0.5) for b in (-0.25, 0.25)]
    errs, ok = {}, True
    for amp in (False, True):
        for channels_last in (False, True):
            kw: dict[str, Any] = dict(device=ctx.dev, batch_size=ctx.batch, amp=amp, channels_last=channels_last)
            label = ("bf16" if amp else "fp32") + ("+NHWC" if channels_last else "")
            errs[label] = worst(values(model, data, dirs, points, **kw), values(model, data, dirs, points, 3, **kw))
            ok &= errs[label] <= (2e-2 if amp else 1e-5)
            ctx.record(rel_loss=errs)
    return ok, "K=3 vs per point, rel loss: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + \
        " (need <= 1e-5; bf16 <= 2e-2)"


def streamed(ctx: Ctx) -> tuple[bool, str]:
    """Batches read afresh at every point by a loader process = batches held on the device."""
    ctx.configure()
    model, data, dirs = setup(ctx, ctx.size(512, 64))
    kw: dict[str, Any] = dict(device=ctx.dev, batch_size=ctx.batch)
    resident = values(model, data, dirs, POINTS, **kw)
    stream = values(model, data, dirs, POINTS, streamed=("train", "test"), workers=1, **kw)
    ctx.record(resident=resident, streamed=stream, rel_loss=worst(resident, stream))
    return same(resident, stream), ("bit for bit" if same(resident, stream) else
                                    f"NOT bit for bit: rel loss {worst(resident, stream):.1e}")


def regenerated(ctx: Ctx) -> tuple[bool, str]:
    """Directions drawn again tensor by tensor at every point = the same directions held whole."""
    ctx.configure()
    model, data, _ = setup(ctx, ctx.size(512, 64))
    kw: dict[str, Any] = dict(device=ctx.dev, batch_size=ctx.batch)
    held = values(model, data, lsurf.random_directions(model, seed=1), POINTS, **kw)
    again = values(model, data, lsurf.random_directions(model, seed=1, regenerate=True), POINTS, **kw)
    ctx.record(held=held, regenerated=again, rel_loss=worst(held, again))
    return same(held, again), ("bit for bit" if same(held, again) else
                               f"NOT bit for bit: rel loss {worst(held, again):.1e}")


# --- host synchronisations --------------------------------------------------------------------

def syncs(ctx: Ctx) -> tuple[bool, str]:
    """Host synchronisations per pass on each evaluation path, counted by torch's sync debug mode
    (warn): one per pass (reading the sums back) is the design; more stall the GPU."""
    ctx.configure()
    model, data, dirs = setup(ctx, ctx.size(512, 64))
    cases: dict[str, tuple[dict[str, Any], int, int]] = {  # label: (evaluator options, K, points)
        "per point": ({}, 1, 4), "stacked K=4": ({}, 4, 8), "bn recalibrate": ({"bn": "recalibrate"}, 1, 2),
        "streamed": ({"streamed": ("train", "test")}, 1, 2)}
    found: dict[str, dict[str, Any]] = {}
    ok = True
    for label, (kw, k, n) in cases.items():
        points = [(0.1 * i, -0.05 * i) for i in range(n)]
        with evaluator(model, data, dirs, device=ctx.dev, batch_size=ctx.batch, points_per_pass=k, **kw) as ev:
            ev.evaluate_many(points)  # warm-up: allocations, cuDNN plans, vmap tracing
            where = count_syncs(lambda: ev.evaluate_many(points))  # noqa: B023  # called at once
        per_pass = len(where) / math.ceil(n / k)
        found[label] = {"per_pass": per_pass, "where": sorted(set(where))[:6]}
        ok &= per_pass <= 1
        ctx.record(syncs=found)
    worst_path = max(found, key=lambda x: found[x]["per_pass"])
    return ok, ("per pass: " + ", ".join(f"{k} {v['per_pass']:g}" for k, v in found.items()) + " (need <= 1)"
                + ("" if ok else f"; {worst_path} at {', '.join(found[worst_path]['where'])}"))


def count_syncs(call: Callable[[], object]) -> list[str]:
    """file:line of each synchronising CUDA operation ``call`` makes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# --- the headline -----------------------------------------------------------------------------

def headline_ieee(ctx: Ctx) -> tuple[bool, str]:
    return headline(ctx, tf32=False, amp=False)


def headline_tf32(ctx: Ctx) -> tuple[bool, str]:
    return headline(ctx, tf32=True, amp=False)


def headline_bf16(ctx: Ctx) -> tuple[bool, str]:
    return headline(ctx, tf32=False, amp=True)


def headline(ctx: Ctx, tf32: bool, amp: bool) -> tuple[bool, str]:
    """Seconds per point of ResNet-20 on 50,000 + 10,000 CIFAR-shaped images (a few hundred with
    --cpu), at the batch size, layout and K a run would choose, and the GPU memory it peaks at."""
    ctx.configure()
    set_float32_precision(tf32)
    model, data, dirs = setup(ctx, ctx.size(50_000, 128), shape="3x32x32")
    dev, images = ctx.dev, sum(len(s) for s in data.values())
    batch = default_batch_size(dev)
    channels_last = True if amp else faster_in_channels_last(model, data["train"].x[:batch].to(dev))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    lines: list[str] = []
    with evaluator(model, data, dirs, device=dev, batch_size=batch, channels_last=channels_last, amp=amp) as ev:
        t0 = time.perf_counter()
        k = ev.calibrate(log=lines.append)
        ctx.record(images=images, batch_size=batch, channels_last=channels_last, K=k, calibration=lines[-1:],
                   calibration_s=time.perf_counter() - t0, precision=float32_precision(), amp=amp)
        seconds, measured, finite = _seconds_per_point(ev, k, images, ctx.size(10, 1))  # --cpu: plumbing only
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else _peak_rss_gib()
    ctx.record(seconds_per_point=seconds, images_per_second=images / seconds, measured=measured, peak_gib=peak,
               peak_kind="cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS")
    return finite, (f"{seconds:.3g} s/point ({images / seconds:,.0f} images/s, {images:,} images), K={k}, batch "
                    f"{batch}, {'NHWC' if channels_last else 'NCHW'}, peak {peak:.2f} GiB"
                    + ("" if finite else "; a loss is not finite"))


def _seconds_per_point(ev, k: int, images: int, seconds: float = 10.0) -> tuple[float, str, bool]:
    """(seconds per point over all ``images``, what was timed, whether the losses were finite):
    passes of K points over as many whole training batches as fit in about ``seconds`` (at K=64 one
    pass over all 60,000 images would take minutes), scaled by images. Batches are independent, so
    time per image is what a whole pass spends, less one host synchronisation per pass."""
    train = ev.batches["train"]
    points = [(a, 0.1) for a in np.linspace(-1, 1, k * math.ceil(2 / k))]
    probe = ev.on_batches({"train": head(train, 1)})
    probe.evaluate_many(points[:k])  # warm-up at K
    t0 = time.perf_counter()
    probe.evaluate_many(points[:k])
    per_batch = (time.perf_counter() - t0) * len(points) / k
    timed = ev.on_batches({"train": head(train, max(1, min(len(train), int(seconds / per_batch))))})
    t0 = time.perf_counter()
    got = timed.evaluate_many(points)
    elapsed = time.perf_counter() - t0
    n = sum(len(y) for _, y in timed.batches["train"])
    finite = all(math.isfinite(v["train_loss"]) for v in got)
    return elapsed / len(points) * images / n, f"{len(points)} points x {n:,} images at K={k}", finite


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --- the command line -------------------------------------------------------------------------

def lsurf_cli(*args: object, env: dict | None = None, launcher: Sequence[str] = ()) -> str:
    """``python -m lsurf ARGS`` (under ``launcher``, e.g. mpirun); its output, or AssertionError."""
    rc, text = run_logged([*launcher, sys.executable, "-m", "lsurf", *args], env=env)
    if rc != 0:
        raise AssertionError(f"lsurf {args[0]} exit status {rc}: {last_line(text)}")
    return text


def surface_args(ctx: Ctx, checkpoint: Path, n: int) -> list[object]:
    return ["surface", "--model", "resnet20", "--checkpoint", checkpoint, "--data",
            f"synthetic:shape={ctx.shape},n={n}", "--split", "train,test", "--device", ctx.dev.type,
            "--no-progress", "--overwrite"] + (["--threads", "1"] if ctx.cpu else [])


def checkpoint(ctx: Ctx) -> Path:
    """The fixed checkpoint the command-line steps centre on."""
    work = ctx.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"resnet20_bn_{ctx.shape}.pt"
    torch.save(bn_resnet20(ctx.shape).state_dict(), path)
    return path


def read(path: Path, names: Sequence[str] = ("train_loss", "train_acc", "test_loss", "test_acc")) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in names if k in f} | {"done": f["done"][()], "attrs": dict(f.attrs)}


def cli(ctx: Ctx) -> tuple[bool, str]:
    """The command line on a fixed checkpoint, each check on its own."""
    base = surface_args(ctx, checkpoint(ctx), ctx.size(2048, 32))
    work = ctx.out / "work"
    checks = {"K=4 bf16 fidelity": _cli_stacked_amp, "resident never = always": _cli_resident,
              "--hessian": _cli_hessian, "--verify": _cli_verify}
    verdicts = {}
    for label, check in checks.items():
        try:
            verdicts[label] = check(ctx, base, work)
        except AssertionError as e:
            verdicts[label] = f"FAILED: {e}"
        ctx.record(checks=verdicts)
    bad = {k: v for k, v in verdicts.items() if v.startswith("FAILED")}
    return not bad, "; ".join(f"{k}: {v}" for k, v in (bad or verdicts).items())


def _cli_stacked_amp(ctx: Ctx, base: list[object], work: Path) -> str:
    out = work / "k4_bf16.h5"
    lsurf_cli(*base, "--x", "-1:1:4", "--y", f"-1:1:{ctx.size(4, 2)}", "--points-per-pass", "4", "--amp", "bf16",
              "--fidelity", "on", "--out", out)
    s = read(out)
    plan = json.loads(s["attrs"]["plan"])
    assert s["done"].all() and np.isfinite(s["train_loss"]).all(), "points missing or not finite"
    assert plan["points_per_pass"] == 4, f"plan {plan}"
    assert "fidelity" in s["attrs"], f"no fidelity attribute ({s['attrs'].get('fidelity_note')})"
    return "ok"


def _cli_resident(ctx: Ctx, base: list[object], work: Path) -> str:
    pinned = ["--x", "-1:1:3", "--y", "-1:1:3", "--points-per-pass", "1", "--batch-size", str(ctx.batch), "--layout",
              "contiguous"]
    got = {}
    for how in ("always", "never"):
        lsurf_cli(*base, *pinned, "--resident", how, "--out", work / f"resident_{how}.h5")
        got[how] = read(work / f"resident_{how}.h5")
    names = ("train_loss", "train_acc", "test_loss", "test_acc")
    differ = [k for k in names if not np.array_equal(got["always"][k], got["never"][k], equal_nan=True)]
    assert not differ, f"{', '.join(differ)} differ"
    assert got["never"]["attrs"].get("streamed") != got["always"]["attrs"].get("streamed"), "both runs alike"
    return "ok (bit for bit)"


def _cli_hessian(ctx: Ctx, base: list[object], work: Path) -> str:
    out = work / "hessian.h5"
    lsurf_cli(*base, "--x", f"-0.5:0.5:{ctx.size(3, 2)}", "--hessian", "--hessian-iters", str(ctx.size(10, 5)),
              "--out", out)
    s = read(out, ("hessian_max", "hessian_min"))
    assert "hessian_max" in s and "hessian_min" in s, "no hessian_max/hessian_min in the file"
    assert np.isfinite(s["hessian_max"]).all() and (s["hessian_max"] >= s["hessian_min"]).all(), \
        f"λ_max {s['hessian_max']}, λ_min {s['hessian_min']}"
    return "ok"


def _cli_verify(ctx: Ctx, base: list[object], work: Path) -> str:
    full = work / "resident_always.h5"
    lsurf_cli("surface", "--verify", "--out", full)
    part = work / "incomplete.h5"
    shutil.copyfile(full, part)
    with h5py.File(part, "r+") as f:
        f["done"][0, 0] = False  # as if the job had been stopped before its first point
    rc, text = run_logged([sys.executable, "-m", "lsurf", "surface", "--verify", "--out", part])
    assert rc == 1 and "incomplete" in text, f"an incomplete file gave exit status {rc}: {last_line(text)}"
    return "ok (complete: 0, incomplete: 1)"


# --- MPI --------------------------------------------------------------------------------------

BINDING = ("from lsurf.run.runtime import configure_process, launcher_comm, check_device_binding\n"
           "from lsurf.run.world import World\n"
           "w = World.of(launcher_comm()); dev = configure_process(w, 'cuda', threads=1)\n"
           "print(f'rank {w.rank} of {w.size} on {dev}', flush=True); check_device_binding(w, dev)")


def mpi(ctx: Ctx) -> tuple[bool, str]:
    """Two ranks bound to one GPU are refused; a surface under mpirun equals one process's."""
    mpirun = shutil.which("mpirun")
    if mpirun is None or importlib.util.find_spec("mpi4py") is None:
        raise Skip("no mpirun on PATH" if mpirun is None else "mpi4py is not installed")
    verdicts = {}
    if not ctx.cpu:
        env = _env_with(CUDA_VISIBLE_DEVICES=_first_gpu())
        rc, text = run_logged([mpirun, "-n", "2", sys.executable, "-m", "mpi4py", "-c", BINDING], env=env)
        verdicts["shared GPU"] = _binding_verdict(rc, text)
        ctx.record(checks=verdicts)
    ranks = 2 if ctx.cpu else max(torch.cuda.device_count(), 1)
    try:
        verdicts[f"surface on {ranks} rank(s)"] = _mpi_surface(ctx, mpirun, ranks)
    except AssertionError as e:
        verdicts[f"surface on {ranks} rank(s)"] = f"FAILED: {e}"
    ctx.record(checks=verdicts, h5py_mpi=bool(h5py.get_config().mpi))
    bad = {k: v for k, v in verdicts.items() if v.startswith("FAILED")}
    writer = "mpio" if h5py.get_config().mpi else "rank 0 writes"
    return not bad, "; ".join(f"{k}: {v}" for k, v in (bad or verdicts).items()) + f" ({writer})"


def _binding_verdict(rc: int, text: str) -> str:
    if rc != 0 and "share GPU" in text:
        return "refused"
    if " of 1 on " in text:
        return "FAILED: each rank saw a world of 1 rank: mpirun and mpi4py's MPI library differ"
    return f"FAILED: not refused (exit status {rc}): {last_line(text)}"


def _mpi_surface(ctx: Ctx, mpirun: str, ranks: int) -> str:
    base = surface_args(ctx, checkpoint(ctx), ctx.size(2048, 32))
    pinned = ["--x", "-1:1:4", "--y", "-1:1:3", "--points-per-pass", "1", "--batch-size", str(ctx.batch), "--layout",
              "contiguous", "--tile", "1x2"]
    work = ctx.out / "work"
    lsurf_cli(*base, *pinned, "--out", work / "one.h5")
    lsurf_cli(*base, *pinned, "--out", work / "mpi.h5", launcher=[mpirun, "-n", str(ranks)])
    one, many = read(work / "one.h5"), read(work / "mpi.h5")
    assert many["done"].all(), f"{int(many['done'].sum())} of {many['done'].size} points done"
    names = ("train_loss", "train_acc", "test_loss", "test_acc")
    if all(np.array_equal(one[k], many[k], equal_nan=True) for k in names):
        return "= one process, bit for bit"
    err = max(float(np.nanmax(np.abs(one[k] - many[k]) / np.abs(one[k]))) for k in ("train_loss", "test_loss"))
    assert err <= 1e-6, f"differs from one process: rel loss {err:.1e}"
    return f"= one process (rel loss {err:.1e}, not bit for bit)"


def _first_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return visible.split(",")[0] if visible else "0"


def _env_with(**extra: str) -> dict:
    return {**os.environ, **extra}


# --- the speed bench --------------------------------------------------------------------------

def bench(ctx: Ctx) -> tuple[bool, str]:
    """bench/bench_speed.py on CUDA, quick; its JSON line kept, its target lines counted."""
    rc, text = run_logged([sys.executable, "bench/bench_speed.py", "--device", "cuda", "--quick"])
    targets = re.findall(r"\b(met|MISSED)\b", text)
    summary = next((json.loads(x) for x in reversed(text.splitlines()) if x.startswith("{")), None)
    ctx.record(exit_status=rc, met=targets.count("met"), missed=targets.count("MISSED"), result=summary)
    if rc != 0:
        return False, f"exit status {rc}: {last_line(text)}"
    return True, f"{targets.count('met')} targets met, {targets.count('MISSED')} MISSED (see its log)"
