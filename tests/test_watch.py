"""Reading a file a job is writing: no lock taken, a half-written read tried again, the job's state
(running, rate, ETA; finished; unfinished) and ``lsurf watch``'s drawings. The drills with real
jobs are tests/test_watch_drill.py."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import _env
from inprocess import cli

from lsurf.cli.watch import CtrlC
from lsurf.engine.formats import progress
from lsurf.engine.formats.surface_file import READ_TRIES, TileWriter, _torn, create, read_surface, set_attrs
from lsurf.engine.geometry.grid import Grid, Tile
from lsurf.errors import UserError
from lsurf.post.plot import figure_title
from lsurf.post.watch import CHARACTERS, frame, shrink, watch

X, Y = np.linspace(-1, 1, 6), np.linspace(-1, 1, 4)
LOSS = 1 + np.add.outer(Y**2, X**2)  # (ny, nx), its minimum 1 at the centre


def partial(path, rows: int = 2, *, running: bool = True, started: dict | None = None, planes: int | None = None):
    """A file as a job leaves it mid-run: its first ``rows`` rows done (``LOSS``, accuracy 50), and,
    ``running``, the job's lock file beside it and ``run_started`` (default: another node's job
    that began 10 s ago with nothing done)."""
    grid = Grid(X, Y, planes)
    started = {"time": time.time() - 10, "done": 0, "host": "another-node", "pid": 1} if started is None else started
    create(path, grid, ["train_loss", "train_acc"], {}, {progress.RUN_STARTED: json.dumps(started)})
    w = TileWriter(path, grid)
    for k in range(planes or 1):
        w.write(Tile(k, 0, rows, 0, len(X), plane=k),
                {"train_loss": LOSS[:rows] + k, "train_acc": np.full((rows, len(X)), 50.0)})
    w.close()
    if running:
        open(f"{path}.lock", "w").close()
    return path


def test_a_reader_takes_no_lock_and_meets_none(tmp_path):
    """HDF5's lock on the file held by someone else (as a locking writer holds it) does not stop a
    read, and reading leaves no lock file and holds no lock: the job's exclusive_lock is untouched."""
    path = partial(tmp_path / "s.h5")
    os.unlink(f"{path}.lock")
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what HDF5's own lock of a writer is
        s = read_surface(path)
        frame(s, progress.job_state(s), "train_loss", False, (80, 30))
    assert int(s.done.sum()) == 2 * len(X) and not (tmp_path / "s.h5.lock").exists()
    with open(path, "rb") as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody kept a lock behind


def test_a_half_written_file_is_read_again_not_refused(tmp_path):
    """A read that meets the file mid-update (here: half its bytes, as a metadata write in progress
    can look) is tried again with a short backoff; it succeeds once the file is whole."""
    path = partial(tmp_path / "s.h5")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    mend = threading.Timer(0.1, lambda: path.write_bytes(whole))
    mend.start()
    try:
        s = read_surface(path)
    finally:
        mend.join()
    np.testing.assert_array_equal(s.values["train_loss"][:2], LOSS[:2])


def test_a_point_done_without_values_is_read_twice(tmp_path):
    """The serial writer's values reach the disk just after the tile's ``done`` (HDF5 holds small
    writes per dataset until the flush): a point done with no value at all is read once more, and
    believed if it stays so (an overflow can make every quantity NaN)."""
    path = partial(tmp_path / "s.h5", running=False)
    w = TileWriter(path, Grid(X, Y))
    w.write(Tile(0, 3, 4, 0, 1), {"train_loss": np.full((1, 1), np.nan), "train_acc": np.full((1, 1), np.nan)})
    w.close()
    t0 = time.perf_counter()
    s = read_surface(path)
    assert time.perf_counter() - t0 >= 0.05 and s.done[3, 0] and np.isnan(s.values["train_loss"][3, 0])
    assert _torn(s) and not _torn(read_surface(partial(tmp_path / "whole.h5")))  # what makes the second read


def test_retries_are_bounded_and_a_non_hdf5_file_is_refused_at_once(tmp_path):
    path = partial(tmp_path / "s.h5")
    path.write_bytes(path.read_bytes()[:3000])  # for good
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="not a readable surface file"):
        read_surface(path)
    assert 0.05 * (2 ** (READ_TRIES - 1) - 1) <= time.perf_counter() - t0 < 4
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="not a readable surface file"):
        read_surface(junk)
    assert time.perf_counter() - t0 < 0.05


def test_running_state_rate_and_eta_from_the_file(tmp_path):
    path = partial(tmp_path / "s.h5", started={"time": 1000.0, "done": 2, "host": "another-node", "pid": 1})
    state = progress.job_state(read_surface(path), now=1010.0)
    # 12 of 24 done, 10 since the run began 10 s ago: 1 point/s, 12 s to go
    assert state == progress.JobState("running", 12, 24, 1.0, 12.0)
    assert state.line() == "running: 50 % done (12 of 24 points), 1 points/s, ETA 12 s"
    assert state.label() == "running: 50 % done, ETA 12 s"
    assert state.measured(4.0).eta_s == 3.0  # a watcher's own rate wins


