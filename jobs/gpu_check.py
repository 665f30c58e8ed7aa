"""The first hour on a GPU node as a checklist: every step passes or says what is wrong.

    bash jobs/gpu_check.sh [--cpu] [--out DIR] [--only STEP,...] [--budget SECONDS]

Installs nothing: runs the Python it was started with (the node's own torch) on this checkout.
Each step runs in its own process under its own time limit, so a hang or a crash fails that step
only. ``DIR/summary.txt`` (one line per step: ok / FAILED / skipped, and why) and
``DIR/numbers.json`` are rewritten as each step ends, so a run cut short still leaves what
finished; each step's output is in ``DIR/logs/STEP.log``. ``--cpu`` runs every step that can run
without a GPU, at small sizes (the check's own plumbing, for CI).

Exit status: 0 every step ok or skipped, 1 a step FAILED, 2 the node cannot run the check at all
(no CUDA, a missing module: one line on stderr, within seconds).

This file is the driver and needs only the standard library; the steps are in gpu_check_steps.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    seconds: int  # its time box
    cuda_only: bool
    what: str  # what "ok" means, for --list


STEPS = (
    Step("preflight", 60, False, "versions of Python, torch, CUDA, cuDNN, the GPUs; h5py's MPI build; mpirun"),
    Step("cuda_tests", 150, True, "the CUDA tests in tests/ pass, none skipped"),
    Step("bn_ieee", 60, True, "ResNet-20 with BatchNorm: GPU = CPU in IEEE float32 (rel <= 1e-5); TF32 shown"),
    Step("stacked", 60, False, "K points per vmap-ed forward = per point, float32/bf16 x NCHW/NHWC, BatchNorm"),
    Step("syncs", 45, True, "at most one host synchronisation per pass (torch.cuda.set_sync_debug_mode)"),
    Step("bn_recalibrate", 45, True, "--bn recalibrate: GPU = CPU (rel <= 1e-5)"),
    Step("hessian", 60, True, "float64 Hessian extremes at a point: GPU = CPU (rel <= 1e-6)"),
    Step("streamed", 45, False, "streamed batches = resident batches, bit for bit"),
    Step("regenerated", 45, False, "regenerated directions = held directions, bit for bit"),
    Step("headline_ieee", 75, False, "ResNet-20 on 50,000 + 10,000 CIFAR-shaped images, IEEE float32: s/point, "
                                     "peak memory, K"),
    Step("headline_tf32", 60, True, "the same with --tf32"),
    Step("headline_bf16", 60, False, "the same with --amp bf16 in channels-last"),
    Step("cli", 120, False, "python -m lsurf: --points-per-pass 4 --amp bf16 --fidelity on; --resident never = "
                            "always bit for bit; --hessian; --verify"),
    Step("mpi", 90, False, "two ranks on one GPU refused; the surface under mpirun = one process"),
    Step("bench", 240, True, "bench/bench_speed.py --device cuda --quick exits 0"),
)
BY_NAME = {s.name: s for s in STEPS}


@dataclass
class Result:
    status: str  # ok | FAILED | skipped | running | pending
    why: str = ""
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0
    fatal: bool = False  # the node cannot run the check at all (preflight)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:<16}{'(CUDA) ' if s.cuda_only else ''}{s.what}")
        return 0
    if args.step:
        return _run_step_here(args)
    return _drive(args)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run what can run without a GPU, small (CUDA steps skipped)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "gpu_check", help="results (default out/gpu_check)")
    ap.add_argument("--only", help="comma-separated steps to run (preflight always runs)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    ap.add_argument("--list", action="store_true", help="list the steps and what each checks")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = ap.parse_args(argv)
    if args.step and args.step not in BY_NAME:
        ap.error(f"--step {args.step!r}: expected one of {', '.join(BY_NAME)}")
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in BY_NAME]
        if unknown:
            ap.error(f"--only {','.join(unknown)}: expected steps from {', '.join(BY_NAME)}")
    args.out = args.out.resolve()
    return args


def _drive(args: argparse.Namespace) -> int:
    """Run the steps in order, each in its own process, reporting as each ends."""
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    chosen = set(args.only.split(",")) | {"preflight"} if args.only else set(BY_NAME)
    results = {s.name: Result("pending") for s in STEPS}
    deadline = time.monotonic() + args.budget
    for step in STEPS:
        if step.name not in chosen:
            results[step.name] = Result("skipped", "not in --only")
        elif args.cpu and step.cuda_only:
            results[step.name] = Result("skipped", "(--cpu): needs CUDA")
        elif deadline - time.monotonic() < 5:
            results[step.name] = Result("FAILED", f"not run: the check's {args.budget:.0f} s were spent")
        else:
            results[step.name] = Result("running", f"time box {step.seconds} s")
            _write_reports(args, results)
            results[step.name] = _run_isolated(step, args, min(step.seconds, deadline - time.monotonic()))
        _write_reports(args, results)
        if results[step.name].fatal or (step.name == "preflight" and results[step.name].status != "ok"):
            for rest in STEPS[STEPS.index(step) + 1:]:
                results[rest.name] = Result("skipped", "not run: the preflight failed")
            _write_reports(args, results)
            print(f"gpu_check: error: {results[step.name].why}", file=sys.stderr)
            return 2
        print(_line(step.name, results[step.name]), flush=True)
    print(f"gpu_check: summary in {args.out / 'summary.txt'}, figures in {args.out / 'numbers.json'}", flush=True)
    return 1 if any(r.status == "FAILED" for r in results.values()) else 0


def _run_isolated(step: Step, args: argparse.Namespace, limit: float) -> Result:
    """``step`` in a new process (and process group) of this Python, stopped after ``limit`` seconds
    together with whatever it started (pytest's subprocesses, mpirun and its ranks)."""
    done, partial = _result_paths(args.out, step.name)
    for stale in (done, partial):
        stale.unlink(missing_ok=True)
    log = args.out / "logs" / f"{step.name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--out", str(args.out)]
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd + ["--cpu"] * args.cpu, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env=_env(), start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(p)
            rc = None
    seconds = time.monotonic() - t0
    if done.exists():
        result = Result(**json.loads(done.read_text()))
    else:
        numbers = json.loads(partial.read_text()) if partial.exists() else {}
        why = (f"timed out after {limit:.0f} s (its time box)" if rc is None
               else f"ended with exit status {rc} before reporting: {_last_line(log)}")
        result = Result("FAILED", f"{why}; see {log}", numbers)
    result.seconds = round(seconds, 1)
    return result


