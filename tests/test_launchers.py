"""One command line under every launcher (issue 33): torchrun (torch.distributed, no MPI), mpirun,
and one process give the same file; a torchrun job survives a kill and resumes; a rank that fails
ends a torchrun job at once; contradictory launchers are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import _env, lsurf, mpirun, requires_mpi, torchrun, torchrun_command
from hold_plugin import FAIL_RANK, PINNED, SPEC, flags, hold_env, plugin_env, reference, release, stop, wait_held

from lsurf.errors import UserError
from lsurf.run.c10d import torchrun_place
from lsurf.run.planning import use_parallel_hdf5
from lsurf.run.runtime import check_one_launcher, launcher_comm
from lsurf.run.world import World, mpi_launcher

TINY = ["--model", "cnn", "--data", "digits", "--subset", "64", "--x", "-1:1:5", "--y", "-1:1:5", "--tile", "1x3",
        "--dtype", "float64", "--layout", "contiguous", "--points-per-pass", "1", "--fidelity", "off", "--no-progress"]
QUANTITIES = ("train_loss", "train_acc")


def _read(path) -> dict:
    with h5py.File(path) as f:
        return {"values": {k: f[k][()] for k in QUANTITIES}, "done": f["done"][()].astype(bool),
                "launcher": f.attrs["launcher"], "world_size": int(f.attrs["world_size"]),
                "rank_points": f.attrs["rank_points"]}


@pytest.mark.mpi
@requires_mpi
def test_torchrun_mpirun_and_one_process_write_the_same_file(digits_checkpoint, tmp_path):
    """Bit for bit in float64: the same points, whoever evaluates them; the launcher is recorded and
    ``lsurf info`` shows it. A torchrun job in groups of two (sums added over gloo) agrees to rounding."""
    args = ["surface", *TINY, "--checkpoint", digits_checkpoint]
    lsurf(*args, "--out", tmp_path / "one.h5", check=True)
    torchrun(2, *args, "--out", tmp_path / "torch.h5", check=True)
    mpirun(2, *args, "--out", tmp_path / "mpi.h5", check=True, env={"OMP_NUM_THREADS": "1"})
    torchrun(2, *args, "--ranks-per-point", "2", "--out", tmp_path / "groups.h5", check=True)
    one, by_torch, by_mpi, groups = (_read(tmp_path / f"{n}.h5") for n in ("one", "torch", "mpi", "groups"))
    for k in QUANTITIES:
        np.testing.assert_array_equal(by_torch["values"][k], one["values"][k], err_msg=k)
        np.testing.assert_array_equal(by_mpi["values"][k], one["values"][k], err_msg=k)
        np.testing.assert_allclose(groups["values"][k], one["values"][k], rtol=1e-12, err_msg=k)
    assert [(r["launcher"], r["world_size"]) for r in (one, by_torch, by_mpi, groups)] == [
        ("single", 1), ("torchrun", 2), ("mpirun", 2), ("torchrun", 2)]
    assert by_torch["rank_points"].sum() == 25 and len(by_torch["rank_points"]) == 2
    info = lsurf("info", tmp_path / "torch.h5", check=True).stdout
    assert "launcher:           torchrun" in info and "world_size:         2" in info


TOTAL, TILE = 9 * 9, 1  # 1-point tiles: coarse-first tiles of 1x3 differ in size (as in test_drills)
DRILL = {"data": "digits", "subset": 64, "batch_size": 64, "x": "-1:1:9", "y": "-1:1:9", "tile": f"1x{TILE}",
         **PINNED}


def _start_torchrun(args, out, env) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(2, *args, "--out", out), env=_env({"OMP_NUM_THREADS": "1", **env}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.mpi
def test_torchrun_job_killed_mid_run_resumes_to_the_uninterrupted_values(digits_checkpoint, tmp_path):
    """SIGKILL of a held rank ends the whole torchrun job within seconds; what rank 0 wrote (its own
    tiles and those the store relayed) stays, and a second torchrun finishes only the rest."""
    args = ["surface", "--model", SPEC, "--checkpoint", digits_checkpoint, "--no-progress", *flags(DRILL)]
    out, points = tmp_path / "s.h5", 4 * TILE
    proc = _start_torchrun(args, out, hold_env(tmp_path, points))
    try:
        pids = wait_held(tmp_path, 2, proc)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        stop(proc)
    assert proc.returncode != 0 and elapsed < 10
    with h5py.File(out) as f:
        done = f["done"][()].astype(bool)
        loss = f["train_loss"][()]
    assert np.isfinite(loss[done]).all() and np.isnan(loss[~done]).all()
    done_before = int(done.sum())
    assert points <= done_before < TOTAL  # rank 0's own tiles at least
    torchrun(2, *args, "--out", out, env=plugin_env(), check=True)
    resumed = _read(out)
    assert resumed["done"].all() and resumed["rank_points"].sum() == TOTAL - done_before
    for k, v in reference(digits_checkpoint, tmp_path / "full.h5", DRILL).items():
        np.testing.assert_allclose(resumed["values"][k], v, rtol=1e-6, err_msg=k)


@pytest.mark.mpi
def test_a_rank_that_raises_ends_the_torchrun_job_at_once(digits_checkpoint, tmp_path):
    """Rank 1 raises mid-run while rank 0 goes on: no rank waits for it in a collective or for its
    tiles; the job exits non-zero within seconds, saying which rank failed."""
    args = ["surface", "--model", SPEC, "--checkpoint", digits_checkpoint, "--no-progress", *flags(DRILL)]
    proc = _start_torchrun(args, tmp_path / "s.h5", {**hold_env(tmp_path, 2 * TILE), FAIL_RANK: "1"})
    try:
        wait_held(tmp_path, 2, proc)
        t0 = time.monotonic()
        release(tmp_path)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        stop(proc)
    assert proc.returncode != 0 and elapsed < 10, err
    assert "lsurf: rank 1 failed: RuntimeError: rank 1 fails as the test asked" in err


@pytest.mark.mpi
@requires_mpi
def test_contradictory_launchers_are_one_line(tmp_path):
    """mpirun's world of 2 with torchrun's WORLD_SIZE=3 exported: which world is meant? One line,
    exit 2, and no file is written."""
    p = mpirun(2, "surface", *TINY, "--out", tmp_path / "s.h5", env={"WORLD_SIZE": "3", "RANK": "0"})
    errors = [line for line in p.stderr.splitlines() if line.startswith("lsurf: error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr
    assert "mpirun started this job as rank" in errors[0] and "WORLD_SIZE=3" in errors[0]
    assert not (tmp_path / "s.h5").exists()


def test_launcher_signals_are_read_and_checked(monkeypatch):
    """The fast tier's part: torchrun's variables parsed, a disagreement with MPI refused, an
    incomplete torchrun environment refused before any rendezvous, srun told from mpirun, parallel
    HDF5 refused under torchrun (it opens the file over an MPI communicator)."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LSURF_MPI", "SLURM_STEP_NUM_TASKS",
                "TORCHELASTIC_RUN_ID", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert torchrun_place() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_place() is None  # one of the two may be a site's own variable
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UserError, match="RANK='one' is not a whole number"):
        torchrun_place()
    monkeypatch.setenv("RANK", "1")
    assert torchrun_place() == (1, 2)
    check_one_launcher(World(rank=1, size=2, launcher="mpirun"))  # they agree
    with pytest.raises(UserError, match="rank 0 of 2 MPI ranks, but torch.distributed's RANK=1"):
        check_one_launcher(World(rank=0, size=2, launcher="mpirun"))
    # torchrun under srun: its workers inherit srun's PMI variables, yet must not start MPI
    monkeypatch.setenv("PMIX_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT are not set"):
        launcher_comm()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert (mpi_launcher(3, 4), mpi_launcher(0, 8)) == ("srun", "mpirun")
    torchrun_world = World(size=2, launcher="torchrun")
    assert not use_parallel_hdf5(torchrun_world, "auto")
    with pytest.raises(UserError, match="`writer` mpio needs an MPI launcher"):
        use_parallel_hdf5(torchrun_world, "mpio")


@pytest.mark.mpi
def test_hessian_under_torchrun_is_the_one_process_spectrum(digits_checkpoint):
    """Each rank's share of every Hessian-vector product added over gloo (a group of the whole job):
    the spectrum one process finds, to the printed digits."""
    args = ["hessian", "--model", "cnn", "--data", "digits", "--checkpoint", digits_checkpoint, "--subset", "64",
            "--top-k", "2", "--iters", "10", "--trace-samples", "3", "--dtype", "float64"]
    one = lsurf(*args, check=True).stdout
    two = torchrun(2, *args, check=True).stdout
    assert "top eigenvalues:" in one and one.splitlines() == two.splitlines()
