"""Where a surface file's job stands, from the file alone: finished, running (how fast, how long
still) or unfinished with no job writing it.

Why from the file: ``lsurf info``, plots and ``lsurf watch`` read a file that a job may be writing
on another node; they must neither talk to the job nor touch its lock. What they go by:

- ``finished``: the sampler sets it when a run ends and drops it when a run starts, so it is there
  exactly when the last run ended (files without it whose every point is done, e.g. a curve's or
  Li et al.'s, are finished too);
- ``PATH.lock``: it exists while a job holds it (surface_file.exclusive_lock) — a job killed by
  SIGKILL leaves it behind, so where ``run_started`` names this host, its pid must be alive too;
- ``run_started``: when the current run began and how many points were done then, from which the
  rate of a one-off look follows; a watcher measures its own rate from the done mask over time.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lsurf.engine.formats.surface_file import Surface

RUN_STARTED = "run_started"  # attribute: JSON {time, done, host, pid} of the run writing the file
RUNNING, FINISHED, UNFINISHED = "running", "finished", "unfinished"


def run_started(done: int) -> str:
    """The ``run_started`` attribute of a run starting now with ``done`` points already done."""
    return json.dumps({"time": time.time(), "done": done, "host": socket.gethostname(), "pid": os.getpid()})


@dataclass(frozen=True)
class JobState:
    """A file's state: ``done`` of ``total`` points (None: a coarse-to-fine run without a budget
    has no fixed total), the current run's ``rate`` in points per second and its ``eta_s`` (None
    where unknown)."""

    state: str
    done: int
    total: int | None
    rate: float | None = None
    eta_s: float | None = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def measured(self, rate: float | None) -> JobState:
        """This state with a rate the caller measured (a watcher's, over its recent looks), where it has one."""
        if not self.running or rate is None:
            return self
        return replace(self, rate=rate, eta_s=None if self.total is None else (self.total - self.done) / rate)

    def label(self) -> str:
        """The short form a figure's title has room for: ``running: 37 % done, ETA 12 min``."""
        done = f"{100 * self.done / self.total:.0f} % done" if self.total else f"{self.done} points computed"
        eta = f", ETA {duration(self.eta_s)}" if self.running and self.eta_s is not None else ""
        return f"{self.state}: {done}{eta}"

    def line(self) -> str:
        """``running: 37 % done (963 of 2601 points), 12.3 points/s, ETA 12 min`` and the like."""
        if self.total:
            head = f"{self.state}: {100 * self.done / self.total:.0f} % done ({self.done} of {self.total} points)"
        else:
            head = f"{self.state}: {self.done} points computed (coarse to fine)"
        if self.state == UNFINISHED:
            return head + ", no job is writing it"
        if self.state == FINISHED:
            return head
        speed = "" if self.rate is None else f", {self.rate:.3g} points/s"
        eta = "" if self.total is None else f", ETA {'not known yet' if self.eta_s is None else duration(self.eta_s)}"
        return head + speed + eta


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.2 h``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def job_state(surface: Surface, rate: float | None = None, now: float | None = None) -> JobState:
    """The state of ``surface``'s file as read; ``rate`` (points/s) where the caller measured one,
    else the current run's average since ``run_started``."""
    measured = surface.done if surface.computed is None else surface.computed
    done = int(measured.sum())
    ref = surface.refinement
    if ref is not None:
        total = ref["budget"] if not ref["finished"] else done
    else:
        total = int(measured.size)
    if not _job_alive(Path(surface.path), surface.attrs):
        finished = "finished" in surface.attrs or (ref["finished"] if ref is not None else done == total)
        return JobState(FINISHED if finished else UNFINISHED, done, total)
    now = time.time() if now is None else now
    rate = _average_rate(surface.attrs, done, now) if rate is None else rate
    eta = (total - done) / rate if rate and total is not None else None
    return JobState(RUNNING, done, total, rate, eta)


def _job_alive(path: Path, attrs: dict) -> bool:
    """Is a job writing the file? Its lock file says so, unless it names a dead process here."""
    if "finished" in attrs or not Path(f"{path}.lock").exists():
        return False
    started = _started(attrs)
    if started is None or started.get("host") != socket.gethostname():
        return True  # another node's job: its lock file is all there is to go by
    pid = int(started["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A process that has ended but is not yet reaped (a killed rank whose parent has gone, under
    an init that does not reap) still answers ``kill(pid, 0)``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _started(attrs: dict) -> dict | None:
    try:
        return json.loads(attrs[RUN_STARTED])
    except (KeyError, TypeError, ValueError):
        return None


def _average_rate(attrs: dict, done: int, now: float) -> float | None:
    started = _started(attrs)
    if started is None or done <= started["done"] or now <= started["time"]:
        return None
    return (done - started["done"]) / (now - started["time"])


class RateMeter:
    """Points per second over the last ``window`` seconds of a watcher's looks at the done count:
    the current speed, where the run's average since it began would lag behind a change."""

    def __init__(self, window: float = 60.0):
        self.window = window
        self.seen: list[tuple[float, int]] = []

    def observe(self, t: float, done: int) -> float | None:
        """Record a look; the rate since the oldest look in the window (None before progress shows)."""
        if self.seen and done < self.seen[-1][1]:
            self.seen.clear()  # a new file (overwrite): start again
        self.seen.append((t, done))
        while len(self.seen) > 2 and self.seen[1][0] < t - self.window:
            self.seen.pop(0)
        t0, d0 = self.seen[0]
        return (done - d0) / (t - t0) if done > d0 and t > t0 else None
