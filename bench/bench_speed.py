"""Evaluation speed of lsurf against a bare forward pass and a naive reference-style loop.

Models (CPU: ``mlp`` and ``cnn`` on the digits train split, 1,438 images, and ``resnet20`` on 1,000
synthetic 3x32x32 images; CUDA adds ``resnet56`` on 10,000 images), each over the same N grid points:

* ``bare θ*``      one ``torch.inference_mode()`` forward over the very batches lsurf uses (resident on
                   the device; batch 128 on CPU, 1024 on CUDA), no loss, at θ*: per pass.
* ``bare@points``  the same pass at each grid point (weights set untimed). A forward's time depends a
                   little on the weights, so this is the floor for these points.
* ``per-point``    lsurf's per-point path (``Evaluator(points_per_pass=1)``) at each point. The three
                   above run back to back at every point (θ*, the point, lsurf), so load hits them
                   alike, and each is summarised the same way: every point's best over the rounds.
* ``pp run``      the per-point path over all N points in one ``evaluate_many`` call: the baseline
                   of the whole-run rows below (column ``vs pp run``).
* ``best K``       the stacked (``vmap``) path at the K an unbounded ``calibrate()`` chose (run only);
                   ``forced K``: K=8 whatever calibration says.
* ``auto``         what ``sample_surface`` does: ``calibrate(points=N)`` (budgeted at 3 % of the
                   run, so a short run is not calibrated), then the run; calibration seconds included.
* ``NHWC``         the same in channels_last layout (what lsurf picks at start when it is faster): the
                   three paired rows (bare NHWC at θ*, at the points, lsurf per-point NHWC) and the whole run.
* ``naive``        a reference-style loop: per point a new ``DataLoader`` over a CPU ``TensorDataset``
                   (batch 128, no workers), weights rebuilt as new tensors, ``.item()`` per batch. Run
                   twice: in its own process with glibc's default malloc, as the reference runs
                   (``naive``), and in this process with lsurf's malloc settings (``naive, in-process``).

Times are milliseconds per grid point (bare θ*: per pass): the best round of each whole-run method,
and for the three paired ones the mean over points of each point's best round. ``x bare`` divides by the
bare pass at θ*, ``x bare@pts`` by the bare passes at the same points. Loss values of every method
are checked to agree. The last section runs the whole ``lsurf.sample_surface`` API on the digits
CNN; the one before it shows the threads lsurf takes per rank and a ResNet-20 pass at 1 and 2 threads
with the cores free and with one kept busy. Target lines say met or MISSED.

Run: ``python bench/bench_speed.py [--quick] [--device cpu|cuda] [--threads 1]``; the last line is JSON.
``--smoke``: every measurement once on tiny inputs, in seconds (tests/test_benches.py runs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
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
from lsurf.engine.data.batches import resident_batches  # noqa: E402
from lsurf.engine.evaluation.evaluate import Evaluator  # noqa: E402
from lsurf.engine.evaluation.losses import resolve_loss  # noqa: E402
from lsurf.engine.geometry.directions import target_tensors  # noqa: E402
from lsurf.run.runtime import configure_process, threads_per_rank  # noqa: E402
from lsurf.run.world import World  # noqa: E402

SYNTH = "synthetic:shape=3x32x32,n=1000"


@dataclass
class Case:
    model: str
    data: str
    points: int  # N grid points
    rounds: int  # repeats of every method; bests are kept
    forced_k: int = 8


SMOKE_SYNTH = "synthetic:shape=3x32x32,n=16"


def cases(device: str, quick: bool, smoke: bool = False) -> list[Case]:
    if smoke:  # every method once on tiny inputs (a conv net: the NHWC rows too), for tests/test_benches.py
        return [Case("resnet20", SMOKE_SYNTH, 2, 1, 2)]
    if quick:
        out = [Case("mlp", "digits", 40, 3), Case("cnn", "digits", 24, 3), Case("resnet20", SYNTH, 3, 1)]
    else:
        out = [Case("mlp", "digits", 100, 5), Case("cnn", "digits", 64, 4), Case("resnet20", SYNTH, 12, 2)]
    if device == "cuda":
        out.append(Case("resnet56", "synthetic:shape=3x32x32,n=10000", 5 if quick else 20, 1 if quick else 2))
    return out


def grid_points(n: int) -> list[tuple[float, float]]:
    """The first ``n`` points of a near-square grid over [-1, 1]^2, row by row."""
    nx = math.ceil(math.sqrt(n))
    xs, ys = np.linspace(-1, 1, nx), np.linspace(-1, 1, max(math.ceil(n / nx), 2))
    return [(float(a), float(b)) for b in ys for a in xs][:n]


def timed(dev: torch.device, fn, *args):
    """(seconds, result) of ``fn(*args)``, the device synchronised on both sides."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    result = fn(*args)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, result


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def batch_size(dev: torch.device) -> int:
    return 1024 if dev.type == "cuda" else 128