def test_a_dead_jobs_lock_file_is_not_a_running_job(tmp_path):
    """A lock file left by a job killed here (its pid is gone, or a zombie nobody reaped) is no
    running job; one naming another node can only be believed."""
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitid(os.P_PID, dead, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
    here = {"time": time.time(), "done": 0, "host": socket.gethostname(), "pid": dead}
    assert progress.job_state(read_surface(partial(tmp_path / "z.h5", started=here))).state == "unfinished"
    os.waitpid(dead, 0)
    assert progress.job_state(read_surface(partial(tmp_path / "a.h5", started=here))).state == "unfinished"
    alive = {**here, "pid": os.getpid()}
    assert progress.job_state(read_surface(partial(tmp_path / "b.h5", started=alive))).running
    state = progress.job_state(read_surface(partial(tmp_path / "c.h5", running=False)))
    assert state.line() == "unfinished: 50 % done (12 of 24 points), no job is writing it"


def test_finished_states(tmp_path):
    path = partial(tmp_path / "s.h5", rows=4, running=False)  # every point, no `finished`: a curve's, Li et al.'s
    assert progress.job_state(read_surface(path)).line() == "finished: 100 % done (24 of 24 points)"
    path = partial(tmp_path / "r.h5", rows=2)
    set_attrs(path, {"finished": "2026-01-01", "refinement": json.dumps({"budget": 12, "finished": True})})
    assert progress.job_state(read_surface(path)).state == "finished"  # the lock file is stale: finished wins
    set_attrs(path, {"refinement": json.dumps({"budget": None, "finished": False})}, drop=("finished",))
    assert progress.job_state(read_surface(path)).line().startswith("running: 12 points computed (coarse to fine), ")


def test_rate_meter_reads_the_recent_speed():
    meter = progress.RateMeter(window=10)
    assert meter.observe(0, 0) is None and meter.observe(1, 0) is None
    assert meter.observe(2, 10) == 5.0
    assert meter.observe(30, 290) == pytest.approx(10.0)  # the looks older than the window are dropped
    assert meter.observe(31, 0) is None  # a new file: start again


def test_shrink_averages_whole_blocks_and_skips_undone():
    z = np.arange(16, dtype=float).reshape(4, 4)
    z[0, 0] = np.nan
    np.testing.assert_array_equal(shrink(z, 2, 2), [[(1 + 4 + 5) / 3, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(shrink(z, 9, 9), z)


def test_frame_draws_what_is_done_and_leaves_the_rest_blank(tmp_path):
    s = read_surface(partial(tmp_path / "s.h5"))
    text = frame(s, progress.job_state(s), "train_loss", False, (80, 30)).splitlines()
    assert text[1].startswith("running: 50 % done (12 of 24 points)")
    rows = text[2:6]  # top row first: β = 1 (not done) ... β = -1 (done)
    assert rows[0] == rows[1] == " " * len(X)
    assert [rows[3], rows[2]] == _characters(LOSS[:2])
    coloured = frame(s, progress.job_state(s), "train_loss", True, (80, 30)).splitlines()
    assert "\x1b[38;5;" in coloured[3] and coloured[2].strip() == ""  # two rows a line: the upper one blank


def _characters(loss: np.ndarray) -> list[str]:
    """The rows a text map draws of losses (all done): a geometric scale from their minimum to maximum."""
    t = np.log(loss / loss.min()) / np.log(loss.max() / loss.min())
    return ["".join(CHARACTERS[k] for k in np.rint(row * (len(CHARACTERS) - 1)).astype(int)) for row in t]


def test_curves_and_ensembles(tmp_path):
    grid = Grid(X, None)
    create(tmp_path / "c.h5", grid, ["train_loss"], {}, {})
    w = TileWriter(tmp_path / "c.h5", grid)
    w.write(Tile(0, 0, 1, 0, 3), {"train_loss": X[:3] ** 2})
    w.close()
    out = io.StringIO()
    assert watch(tmp_path / "c.h5", once=True, colour=False, out=out).line().startswith("unfinished: 50 % done")
    assert out.getvalue().splitlines()[2] == _characters(X[None, :3] ** 2)[0] + "   "
    path = partial(tmp_path / "e.h5", planes=3, running=False)
    out = io.StringIO()
    watch(path, plane=2, once=True, colour=False, out=out)
    assert out.getvalue().startswith(f"{path}: train_loss, plane 2 of 3\nunfinished: 50 % done (36 of 72 points)")
    with pytest.raises(UserError, match="`plane` 3"):
        watch(path, plane=3, once=True, out=io.StringIO())


def test_watch_waits_for_the_file_and_keeps_the_page(tmp_path):
    """Started before the job made its file, the watcher waits; it draws until the job ends
    (here: a finished file appears) and leaves the page without its reload."""
    pytest.importorskip("plotly")
    path, page = tmp_path / "s.h5", tmp_path / "s.html"

    def job() -> None:  # as a job does: the lock first, then the file, filled, finished, the lock gone
        open(f"{path}.lock", "w").close()
        set_attrs(partial(path, rows=4, running=False), {"finished": "now"})
        os.unlink(f"{path}.lock")

    later = threading.Timer(0.3, job)
    later.start()
    out = io.StringIO()
    try:
        state = watch(path, interval=0.05, html=page, colour=False, out=out)
    finally:
        later.join()
    assert state is not None and state.state == "finished"
    assert out.getvalue().startswith(f"waiting for {path} to appear")
    assert 'http-equiv="refresh"' not in page.read_text()
    running = partial(tmp_path / "r.h5")
    watch(running, once=True, html=page, out=io.StringIO())
    assert '<meta http-equiv="refresh" content="2">' in page.read_text()
    assert "running: 50 % done" in page.read_text()


def test_titles_and_commands_say_the_file_is_running(tmp_path):
    path = partial(tmp_path / "s.h5")
    s = read_surface(path)
    assert "\nrunning: 50 % done, ETA " in figure_title(s, "train_loss")
    assert "(blank: not done yet)" in figure_title(s, "train_loss")
    info = cli("info", path, check=True).stdout
    assert "state:              running: 50 % done (12 of 24 points), " in info
    plot = cli("plot", path, "--kind", "heatmap", "--out-dir", tmp_path, check=True).stdout
    assert "state: running: 50 % done (12 of 24 points)" in plot
    csv = tmp_path / "s.csv"
    assert "state: running" in cli("export", path, "--format", "csv", "--out", csv, check=True).stdout
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert all((r[2] == "") == (r[-1] == "0") for r in rows) and sum(r[-1] == "1" for r in rows) == 12
    assert cli("watch", path, "--once").returncode == 0
    os.unlink(f"{path}.lock")
    assert cli("watch", path, "--once").returncode == 1  # the job ended unfinished
    missing = cli("watch", tmp_path / "none.h5", "--once")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_fill_draws_a_running_grid_whole_from_its_coarse_points(tmp_path):
    """Every other row and column done (what a coarse-first order computes first): ``fill`` draws
    the plane whole, interpolated between them (exactly, for a linear loss), and says so."""
    x = y = np.linspace(-1, 1, 9)
    grid = Grid(x, y)
    plane = 5 + np.add.outer(3 * y, 2 * x)
    path = tmp_path / "s.h5"
    create(path, grid, ["train_loss"], {}, {})
    w = TileWriter(path, grid)
    for j in range(0, 9, 2):
        for i in range(0, 9, 2):
            w.write(Tile(0, j, j + 1, i, i + 1), {"train_loss": plane[j:j + 1, i:i + 1]})
    w.close()
    open(f"{path}.lock", "w").close()
    s = read_surface(path)
    assert s.view().surface is s  # unasked, a whole grid not done is drawn as it is
    filled = s.view(fill=True).surface
    np.testing.assert_allclose(filled.values["train_loss"], plane, rtol=0, atol=1e-12)
    assert int(filled.computed.sum()) == 25 and filled.done.all()
    assert progress.job_state(filled).line().startswith("running: 31 % done (25 of 81 points)")
    assert "25 of 81 points computed, the rest interpolated" in figure_title(filled, "train_loss")
    out = io.StringIO()
    watch(path, once=True, fill=True, colour=False, out=out)
    assert " " not in "".join(out.getvalue().splitlines()[2:11])  # nine rows, no blank left
    assert "between computed points interpolated" in out.getvalue()
    p = cli("plot", path, "--fill", "--kind", "heatmap", "--out-dir", tmp_path, check=True)
    assert "coverage: 25/81 points" in p.stdout


@pytest.mark.cli
def test_ctrl_c_ends_the_watch_cleanly(tmp_path):
    """SIGINT (Ctrl-C) while watching a running job: exit 0, no traceback, the page whole."""
    path, page = partial(tmp_path / "s.h5"), tmp_path / "s.html"
    cmd = [sys.executable, "-m", "lsurf", "watch", str(path), "--interval", "0.1", "--html", str(page)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(f"{path}: train_loss")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err
    assert page.read_text().rstrip().endswith("</html>") and not (tmp_path / "s.html.tmp").exists()


def test_ctrl_c_flag_takes_no_lock_and_cuts_only_the_sleep():
    """The CLI's Ctrl-C: asked before the sleep, no sleep; asked during it, the sleep ends at once
    (KeyboardInterrupt, which watch takes as the end); outside the sleep it only sets the flag."""
    stop = CtrlC()
    previous = signal.signal(signal.SIGALRM, stop.handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            stop.wait(600)
        assert stop.is_set() and not stop.sleeping
        stop.handler(signal.SIGINT, None)  # not sleeping: no raise
        stop.wait(600)  # asked already: returns without sleeping
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