def _stop_group(p: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (mpirun passes it on to its ranks), SIGKILL 5 s later."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)  # whatever it started and left behind
    except ProcessLookupError:
        pass
    p.wait()


def _env() -> dict[str, str]:
    """The step's environment: this checkout first on the import path; Open MPI allowed as root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1"})
    return env


def _last_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _result_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / "steps" / f"{name}.json", out / "steps" / f"{name}.partial.json"


def _line(name: str, r: Result) -> str:
    secs = f" [{r.seconds:.0f} s]" if r.status in ("ok", "FAILED") else ""
    return f"{name:<16}{r.status:<9}{r.why}{secs}".rstrip()


def _write_reports(args: argparse.Namespace, results: dict[str, Result]) -> None:
    """summary.txt and numbers.json, each replaced whole (written aside, then renamed)."""
    mode = "cpu" if args.cpu else "gpu"
    summary = "".join(_line(n, r) + "\n" for n, r in results.items())
    figures = {"mode": mode, "budget_s": args.budget, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "steps": {n: {k: v for k, v in asdict(r).items() if k != "fatal"} for n, r in results.items()}}
    for name, text in (("summary.txt", summary), ("numbers.json", json.dumps(figures, indent=1, default=str))):
        tmp = args.out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(args.out / name)


def _run_step_here(args: argparse.Namespace) -> int:
    """One step in this process: its result goes to DIR/steps/STEP.json for the driver."""
    done, partial = _result_paths(args.out, args.step)
    done.parent.mkdir(parents=True, exist_ok=True)
    try:
        import gpu_check_steps as steps  # torch, numpy, h5py, lsurf: missing ones end the check here
    except ImportError as e:
        result = Result("FAILED", f"{Path(sys.executable).name} cannot import {e.name or e}: {e}; run with "
                        "LSURF_PYTHON=<the Python that has torch, numpy, h5py>", fatal=True)
    else:
        ctx = steps.Ctx(cpu=args.cpu, out=args.out, partial=partial)
        try:
            ok, why = getattr(steps, args.step)(ctx)
            result = Result("ok" if ok else "FAILED", why, ctx.numbers)
        except steps.Skip as e:
            result = Result("skipped", str(e), ctx.numbers)
        except steps.Fatal as e:
            result = Result("FAILED", str(e), ctx.numbers, fatal=True)
        except Exception as e:  # the step's own failure: reported, with the traceback in its log
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            result = Result("FAILED", f"{type(e).__name__}: {first}", ctx.numbers)
    done.write_text(json.dumps(asdict(result), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