def bare_pass(model, batches) -> None:
    with torch.inference_mode():
        for x, _ in batches:
            model(x)


class Setup:
    """One model, its resident batches and seeded directions, ready to time; the same in every process."""

    def __init__(self, case: Case, dev: torch.device):
        self.case, self.dev = case, dev
        self.split = lsurf.load_data(case.data, ("train",))["train"]
        torch.manual_seed(0)
        shape = tuple(self.split.x.shape[1:])
        self.model = lsurf.load_model(case.model, shape, self.split.num_outputs).eval()
        self.dirs = lsurf.random_directions(self.model, seed=0)
        self.model.to(dev)
        self.dirs = self.dirs.to(dev, torch.float32)
        self.batches = resident_batches(self.split, batch_size(dev), dev, torch.float32)
        self.points = grid_points(case.points)
        self.nhwc = self.split.x.dim() == 4 and any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())

    def evaluator(self, k: int, channels_last: bool = False) -> Evaluator:
        model, batches = self.model, self.batches
        if channels_last:
            model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
            batches = resident_batches(self.split, batch_size(self.dev), self.dev, torch.float32, True)
        names, targets = target_tensors(model, "weights")
        dirs = self.dirs.like(targets)  # laid out as the weights, as lsurf.evaluator places them
        return Evaluator(model, names, targets, dirs, {"train": batches}, resolve_loss("cross_entropy"),
                         points_per_pass=k)


def paired(s: Setup, ev: Evaluator, best: dict[str, np.ndarray], prefix: str = "") -> list[float]:
    """One round over the points: the bare pass at θ*, the bare pass at the point, then lsurf's
    per-point evaluation of it, back to back, so load hits all three alike; keeps each one's best.
    The bare passes run ``ev``'s model over ``ev``'s batches (its layout); keys start with ``prefix``."""
    losses = []
    batches = ev.batches["train"]
    for p, (a, b) in enumerate(s.points):
        for key, point in (("bare", (0.0, 0.0)), ("bare_points", (a, b))):
            ev.set_point(*point)
            best[prefix + key][p] = min(best[prefix + key][p], timed(s.dev, bare_pass, ev.model, batches)[0])
        t, res = timed(s.dev, ev.evaluate_many, [(a, b)])
        best[prefix + "per_point"][p] = min(best[prefix + "per_point"][p], t)
        losses.append(res[0]["train_loss"])
    ev.set_point(0.0, 0.0)
    return losses


def run(ev: Evaluator, s: Setup, calibrate_for: int | None = 0) -> tuple[float, float, int, list[float]]:
    """(calibration seconds, run seconds, K, losses) of ``evaluate_many`` over all points, after
    calibrating for a run of ``calibrate_for`` points (None: unbounded, 0: no calibration)."""
    t_cal = timed(s.dev, ev.calibrate, None, 2, 3, calibrate_for)[0] if calibrate_for != 0 else 0.0
    t_run, res = timed(s.dev, ev.evaluate_many, s.points)
    ev.set_point(0.0, 0.0)
    return t_cal, t_run, ev.points_per_pass, [r["train_loss"] for r in res]


