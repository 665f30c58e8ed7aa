"""Failure drills with real processes: nothing finished is lost, nothing is recomputed.

Every drill's job holds its ranks at a chosen point (tests/hold_plugin.py) before it is killed or
signalled, so the kill lands mid-run by construction, whatever the machine's load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import _env, mpi_command, mpirun, rank_pids, requires_mpi
from hold_plugin import PINNED, SPEC, flags, hold_env, plugin_env, reference, stop, wait_held

pytestmark = [requires_mpi, pytest.mark.mpi]
TOTAL, TILE = 9 * 9, 1
# One forward per point on every rank (the batch holds the whole subset), tiles of TILE points (coarse-first
# tiles of more points differ in size: their blocks' lattices are 3, 2, 5, 4 and 9 columns wide).
SETTINGS = {"data": "digits", "subset": 64, "batch_size": 64, "x": "-1:1:9", "y": "-1:1:9", "tile": f"1x{TILE}",
            **PINNED}


@pytest.fixture(scope="module")
def job(digits_checkpoint, tmp_path_factory):
    """The drill's command, and the values of an uninterrupted run (:func:`hold_plugin.reference`)."""
    args = ["surface", "--model", SPEC, "--checkpoint", digits_checkpoint, "--no-progress", *flags(SETTINGS)]
    return args, reference(digits_checkpoint, tmp_path_factory.mktemp("full") / "full.h5", SETTINGS)


def _consistent(path) -> np.ndarray:
    """The file opens, and its done mask says exactly which points hold values and finish times."""
    with h5py.File(path) as f:
        done = f["done"][()].astype(bool)
        loss = f["train_loss"][()]
        stamps = f["finished_at"][()]
    assert np.isfinite(loss[done]).all() and np.isnan(loss[~done]).all()
    assert np.isfinite(stamps[done]).all() and np.isnan(stamps[~done]).all()
    return done


def _start(args, out, env):
    return subprocess.Popen(mpi_command(2, *args, "--out", out), env=_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("moment,writer,group,victim", [(0.2, "mpio", 1, 1), (0.4, "root", 1, 0),
                                                        (0.7, "mpio", 1, 0), (0.4, "root", 2, 1)])
def test_sigkill_of_a_held_rank_loses_nothing_finished(moment, writer, group, victim, job, tmp_path):
    """Both write paths: parallel HDF5 (every rank writes) and rank 0 writing what it is sent; and
    a group of two ranks sharing every point (killed, then resumed as two ranks on their own).
    Each rank holds once it has finished ``points`` points (``moment`` of the grid done between
    them)."""
    args, reference = job
    args = [*args, "--writer", writer]
    points = int(moment * TOTAL * group / 2)
    # Every rank reaches its hold having written a tile: the first to hold took at most points + TILE
    # points' tiles, leaving the other at least TOTAL - points - TILE (in a group both do every point).
    assert TILE <= points <= (TOTAL - 1 if group == 2 else (TOTAL - TILE - 1) // 2)
    tiles_each = points // TILE  # tiles each rank (each group, for G=2) finished before it held
    out = tmp_path / "s.h5"
    proc = _start([*args, "--ranks-per-point", str(group)], out, hold_env(tmp_path, points))
    try:
        pids = wait_held(tmp_path, 2, proc)
        assert sorted(pids.values()) == sorted(rank_pids(proc.pid))
        os.kill(pids[victim], signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode != 0
    done_mask = _consistent(out)
    done_before = int(done_mask.sum())
    with h5py.File(out) as f:
        stamps = f["finished_at"][()]
    # Written: parallel HDF5, each rank's tiles; rank 0 writing, its own and those received so far.
    at_least = TILE * tiles_each * (2 if writer == "mpio" and group == 1 else 1)
    assert 0 < at_least <= done_before <= 2 * TILE * tiles_each // group < TOTAL
    mpirun(2, *args, "--out", out, env=plugin_env(), check=True)
    with h5py.File(out) as f:
        assert f["done"][()].all()
        assert f.attrs["rank_points"].sum() == TOTAL - done_before  # no finished point recomputed
        np.testing.assert_array_equal(f["finished_at"][()][done_mask], stamps[done_mask])  # nor restamped
        assert np.isfinite(f["finished_at"][()]).all()
        for k, v in reference.items():
            np.testing.assert_allclose(f[k][()], v, rtol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_mpirun_stops_every_rank(sig, job, tmp_path):
    """Ranks held mid-run (as if in a long forward) are gone soon after mpirun is signalled, and what
    they had written stays, intact. (mpirun SIGKILLs ranks that outlive its SIGTERM by about a
    second, so this cannot tell ranks that end on the signal from ranks that ignore it; a write
    interrupted by either signal is tests/test_surface_file.py's.)"""
    args, _ = job
    out = tmp_path / "s.h5"
    points = 4 * TILE
    proc = _start(args, out, hold_env(tmp_path, points))
    try:
        ranks = list(wait_held(tmp_path, 2, proc).values())
        written = int(_consistent(out).sum())
        t0 = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=20)
        elapsed = time.time() - t0
    finally:
        stop(proc)
    assert proc.returncode != 0 and elapsed < 10
    assert not _alive(ranks, within=10)
    assert points <= written == int(_consistent(out).sum()) < TOTAL


def _alive(pids: list[int], within: float) -> list[int]:
    """Those of ``pids`` still running (zombies are not) once ``within`` seconds have passed, or none
    as soon as none is: a rank's exit after mpirun's is waited for, not assumed to take 0.5 s."""
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()
    except OSError:
        return "zombie"
