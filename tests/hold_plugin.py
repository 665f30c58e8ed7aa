"""A model plug-in that holds its rank mid-run, so a drill kills a job it knows is running.

``--model hold_plugin:make`` is the digits CNN (a subclass: the zoo ``cnn``'s checkpoints load and
its values are the zoo's). With ``LSURF_TEST_HOLD_AT=H`` and ``LSURF_TEST_HOLD_DIR=D`` set, each
rank's H-th forward writes its pid to ``D/held.<rank>`` and waits until ``D/release`` exists:
the job is then mid-run for as long as the test needs, on every rank, whatever the machine's load.
With ``LSURF_TEST_FAIL_RANK=R`` too, rank R raises once released: a rank failing mid-run.
The same spec without the variables is the same model (the file's identity names the spec), so
the resumed job runs to the end.

Forwards map to points when the run pins them: ``--points-per-pass 1``, ``--batch-size`` at least
a rank's share of the subset (one forward per point and split), ``--layout`` pinned (no timing
forwards) and ``--fidelity off``; every rank first makes one forward of its own
(``check_outputs_fit``), so :func:`hold_env` asks for forward ``PREFLIGHT + points + 1``.

The functions below the model are the test side (this module never imports the test suite).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from lsurf import Options, run_surface
from lsurf.engine.model.models import DigitsCNN

HOLD_AT, HOLD_DIR, FAIL_RANK = "LSURF_TEST_HOLD_AT", "LSURF_TEST_HOLD_DIR", "LSURF_TEST_FAIL_RANK"
PREFLIGHT = 1  # forwards a rank makes before its first point: one tiny batch proving model and data fit
MAX_HOLD_S = 120.0  # a test that fails before releasing or killing the job must not leave it behind
SPEC = "hold_plugin:make"
PINNED = {"points_per_pass": 1, "layout": "contiguous", "fidelity": "off"}  # forwards <-> points (see above)


class HeldCNN(DigitsCNN):
    forwards = 0  # per process: the evaluator may work on a copy of the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        HeldCNN.forwards += 1
        if os.environ.get(HOLD_AT) == str(HeldCNN.forwards):
            _hold(Path(os.environ[HOLD_DIR]), _rank())
        return super().forward(x)


def _rank() -> str:
    """This process's rank, from its launcher: mpirun sets ``OMPI_COMM_WORLD_RANK``; ``srun --mpi=pmix``
    sets ``PMIX_RANK``; torchrun ``RANK``; a process started alone is rank 0."""
    for name in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"):
        if name in os.environ:
            return os.environ[name]
    return "0"


def make() -> HeldCNN:
    return HeldCNN()


def _hold(folder: Path, rank: str) -> None:
    """Say so (pid in ``held.<rank>``, written whole before it appears), then wait for ``release``."""
    tmp = folder / f".held.{rank}"
    tmp.write_text(str(os.getpid()))
    tmp.rename(folder / f"held.{rank}")
    deadline = time.monotonic() + MAX_HOLD_S
    while not (folder / "release").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"held for {MAX_HOLD_S} s and never released")
        time.sleep(0.01)
    if os.environ.get(FAIL_RANK) == rank:
        raise RuntimeError(f"rank {rank} fails as the test asked ({FAIL_RANK})")


def flags(settings: dict) -> list[str]:
    """``{"batch_size": 64}`` as the CLI's ``["--batch-size", "64"]``, so that a test states its
    settings once for the CLI and for :class:`lsurf.Options`."""
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def hold_env(folder: Path, points: int) -> dict[str, str]:
    """Environment for a job whose every rank holds once it has finished ``points`` points."""
    return {HOLD_AT: str(PREFLIGHT + points + 1), HOLD_DIR: str(folder), **plugin_env()}


def plugin_env() -> dict[str, str]:
    """Environment that lets the ranks import this module (``--model hold_plugin:make``)."""
    here = str(Path(__file__).resolve().parent)
    rest = os.environ.get("PYTHONPATH") or str(Path(here).parent)
    return {"PYTHONPATH": f"{here}{os.pathsep}{rest}"}


def reference(checkpoint: Path, out: Path, settings: dict) -> dict[str, np.ndarray]:
    """The values of an uninterrupted run, computed independently of the drill's job: in this
    process, one rank, the zoo's ``cnn`` (the plug-in's network) through the library."""
    surface = run_surface(Options(model="cnn", checkpoint=str(checkpoint), out=str(out), progress=False, **settings))
    assert surface is not None and surface.done.all()
    return {k: surface.values[k] for k in ("train_loss", "train_acc")}


def wait_held(folder: Path, ranks: int, proc: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """The pid of each rank once all ``ranks`` hold; a job that ends first fails the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [folder / f"held.{r}" for r in range(ranks)]
        if all(f.exists() for f in files):
            return {r: int(f.read_text()) for r, f in enumerate(files)}
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            logs = "".join(f"\n{log.name}:\n{log.read_text()[-3000:]}" for log in sorted(folder.glob("job-*.log")))
            raise AssertionError(f"the job ended ({proc.returncode}) before its ranks held:\n{err}{logs}")
        time.sleep(0.02)
    raise AssertionError(f"ranks not all held after {timeout} s")


def release(folder: Path) -> None:
    (folder / "release").touch()


def stop(proc: subprocess.Popen) -> None:
    """End an mpirun job whatever state a failed test left it in: SIGTERM, on which mpirun ends its
    ranks, held or not (a SIGKILL'd mpirun could leave them behind); SIGKILL if that hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