def naive(s: Setup) -> tuple[float, list[float]]:
    """(seconds, losses) of Li et al.-style evaluation over all points, on a copy of the model."""
    model = copy.deepcopy(s.model)
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    x_cpu, y_cpu = s.split.x.float(), s.split.y
    criterion = torch.nn.CrossEntropyLoss()

    def loop() -> list[float]:
        out = []
        for a, b in s.points:
            loader = DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=128, shuffle=False, num_workers=0)
            for p, w, u, v in zip(params, origin, s.dirs.x, s.dirs.y):
                p.data = w + a * u + b * v
            total, correct, n = 0.0, 0, 0
            with torch.no_grad():
                for x, y in loader:
                    x, y = x.to(s.dev), y.to(s.dev)
                    logits = model(x)
                    total += criterion(logits, y).item() * len(x)
                    correct += logits.argmax(1).eq(y).sum().item()
                    n += len(x)
            out.append(total / n)
        return out

    return timed(s.dev, loop)


def naive_own_process(case: Case, device: str, threads: int, rounds: int) -> tuple[float, list[float]]:
    """The naive loop's best seconds over ``rounds`` in a fresh interpreter without lsurf's malloc settings."""
    cmd = [sys.executable, __file__, "--naive-worker", json.dumps(case.__dict__), "--device", device,
           "--threads", str(threads), "--rounds", str(rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"naive worker failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["seconds"], result["losses"]


def naive_worker(case: Case, device: str, threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    s = Setup(case, torch.device(device))
    s.points = s.points[:2]
    naive(s)  # warm-up
    s.points = grid_points(case.points)
    times, losses = [], []
    for _ in range(rounds):
        t, losses = naive(s)
        times.append(t)
    print(json.dumps({"seconds": min(times), "losses": losses}))


def measure(case: Case, dev: torch.device, threads: int, log) -> dict:
    """Best milliseconds per point (bare θ*: per pass) of every method, and their agreement."""
    s = Setup(case, dev)
    n = len(s.points)
    per_point, stacked = s.evaluator(1), s.evaluator(case.forced_k)
    nhwc = s.evaluator(1, channels_last=True) if s.nhwc else None
    saved, s.points = s.points, s.points[:2]  # warm-up: allocator, first calls, vmap tracing
    for ev in (per_point, stacked, nhwc):
        if ev is not None:
            run(ev, s)
    s.points = saved
    paired_keys = [p + key for p in ("", "nhwc_")[: 2 if nhwc else 1] for key in ("bare", "bare_points", "per_point")]
    paired_best = {key: np.full(n, np.inf) for key in paired_keys}
    t: dict[str, list[float]] = {"per_point_run": [], "calibration": [], "calibrated_run": [], "auto": [],
                                 "forced": [], "naive_in_process": []} | ({"nhwc": []} if nhwc else {})
    losses, chosen = {}, []
    for r in range(case.rounds):
        losses["per-point"] = paired(s, per_point, paired_best)
        if nhwc:
            losses["per-point NHWC"] = paired(s, nhwc, paired_best, "nhwc_")
        _, t_run, _, losses["per-point run"] = run(per_point, s)
        t["per_point_run"].append(t_run / n)
        _, t_run, k, losses["best K"] = run(s.evaluator(1), s, calibrate_for=None)
        chosen.append(k)
        t["calibrated_run"].append(t_run / n)
        t_cal, t_run, _, losses["auto"] = run(s.evaluator(1), s, calibrate_for=n)
        t["calibration"].append(t_cal)
        t["auto"].append((t_cal + t_run) / n)
        _, t_forced, _, losses["forced"] = run(stacked, s)
        t["forced"].append(t_forced / n)
        if nhwc:
            _, t_nhwc, _, losses["nhwc"] = run(nhwc, s)
            t["nhwc"].append(t_nhwc / n)
        t_naive, losses["naive, in-process"] = naive(s)
        t["naive_in_process"].append(t_naive / n)
        log(f"  round {r + 1}/{case.rounds}: per-point {1e3 * paired_best['per_point'].mean():.2f} ms (best so far), "
            f"best K={k}, load {load_avg()}")
    t_own, losses["naive"] = naive_own_process(case, dev.type, threads, case.rounds)
    best = {k: min(v) for k, v in t.items() if k != "calibration"}
    best |= {key: v.mean() for key, v in paired_best.items()} | {"naive": t_own / n}
    ref = np.array(losses["per-point"])
    rel = {m: float(np.max(np.abs(np.array(v) - ref) / np.abs(ref))) for m, v in losses.items()}
    return {"model": case.model, "data": case.data, "samples": len(s.split), "batches": len(s.batches),
            "points": n, "rounds": case.rounds, "forced_k": case.forced_k, "chosen_k": chosen,
            "calibration_ms": 1e3 * statistics.median(t["calibration"]),
            "best_ms": {k: 1e3 * v for k, v in best.items()}, "max_rel_diff": max(rel.values())}


ROWS = [("bare forward at θ* (per pass)", "bare"), ("bare forward at the N points", "bare_points"),
        ("lsurf per-point (K=1)", "per_point"), ("lsurf per-point, whole run", "per_point_run"),
        ("lsurf best K, run only", "calibrated_run"), ("lsurf forced K", "forced"),
        ("lsurf auto (calibrate for N + run)", "auto"),
        ("lsurf per-point, NHWC, whole run", "nhwc"), ("bare NHWC forward at θ* (per pass)", "nhwc_bare"),
        ("bare NHWC forward at the N points", "nhwc_bare_points"), ("lsurf per-point NHWC (K=1)", "nhwc_per_point"),
        ("naive, own process", "naive"),
        ("naive, in-process", "naive_in_process")]


def print_case(s: dict) -> None:
    b = s["best_ms"]
    ks = "/".join(map(str, sorted(set(s["chosen_k"]))))
    print(f"\n{s['model']} on {s['data']} train: {s['samples']} samples in {s['batches']} batches, "
          f"N={s['points']} points, {s['rounds']} rounds; losses agree to {s['max_rel_diff']:.1e} (max rel diff)")
    print(f"  {'method (ms per point; bare θ*: per pass)':<42}{'best':>10}{'x bare':>9}{'x bare@pts':>12}"
          f"{'vs pp run':>11}")
    for label, key in ROWS:
        if key in b:
            label += f" K={ks}" if key == "calibrated_run" else f" K={s['forced_k']}" if key == "forced" else ""
            print(f"  {label:<42}{b[key]:>10.3f}{b[key] / b['bare']:>9.3f}{b[key] / b['bare_points']:>12.3f}"
                  f"{b[key] / b['per_point_run']:>11.3f}")
    print(f"  calibrate(points={s['points']}): {s['calibration_ms']:.1f} ms median, chosen K per round {s['chosen_k']}")


TARGETS_PP = {"mlp": 1.3, "cnn": 1.05, "resnet20": 1.05}


def targets(summaries: list[dict], i2: dict | None, device: str) -> list[tuple[str, float, str, bool]]:
    """(label, value, wanted, met) for every goal of the speed issue (CPU or GPU set)."""
    out = []

    def add(label, value, lim, upper=True):
        met = bool(value <= lim if upper else value >= lim)
        out.append((label, float(value), f"{'<=' if upper else '>='} {lim}", met))

    for s in summaries:
        b, name = s["best_ms"], s["model"]
        if device == "cpu" and name in TARGETS_PP:
            add(f"{name}: per-point / bare at θ*", b["per_point"] / b["bare"], TARGETS_PP[name])
            add(f"{name}: per-point / bare at the same points", b["per_point"] / b["bare_points"], TARGETS_PP[name])
            if "nhwc_per_point" in b:
                add(f"{name}: per-point NHWC / bare NHWC at the same points",
                    b["nhwc_per_point"] / b["nhwc_bare_points"], TARGETS_PP[name])
        if device == "cpu" and name == "resnet20":
            add(f"{name}: naive / per-point run", b["naive"] / b["per_point_run"], 1.3, upper=False)
        if device == "cuda" and name in ("cnn", "resnet20"):
            add(f"{name}: per-point run / best-K run", b["per_point_run"] / b["calibrated_run"], 5, upper=False)
        if device == "cuda" and name == "resnet20":
            add(f"{name}: naive / best-K run", b["naive"] / b["calibrated_run"], 20, upper=False)
        add(f"{name}: auto (incl. calibration, N={s['points']}) / per-point run", b["auto"] / b["per_point_run"], 1.05)
    if i2 is not None:
        add(f"sample_surface cnn: call / (N x bare θ*), N={i2['points']}", i2["overhead_call"], 1.10)
    return out


def sample_surface_overhead(dev: torch.device, threads: int, side: int, log) -> dict:
    """The digits CNN through ``lsurf.sample_surface`` (layout and K chosen as users get them) on a
    ``side`` x ``side`` grid: the whole call, and the file's own wall and evaluation seconds, over N x
    the bare pass at θ*."""
    data = lsurf.load_data("digits", ("train",))
    torch.manual_seed(0)
    model = lsurf.load_model("cnn", tuple(data["train"].x.shape[1:]), 10).eval().to(dev)
    dirs = lsurf.random_directions(model, seed=0)
    grid = lsurf.Grid.parse(f"-1:1:{side}", f"-1:1:{side}")
    batches = resident_batches(data["train"], batch_size(dev), dev, torch.float32)
    bare_pass(model, batches)
    repeats = 7 if side > 2 else 1
    bare = [timed(dev, bare_pass, model, batches)[0] for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        t_call, surface = timed(dev, lambda: lsurf.sample_surface(
            model, data, dirs, grid, Path(tmp) / "s.h5", device=dev.type, threads=threads, progress=False,
            overwrite=True))
    bare += [timed(dev, bare_pass, model, batches)[0] for _ in range(repeats)]
    n, med, attrs = grid.num_points, statistics.median(bare), surface.attrs
    log(f"  sample_surface: {n} points in {t_call:.2f} s, load {load_avg()}")
    return {"points": n, "bare_median_ms": 1e3 * med, "call_seconds": t_call,
            "wall_seconds": float(attrs["wall_seconds"]), "eval_seconds": float(attrs["eval_seconds_total"]),
            "write_seconds": float(np.sum(attrs["rank_write_seconds"])),
            "points_per_pass": int(attrs["points_per_pass"]), "channels_last": int(attrs["channels_last"]),
            "overhead_call": t_call / (n * med)}


def print_sample_surface(i2: dict) -> None:
    n, floor = i2["points"], i2["points"] * i2["bare_median_ms"] / 1e3
    print(f"\nlsurf.sample_surface, digits CNN, {n} points (chose K={i2['points_per_pass']}, "
          f"channels_last={i2['channels_last']}); seconds and / (N x bare θ*, median)")
    for label, v in (("N x bare pass at θ*", floor), ("evaluation (eval_seconds_total)", i2["eval_seconds"]),
                     ("sampling loop (wall_seconds)", i2["wall_seconds"]),
                     ("whole call (set-up, choices, file)", i2["call_seconds"])):
        print(f"  {label:<40}{v:>9.3f}{v / floor:>9.3f}")
    print(f"  writes {1e3 * i2['write_seconds']:.1f} ms")


def thread_choice(dev: torch.device, threads: int, data: str = SYNTH) -> dict:
    """lsurf's threads per rank here, and why: a ResNet-20 pass (over ``data``: 1,000 images) with 1
    and with all cores' threads, with the cores free and with one busy neighbour (what every rank is
    under MPI)."""
    cpus = len(os.sched_getaffinity(0))
    model = lsurf.load_model("resnet20", (3, 32, 32), 10).eval()
    batches = resident_batches(lsurf.load_data(data, ("train",))["train"], 128, dev, torch.float32)
    best: dict[str, float] = {}
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for n in sorted({1, cpus}):
                torch.set_num_threads(n)
                bare_pass(model, batches[:1])
                best[f"{n} thread(s), {'one core busy' if busy else 'cores free'}"] = min(
                    timed(dev, bare_pass, model, batches)[0] for _ in range(2))
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    torch.set_num_threads(threads)
    return {"cpus": cpus, "alone": threads_per_rank(World(cpus=cpus)),
            "two_ranks": threads_per_rank(World(size=2, local_size=2, cpus=max(1, cpus // 2))),
            "resnet20_pass_seconds": best}


def print_thread_choice(tc: dict) -> None:
    print(f"\nthreads: {tc['cpus']} CPUs here; lsurf takes {tc['alone']} thread(s) alone, {tc['two_ranks']} per rank "
          "with 2 ranks on the node (OMP_NUM_THREADS or --threads override)")
    for label, seconds in tc["resnet20_pass_seconds"].items():
        print(f"  ResNet-20 pass, {label:<34}{1e3 * seconds:>10.1f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and rounds (about two minutes)")
    ap.add_argument("--smoke", action="store_true", help="every measurement once on tiny inputs (seconds; "
                    "checks the script runs, its figures mean nothing)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one rank's layout)")
    ap.add_argument("--only", help="comma-separated model names to run (default: all)")
    ap.add_argument("--no-sample-surface", action="store_true", help="skip the sample_surface measurement")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-choice measurement")
    ap.add_argument("--naive-worker", help=argparse.SUPPRESS)  # internal: the naive loop in its own process
    ap.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.naive_worker:
        naive_worker(Case(**json.loads(args.naive_worker)), args.device, args.threads, args.rounds)
        return 0

    dev = configure_process(World(), args.device, args.threads)  # threads and malloc settings, as lsurf sets them
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load0, t_start = load_avg(), time.perf_counter()
    print(f"device {dev}, {torch.get_num_threads()} threads, torch {torch.__version__}, load {load0}")
    summaries = []
    for case in cases(args.device, args.quick, args.smoke):
        if not args.only or case.model in args.only.split(","):
            log(f"{case.model} on {case.data}: {case.points} points x {case.rounds} rounds")
            summaries.append(measure(case, dev, args.threads, log))
            print_case(summaries[-1])
    tc = None
    if not args.no_threads and dev.type == "cpu" and len(os.sched_getaffinity(0)) > 1:
        tc = thread_choice(dev, args.threads, SMOKE_SYNTH if args.smoke else SYNTH)
        print_thread_choice(tc)
    i2 = None
    if not args.no_sample_surface and (args.smoke or not args.only or "cnn" in args.only.split(",")):
        i2 = sample_surface_overhead(dev, args.threads, 2 if args.smoke else 9 if args.quick else 21, log)
        print_sample_surface(i2)
    goals = targets(summaries, i2, args.device)
    print("\ntargets:")
    for label, value, want, ok in goals:
        print(f"  {label:<62}{value:>8.3f} {want:<8} {'met' if ok else 'MISSED'}")
    print(f"load average before {load0}, after {load_avg()}; {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"bench": "speed", "device": str(dev), "threads": torch.get_num_threads(), "quick": args.quick,
                      "smoke": args.smoke, "cases": summaries, "sample_surface": i2, "threads_choice": tc,
                      "targets": {g[0]: {"value": round(g[1], 4), "target": g[2], "met": g[3]} for g in goals}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
