"""Evaluation speed of lsurf against a bare forward pass and a naive reference-style loop.

What it measures, for each model (CPU: ``mlp`` and ``cnn`` on the digits train split, 1,438 images,
and ``resnet20`` on 1,000 synthetic 3x32x32 images; CUDA adds ``resnet56`` on 10,000 images):

* ``bare``       one ``torch.inference_mode()`` forward over the very batches lsurf uses (resident on the
                 device, batch 128 on CPU / 1024 on CUDA), no loss: the floor any sampler can reach.
* ``per-point``  ``Evaluator(points_per_pass=1).evaluate_many(points)`` over N grid points.
* ``K=<c> run``  the same with the K that ``Evaluator.calibrate()`` chose (run only, calibration excluded).
* ``K=8``        the stacked (vmap) path forced to 8 points per pass.
* ``auto``       what ``sample_surface`` does by default: calibrate, then run at the chosen K
                 (calibration seconds are spread over the N points).
* ``NHWC``       per-point with model and batches in channels_last layout (conv models; ``--channels-last``).
* ``naive``      a reference-style loop written here: per point a new ``DataLoader`` over a CPU
                 ``TensorDataset`` (batch 128, no workers), every weight re-built as a new tensor
                 ``p.data = w + a*d1 + b*d2``, ``.item()`` per batch for loss and correct counts.

All methods see the same data and the same N points; their loss values are checked to agree.
Methods are run round-robin (a few rounds), so load drifting on a shared machine touches all alike.

How to read the table: ``best`` and ``median`` are milliseconds per grid point (for ``bare``: per
pass) over the rounds; ``x bare`` is best / best-of-bare, i.e. the price of everything that is not the
forward pass (weights, loss, accuracy, statistics, host sync). ``vs per-point`` > 1 means slower than
the per-point path. The target lines under the table say met / MISSED for each goal.

The last section ("issue-2") runs the whole ``lsurf.sample_surface`` API in this process on the
digits CNN (temporary file, progress off) and divides its time by N x the bare pass.

Run: ``python bench/bench_speed.py [--quick] [--device cpu|cuda] [--threads 1]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lsurf  # noqa: E402
from lsurf.data import resident_batches  # noqa: E402
from lsurf.directions import target_tensors  # noqa: E402
from lsurf.evaluate import Evaluator, resolve_loss  # noqa: E402
from lsurf.parallel import World, keep_freed_memory, pin_device  # noqa: E402


@dataclass
class Case:
    model: str
    data: str
    points: int  # N grid points per measurement
    rounds: int  # round-robin repeats of every method
    forced_k: int = 8


def cases(device: str, quick: bool) -> list[Case]:
    synth = "synthetic:shape=3x32x32,n=1000"
    if quick:
        out = [Case("mlp", "digits", 60, 3), Case("cnn", "digits", 40, 3), Case("resnet20", synth, 3, 1)]
    else:
        out = [Case("mlp", "digits", 200, 5), Case("cnn", "digits", 160, 3), Case("resnet20", synth, 16, 2)]
    if device == "cuda":
        out.append(Case("resnet56", "synthetic:shape=3x32x32,n=10000", 5 if quick else 20, 1 if quick else 2))
    return out


def grid_points(n: int) -> list[tuple[float, float]]:
    """The first ``n`` points of a near-square grid over [-1, 1]^2, row by row."""
    nx = math.ceil(math.sqrt(n))
    ny = math.ceil(n / nx)
    xs, ys = np.linspace(-1, 1, nx), np.linspace(-1, 1, max(ny, 2))
    return [(float(a), float(b)) for b in ys for a in xs][:n]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn, *args):
    sync(dev)
    t0 = time.perf_counter()
    result = fn(*args)
    sync(dev)
    return time.perf_counter() - t0, result


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# --- the methods -------------------------------------------------------------------------------------------


def bare_pass(model, batches) -> None:
    with torch.inference_mode():
        for x, _ in batches:
            model(x)


def naive_surface(model, origin, d1, d2, x_cpu, y_cpu, points, dev) -> list[tuple[float, float]]:
    """Li et al.-style evaluation: a fresh DataLoader and fresh weight tensors per point, .item() per batch."""
    params = list(model.parameters())
    criterion = torch.nn.CrossEntropyLoss()
    out = []
    for a, b in points:
        loader = DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=128, shuffle=False, num_workers=0)
        for p, w, u, v in zip(params, origin, d1, d2):
            p.data = w + a * u + b * v
        model.eval()
        total_loss, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                logits = model(x)
                total_loss += criterion(logits, y).item() * len(x)
                correct += logits.argmax(1).eq(y).sum().item()
                total += len(x)
        out.append((total_loss / total, 100.0 * correct / total))
    return out


class Setup:
    """One model, its data (resident batches and CPU tensors) and seeded directions, ready to time."""

    def __init__(self, case: Case, dev: torch.device):
        self.case, self.dev = case, dev
        split = lsurf.load_data(case.data, ("train",))["train"]
        self.n_samples = len(split)
        torch.manual_seed(0)
        model = lsurf.load_model(case.model, tuple(split.x.shape[1:]), split.num_outputs).eval()
        dirs = lsurf.random_directions(model, seed=0)
        self.model = model.to(dev)
        self.dirs = dirs.to(dev, torch.float32)
        self.batches = resident_batches(split, 1024 if dev.type == "cuda" else 128, dev, torch.float32)
        self.points = grid_points(case.points)
        self.loss_fn = resolve_loss("cross_entropy")
        # The naive loop replaces p.data, so it gets a model of its own.
        self.naive_model = copy.deepcopy(self.model)
        self.origin = [p.detach().clone() for p in self.naive_model.parameters()]
        self.x_cpu, self.y_cpu = split.x.float(), split.y
        # The same model and batches in NHWC layout (what ``--channels-last`` gives), for 4-D inputs only.
        self.nhwc = split.x.dim() == 4 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        if self.nhwc:
            self.cl_model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            self.cl_batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in self.batches]

    def evaluator(self, k: int) -> Evaluator:
        names, targets = target_tensors(self.model, "weights")
        return Evaluator(self.model, names, targets, self.dirs, {"train": self.batches}, self.loss_fn,
                         points_per_pass=k)

    def lsurf_nhwc(self) -> tuple[float, list]:
        names, targets = target_tensors(self.cl_model, "weights")
        ev = Evaluator(self.cl_model, names, targets, self.dirs, {"train": self.cl_batches}, self.loss_fn)
        try:
            return timed(self.dev, ev.evaluate_many, self.points)
        finally:
            ev.restore()

    def bare(self) -> float:
        return timed(self.dev, bare_pass, self.model, self.batches)[0]

    def bare_at_points(self) -> float:
        """Bare forward passes at each of the N points (weights set untimed): the floor for those weights.

        The forward's own time depends on the weights (ReLU/max-pool patterns change with the point),
        so this, not the pass at θ*, is what the per-point path must be compared with.
        """
        ev = self.evaluator(1)
        total = 0.0
        try:
            for a, b in self.points:
                ev.set_point(a, b)
                total += timed(self.dev, bare_pass, self.model, self.batches)[0]
        finally:
            ev.restore()
        return total

    def lsurf_run(self, k: int) -> tuple[float, list]:
        ev = self.evaluator(k)
        try:
            return timed(self.dev, ev.evaluate_many, self.points)
        finally:
            ev.restore()

    def auto(self) -> tuple[float, float, int, list]:
        """(calibration seconds, run seconds, chosen K, results)."""
        ev = self.evaluator(1)
        try:
            t_cal, k = timed(self.dev, ev.calibrate)
            t_run, res = timed(self.dev, ev.evaluate_many, self.points)
        finally:
            ev.restore()
        return t_cal, t_run, k, res

    def naive(self) -> tuple[float, list]:
        return timed(self.dev, naive_surface, self.naive_model, self.origin, self.dirs.x, self.dirs.y,
                     self.x_cpu, self.y_cpu, self.points, self.dev)


def measure(setup: Setup, log) -> dict:
    """Round-robin rounds of every method; per-point seconds (bare: per pass) for each."""
    case, n = setup.case, len(setup.points)
    # Warm-up: allocator, first-call costs, vmap tracing; every method once on two points.
    pts, setup.points = setup.points, setup.points[:2]
    setup.bare()
    setup.lsurf_run(1)
    setup.lsurf_run(case.forced_k)
    setup.naive()
    if setup.nhwc:
        setup.lsurf_nhwc()
    setup.points = pts
    keys = ("bare", "bare_points", "per_point", "calibrated_run", "forced", "auto", "naive", "calibration")
    keys += ("nhwc",) if setup.nhwc else ()
    t: dict[str, list[float]] = {k: [] for k in keys}
    chosen = []
    check = None
    for r in range(case.rounds):
        for _ in range(3):
            t["bare"].append(setup.bare())
        t["bare_points"].append(setup.bare_at_points() / n)
        s, res1 = setup.lsurf_run(1)
        t["per_point"].append(s / n)
        t_cal, t_run, k, res_auto = setup.auto()
        chosen.append(k)
        t["calibration"].append(t_cal)
        t["calibrated_run"].append(t_run / n)
        t["auto"].append((t_cal + t_run) / n)
        s, res_k = setup.lsurf_run(case.forced_k)
        t["forced"].append(s / n)
        s, res_naive = setup.naive()
        t["naive"].append(s / n)
        extra = []
        if setup.nhwc:
            s, res_nhwc = setup.lsurf_nhwc()
            t["nhwc"].append(s / n)
            extra.append(res_nhwc)
        t["bare"].append(setup.bare())
        if check is None:
            check = agreement(res1, [res_auto, res_k, *extra], res_naive)
        log(f"  round {r + 1}/{case.rounds}: per-point {1e3 * t['per_point'][-1]:.2f} ms, "
            f"naive {1e3 * t['naive'][-1]:.2f} ms, calibrated K={k}, load {load_avg()[0]}")
    return {"times": t, "chosen_k": chosen, "max_rel_diff": check}


def train_loss(result: dict) -> float:
    """The train loss of one ``evaluate_many`` result (``{"train_loss": ...}``, or ``{"train": [loss, ...]}``)."""
    return float(result["train_loss"] if "train_loss" in result else result["train"][0])


def agreement(res1, lsurf_results, res_naive) -> float:
    """Largest relative difference of train loss between the methods (they must compute the same)."""
    ref = np.array([train_loss(r) for r in res1])
    others = [np.array([train_loss(r) for r in res]) for res in lsurf_results]
    others.append(np.array([lo for lo, _ in res_naive]))
    return float(max(np.max(np.abs(o - ref) / np.maximum(np.abs(ref), 1e-12)) for o in others))


# --- issue-2: the whole sampler API ------------------------------------------------------------------------


def issue2(dev: torch.device, threads: int, quick: bool, log) -> dict:
    """Digits CNN through ``lsurf.sample_surface`` in this process: overhead = time / (N x bare pass).

    Two floors are measured next to it: the bare pass at θ* (N x its median) and the bare passes at
    the grid's own points (their sum), so the gap can be split into setup + calibration (call - in-run
    wall), scheduling + writes (wall - evaluation seconds) and evaluator overhead (evaluation - floor).
    """
    side = 9 if quick else 21
    data = lsurf.load_data("digits", ("train",))
    split = data["train"]
    torch.manual_seed(0)
    model = lsurf.load_model("cnn", tuple(split.x.shape[1:]), split.num_outputs).eval().to(dev)
    dirs = lsurf.random_directions(model, seed=0)
    grid = lsurf.Grid.parse(f"-1:1:{side}", f"-1:1:{side}")
    batches = resident_batches(split, 1024 if dev.type == "cuda" else 128, dev, torch.float32)
    bare_pass(model, batches)
    bare_before = [timed(dev, bare_pass, model, batches)[0] for _ in range(7)]
    messages: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "surface.h5"
        t_call, surface = timed(dev, lambda: lsurf.sample_surface(
            model, data, dirs, grid, out, device=dev.type, threads=threads, progress=False, overwrite=True,
            log=messages.append))
        attrs = dict(surface.attrs)
    bare_after = [timed(dev, bare_pass, model, batches)[0] for _ in range(7)]
    # The floor at the grid's own points: set the weights (untimed), time the bare pass.
    names, targets_ = target_tensors(model, "weights")
    ev = Evaluator(model, names, targets_, dirs.to(dev, torch.float32), {"train": batches},
                   resolve_loss("cross_entropy"))
    floor = 0.0
    for j in range(len(grid.y)):
        for i in range(len(grid.x)):
            ev.set_point(*grid.coords(j, i))
            floor += timed(dev, bare_pass, model, batches)[0]
    ev.restore()
    bare = sorted(bare_before + bare_after)
    n = grid.num_points
    best, med = bare[0], statistics.median(bare)
    wall = float(attrs["wall_seconds"])
    evals = float(attrs["eval_seconds_total"])
    res = {
        "points": n, "bare_best_ms": 1e3 * best, "bare_median_ms": 1e3 * med, "bare_at_points_s": floor,
        "call_seconds": t_call, "wall_seconds": wall, "eval_seconds": evals,
        "write_seconds": float(np.sum(attrs["rank_write_seconds"])),
        "eval_seconds_per_point_ms": 1e3 * float(attrs["eval_seconds_per_point"]),
        "points_per_pass": int(attrs["points_per_pass"]),
        "calibration_log": next((m for m in messages if m.startswith("calibration")), ""),
        "overhead_call": t_call / (n * med), "overhead_wall": wall / (n * med),
        "overhead_call_vs_points": t_call / floor, "overhead_wall_vs_points": wall / floor,
    }
    log(f"  issue-2: {n} points, sample_surface {t_call:.2f} s (in-run wall {wall:.2f} s), load {load_avg()[0]}")
    return res


def print_issue2(i2: dict) -> None:
    n, med = i2["points"], i2["bare_median_ms"] / 1e3
    print(f"\nissue-2: digits CNN through lsurf.sample_surface, {n} points, chosen K={i2['points_per_pass']}")
    print(f"  {i2['calibration_log']}")
    print(f"  {'':<44}{'seconds':>9}{'/ (N x bare θ*)':>17}{'/ bare@points':>15}")
    floor = i2["bare_at_points_s"]
    rows = [("N x bare pass at θ* (median)", n * med), ("sum of bare passes at the N points", floor),
            ("evaluation (attr eval_seconds_total)", i2["eval_seconds"]),
            ("in-run wall (attr wall_seconds)", i2["wall_seconds"]),
            ("whole sample_surface call", i2["call_seconds"])]
    for label, v in rows:
        print(f"  {label:<44}{v:>9.3f}{v / (n * med):>17.3f}{v / floor:>15.3f}")
    print(f"  split of the call: setup+calibration+finalize {i2['call_seconds'] - i2['wall_seconds']:.3f} s, "
          f"scheduling+writes {i2['wall_seconds'] - i2['eval_seconds']:.3f} s (writes {1e3 * i2['write_seconds']:.1f}"
          f" ms), evaluator overhead over bare@points {i2['eval_seconds'] - floor:.3f} s")


# --- report ------------------------------------------------------------------------------------------------

ROWS = [("bare forward at θ* (per pass)", "bare"), ("bare forward at the N points", "bare_points"),
        ("lsurf per-point (K=1)", "per_point"), ("lsurf calibrated K (run only)", "calibrated_run"),
        ("lsurf forced K", "forced"), ("lsurf auto (calibrate + run)", "auto"), ("naive reference-style", "naive"),
        ("lsurf per-point, NHWC (channels_last)", "nhwc")]


def summarize_case(case: Case, setup: Setup, m: dict) -> dict:
    t = m["times"]
    best = {k: min(v) for k, v in t.items()}
    med = {k: statistics.median(v) for k, v in t.items()}
    n = len(setup.points)
    return {
        "model": case.model, "data": case.data, "samples": setup.n_samples, "batches": len(setup.batches),
        "points": n, "rounds": case.rounds, "forced_k": case.forced_k,
        "chosen_k": m["chosen_k"], "max_rel_diff": m["max_rel_diff"],
        "best_ms": {k: 1e3 * v for k, v in best.items()}, "median_ms": {k: 1e3 * v for k, v in med.items()},
        "per_point_over_bare": best["per_point"] / best["bare"],
        "per_point_over_bare_points": best["per_point"] / best["bare_points"],
        "auto_over_bare": best["auto"] / best["bare"],
        "naive_over_bare": best["naive"] / best["bare"],
        "naive_over_per_point": best["naive"] / best["per_point"],
        "naive_over_auto": best["naive"] / best["auto"],
        "auto_over_per_point": best["auto"] / best["per_point"],
        "calibrated_run_over_per_point": best["calibrated_run"] / best["per_point"],
        # Points after which calibration costs < 5 % of a per-point run.
        "calibration_break_even_points": best["calibration"] / (0.05 * best["per_point"]),
    }


def print_case(s: dict) -> None:
    b, md = s["best_ms"], s["median_ms"]
    ks = "/".join(map(str, sorted(set(s["chosen_k"]))))
    print(f"\n{s['model']} on {s['data']} train: {s['samples']} samples in {s['batches']} batches, "
          f"N={s['points']} points, {s['rounds']} rounds; values agree to {s['max_rel_diff']:.1e} (max rel diff)")
    print(f"  {'method (ms per point; bare: per pass)':<38}{'best':>10}{'median':>10}{'x bare θ*':>11}"
          f"{'x bare@pts':>12}{'vs per-point':>14}")
    for label, key in ROWS:
        if key not in b:
            continue
        label = label + (f" K={ks}" if key == "calibrated_run" else f" K={s['forced_k']}" if key == "forced" else "")
        print(f"  {label:<38}{b[key]:>10.3f}{md[key]:>10.3f}{b[key] / b['bare']:>11.3f}"
              f"{b[key] / b['bare_points']:>12.3f}{b[key] / b['per_point']:>14.3f}")
    print(f"  calibrate(): {b['calibration']:.1f} ms best, {md['calibration']:.1f} ms median, chosen K per round "
          f"{s['chosen_k']}; pays for itself (< 5 % of the run) after {s['calibration_break_even_points']:.0f} points")


TARGETS_PP = {"mlp": 1.3, "cnn": 1.05, "resnet20": 1.05}


def targets(summaries: list[dict], i2: dict | None, device: str) -> list[tuple[str, float, str, bool]]:
    """(label, value, wanted, met) for every goal; overhead goals against both floors."""
    out = []

    def add(label, value, lim, upper=True):
        out.append((label, value, f"{'<=' if upper else '>='} {lim}", value <= lim if upper else value >= lim))

    for s in summaries:
        name = s["model"]
        if device == "cpu" and name in TARGETS_PP:
            lim = TARGETS_PP[name]
            add(f"{name}: per-point / bare at θ*", s["per_point_over_bare"], lim)
            add(f"{name}: per-point / bare at the same points", s["per_point_over_bare_points"], lim)
        if device == "cpu" and name == "resnet20":
            add(f"{name}: naive / per-point", s["naive_over_per_point"], 1.3, upper=False)
        add(f"{name}: auto (incl. calibration, N={s['points']}) / per-point", s["auto_over_per_point"], 1.05)
        add(f"{name}: auto run at chosen K / per-point", s["calibrated_run_over_per_point"], 1.05)
    if i2 is not None:
        add(f"issue-2 cnn: sample_surface call / (N x bare θ*), N={i2['points']}", i2["overhead_call"], 1.10)
        add("issue-2 cnn: sample_surface call / bare at the grid points", i2["overhead_call_vs_points"], 1.10)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and rounds (about a minute)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one rank's layout)")
    ap.add_argument("--only", help="comma-separated model names to run (default: all)")
    ap.add_argument("--no-issue2", action="store_true", help="skip the sample_surface measurement")
    args = ap.parse_args(argv)

    dev = pin_device(World(), args.device, args.threads)  # threads + glibc malloc settings, as lsurf does
    keep_freed_memory()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load0 = load_avg()
    t_start = time.perf_counter()
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}, load {load0}")
    summaries = []
    for case in cases(args.device, args.quick):
        if args.only and case.model not in args.only.split(","):
            continue
        log(f"{case.model} on {case.data}: {case.points} points x {case.rounds} rounds")
        setup = Setup(case, dev)
        s = summarize_case(case, setup, measure(setup, log))
        summaries.append(s)
        print_case(s)
        del setup
    i2 = None
    if not args.no_issue2 and (not args.only or "cnn" in args.only.split(",")):
        i2 = issue2(dev, args.threads, args.quick, log)
        print_issue2(i2)
    goals = targets(summaries, i2, args.device)
    print("\ntargets:")
    for label, value, want, ok in goals:
        print(f"  {label:<66}{value:>8.3f} {want:<8} {'met' if ok else 'MISSED'}")
    load1 = load_avg()
    print(f"load average before {load0}, after {load1}; {time.perf_counter() - t_start:.0f} s")
    summary = {
        "bench": "speed", "device": str(dev), "threads": torch.get_num_threads(), "quick": args.quick,
        "load_before": load0, "load_after": load1, "cases": summaries, "issue2": i2,
        "targets": {label: {"value": round(v, 4), "target": want, "met": ok} for label, v, want, ok in goals},
    }
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
