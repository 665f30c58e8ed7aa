"""``lsurf watch`` polling every 0.2 s beside a real 4-rank job that is killed and resumed: the job
neither waits for it nor notices it (the values equal an unwatched run's, bit for bit), and the
watcher draws the partly done file, says when the job died, and ends when the resumed job ends.

The jobs hold their ranks mid-run (tests/hold_plugin.py), so the watcher sees them running
whatever the machine's load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import _env, mpi_command, requires_mpi
from hold_plugin import PINNED, SPEC, flags, hold_env, reference, release, stop, wait_held

pytestmark = [requires_mpi, pytest.mark.mpi]
RANKS, TOTAL, TILE = 4, 9 * 9, 3
SETTINGS = {"data": "digits", "subset": 64, "batch_size": 64, "x": "-1:1:9", "y": "-1:1:9", "tile": f"1x{TILE}",
            **PINNED}


class Watcher:
    """``lsurf watch FILE --interval 0.2`` in its own process, its output gathered line by line."""

    def __init__(self, path, page):
        cmd = [sys.executable, "-m", "lsurf", "watch", str(path), "--interval", "0.2", "--html", str(page)]
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            self.lines.append(line)

    def states(self) -> list[str]:
        return [line.strip() for line in list(self.lines) if line.startswith(("running:", "finished:", "unfinished:"))]

    def wait_for(self, start: str, timeout: float = 60) -> str:
        """The first state line that starts with ``start``, once the watcher has drawn it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((s for s in self.states() if s.startswith(start)), None)
            if hit is not None:
                return hit
            assert self.proc.poll() is None or self.reader.is_alive(), "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"the watcher never drew {start!r}:\n{''.join(self.lines)}")

    def end(self, timeout: float = 30) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(timeout=5)
        return rc


def _job(args, out, folder):
    """The job, every rank held once it has finished one tile."""
    return subprocess.Popen(mpi_command(RANKS, *args, "--out", out), env=_env(hold_env(folder, TILE)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_watched_job_killed_and_resumed_equals_an_unwatched_run(digits_checkpoint, tmp_path):
    args = ["surface", "--model", SPEC, "--checkpoint", digits_checkpoint, "--no-progress", *flags(SETTINGS)]
    out, page = tmp_path / "s.h5", tmp_path / "s.html"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    watcher = Watcher(out, page)  # before the job has made the file: it waits
    job = _job(args, out, tmp_path / "a")
    try:
        pids = wait_held(tmp_path / "a", RANKS, job)
        seen = watcher.wait_for("running:")
        os.kill(pids[1], signal.SIGKILL)
        job.wait(timeout=30)
        assert watcher.end() == 1  # the job ended unfinished
    finally:
        stop(job)
    assert watcher.lines[0].startswith(f"waiting for {out} to appear")
    assert "% done" in seen and watcher.states()[-1].startswith("unfinished:")
    with h5py.File(out, "r") as f:
        done_before = int(f["done"][()].sum())
    assert 0 < done_before < TOTAL

    resumed = _job(args, out, tmp_path / "b")
    try:
        wait_held(tmp_path / "b", RANKS, resumed)
        watcher = Watcher(out, page)
        watcher.wait_for("running:")
        assert 'http-equiv="refresh"' in page.read_text()  # the page reloads itself while the job runs
        release(tmp_path / "b")
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read() if resumed.stderr else ""
        assert watcher.end() == 0
    finally:
        stop(resumed)
    assert watcher.states()[-1] == f"finished: 100 % done ({TOTAL} of {TOTAL} points)"
    assert 'http-equiv="refresh"' not in page.read_text()
    unwatched = reference(digits_checkpoint, tmp_path / "unwatched.h5", SETTINGS)
    with h5py.File(out, "r") as f:
        assert f["done"][()].all()
        assert f.attrs["rank_points"].sum() == TOTAL - done_before  # nothing finished was computed again
        for k, v in unwatched.items():
            np.testing.assert_array_equal(f[k][()], v)
