"""Failure drills with real processes: nothing finished is lost, nothing is recomputed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import _env, mpi_command, mpirun, rank_pids, requires_mpi, wait_for_done

pytestmark = requires_mpi
TOTAL = 25 * 25


@pytest.fixture(scope="module")
def job(digits_checkpoint, tmp_path_factory):
    """The drill's command and the file of an uninterrupted run to compare with."""
    args = ["surface", "--model", "cnn", "--data", "digits", "--no-progress", "--x", "-1:1:25", "--y", "-1:1:25",
            "--tile", "1x5", "--checkpoint", digits_checkpoint]
    full = tmp_path_factory.mktemp("full") / "full.h5"
    mpirun(2, *args, "--out", full, check=True)
    with h5py.File(full) as f:
        reference = {k: f[k][()] for k in ("train_loss", "train_acc")}
    return args, reference


def _consistent(path) -> np.ndarray:
    """The file opens, and its done mask says exactly which points hold values."""
    with h5py.File(path) as f:
        done = f["done"][()].astype(bool)
        loss = f["train_loss"][()]
    assert np.isfinite(loss[done]).all() and np.isnan(loss[~done]).all()
    return done


def _start(args, out):
    return subprocess.Popen(mpi_command(2, *args, "--out", out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("moment,writer,group", [(0.05, "mpio", 1), (0.4, "root", 1), (0.8, "mpio", 1),
                                                 (0.3, "root", 2)])
def test_sigkill_a_random_rank_at_a_random_moment(moment, writer, group, job, tmp_path):
    """Both write paths: parallel HDF5 (every rank writes) and rank 0 writing what it is sent; and
    a group of two ranks sharing every point (killed, then resumed as two ranks on their own)."""
    args, reference = job
    args = [*args, "--writer", writer]
    first = [*args, "--ranks-per-point", str(group)]
    rng = random.Random(moment)
    out = tmp_path / "s.h5"
    proc = _start(first, out)
    try:
        wait_for_done(out, int(moment * TOTAL), proc=proc)
        os.kill(rng.choice(rank_pids(proc.pid)), signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    done_before = _consistent(out)
    assert 0 < done_before.sum() < TOTAL
    mpirun(2, *args, "--out", out, check=True)
    with h5py.File(out) as f:
        assert f["done"][()].all()
        assert f.attrs["rank_points"].sum() == TOTAL - done_before.sum()  # no finished point recomputed
        for k, v in reference.items():
            np.testing.assert_allclose(f[k][()], v, rtol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_mpirun_stops_every_rank(sig, job, tmp_path):
    args, _ = job
    out = tmp_path / "s.h5"
    proc = _start(args, out)
    try:
        wait_for_done(out, 100, proc=proc)
        ranks = rank_pids(proc.pid)
        t0 = time.time()
        proc.send_signal(sig)
        proc.wait(timeout=20)
        elapsed = time.time() - t0
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0 and elapsed < 10
    time.sleep(0.5)
    assert not [p for p in ranks if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)]
    done = _consistent(out)
    assert done.sum() >= 100


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()
    except OSError:
        return "zombie"
