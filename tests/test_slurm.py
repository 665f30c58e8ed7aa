"""The repo's own sbatch template under a real Slurm: same file as mpirun, and a pre-emption drill."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import slurm_cluster
from conftest import REPO, _env, mpirun, requires_mpi, torchrun_command
from hold_plugin import PINNED, SPEC, flags, hold_env, plugin_env, reference, wait_held

# one worker runs them all, one cluster's daemons at a time: conftest's ONE_WORKER
pytestmark = [requires_mpi, pytest.mark.skipif(slurm_cluster.missing() is not None,
                                               reason=str(slurm_cluster.missing()))]
TOTAL, TILE = 9 * 9, 1
# The pre-emption drill's grid: one forward per point on every rank (tests/hold_plugin.py), tiles of TILE points
# (as in tests/test_drills.py: coarse-first tiles of more points differ in size).
DRILL = {"data": "digits", "subset": 64, "batch_size": 64, "x": "-1:1:9", "y": "-1:1:9", "tile": f"1x{TILE}", **PINNED}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        # The job must find this interpreter (its venv) and this checkout, whatever PATH pytest had.
        activate = f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={REPO}"
        c.env.update(_env({"LSURF_ENV": activate}))
        yield c


def _sbatch(cluster, folder, args, prepend="") -> list[str]:
    """``sbatch --wait`` of the template, named after ``folder``, its log in ``folder``."""
    cmd = ["sbatch", "--wait", "-n", "2", "--job-name", folder.name, "--chdir", str(folder),
           "--output", str(folder / "job-%j.log")]
    if prepend:  # one more shell line for the template's LSURF_ENV, for this job only
        cmd.append(f"--export=ALL,LSURF_ENV={cluster.env['LSURF_ENV']}; {prepend}")
    return [*cmd, str(REPO / "slurm" / "cpu.sbatch"), *map(str, args)]


def _submit(cluster, folder, args, prepend=""):
    return cluster.run(*_sbatch(cluster, folder, args, prepend), check=False)


def _start(cluster, folder, args, prepend="") -> subprocess.Popen:
    """The job submitted, and ``sbatch --wait`` left running: it ends when the job does."""
    return subprocess.Popen(_sbatch(cluster, folder, args, prepend), env=cluster.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.system
def test_sbatch_equals_mpirun(cluster, digits_checkpoint, tmp_path):
    # the plan pinned: left to it, layout and points per pass are chosen by timing, which load can tip
    args = ["--model", "cnn", "--data", "digits", "--checkpoint", digits_checkpoint, "--x", "-1:1:9", "--y", "-1:1:9",
            "--no-progress", "--layout", "contiguous", "--points-per-pass", "1"]
    p = _submit(cluster, tmp_path, [*args, "--out", tmp_path / "slurm.h5"])
    log = "\n".join(f.read_text() for f in tmp_path.glob("job-*.log"))
    assert p.returncode == 0, p.stdout + p.stderr + log
    assert "lsurf: rank 1/2" in log and "2 tasks" in log
    assert f"{tmp_path / 'slurm.h5'}: complete (81 points)" in log  # the template's check after srun
    mpirun(2, "surface", *args, "--out", tmp_path / "direct.h5", check=True)
    with h5py.File(tmp_path / "slurm.h5") as a, h5py.File(tmp_path / "direct.h5") as b:
        assert a["done"][()].all() and a.attrs["mpi_ranks"] == 2
        assert (a.attrs["launcher"], a.attrs["world_size"], b.attrs["launcher"]) == ("srun", 2, "mpirun")
        for k in ("train_loss", "train_acc"):
            np.testing.assert_allclose(a[k][()], b[k][()], rtol=1e-12)


@pytest.mark.system
def test_preempted_job_resumes(cluster, digits_checkpoint, tmp_path):
    """The job's ranks hold mid-run (tests/hold_plugin.py) when it is cancelled, as a pre-emption
    ends it (SIGTERM, then SIGKILL); the same line submitted again computes only what is missing,
    and the file then holds the values of an uninterrupted run."""
    args = ["--model", SPEC, "--checkpoint", digits_checkpoint, "--no-progress", *flags(DRILL)]
    out = tmp_path / "pre.h5"
    points = 4 * TILE  # each rank holds once it has finished this many points
    job = _start(cluster, tmp_path, [*args, "--out", out], _exports(hold_env(tmp_path, points)))
    try:
        wait_held(tmp_path, 2, job)
        written = _consistent(out)
        cluster.run("scancel", "--name", tmp_path.name)
        job.wait(timeout=120)
    finally:
        cluster.run("scancel", "--name", tmp_path.name, check=False)
        cluster.wait_empty()
    assert job.returncode != 0
    done = _consistent(out)
    np.testing.assert_array_equal(done, written)  # the cancel ended held ranks: nothing more was written
    assert TILE * (points // TILE) <= done.sum() <= 2 * points < TOTAL  # rank 0's tiles at least, both at most
    p = _submit(cluster, tmp_path, [*args, "--out", out], prepend=_exports(plugin_env()))
    log = "\n".join(f.read_text() for f in tmp_path.glob("job-*.log"))
    assert p.returncode == 0, p.stdout + p.stderr + log
    with h5py.File(out) as f:
        assert f["done"][()].all()
        assert f.attrs["rank_points"].sum() == TOTAL - done.sum()  # only the missing points were computed
        for k, v in reference(digits_checkpoint, tmp_path / "whole.h5", DRILL).items():
            np.testing.assert_allclose(f[k][()], v, rtol=1e-6)


def _exports(env: dict[str, str]) -> str:
    """A shell line exporting ``env`` in the job, after the template's LSURF_ENV (which sets PYTHONPATH)."""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def _consistent(path) -> np.ndarray:
    """The file opens, and its done mask says exactly which points hold values."""
    with h5py.File(path) as f:
        done = f["done"][()].astype(bool)
        loss = f["train_loss"][()]
    assert np.isfinite(loss[done]).all() and np.isnan(loss[~done]).all()
    return done


@pytest.mark.system
def test_srun_without_mpi_is_refused(cluster, digits_checkpoint, tmp_path):
    """srun --mpi=none starts two copies that know nothing of each other: both refuse in one line,
    before touching the output, instead of each sampling the whole grid alone."""
    out = tmp_path / "none.h5"
    p = cluster.run("srun", "-n", "2", "--mpi=none", "--chdir", str(tmp_path), sys.executable, "-m", "lsurf",
                    "surface", "--model", "cnn", "--data", "digits", "--checkpoint", str(digits_checkpoint),
                    "--x", "-1:1:3", "--out", str(out), check=False, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("lsurf:")]
    assert p.returncode != 0 and len(errors) == 2, p.stdout + p.stderr
    assert all(line.startswith("lsurf: error: srun started 2 tasks that share no MPI job") for line in errors)
    assert "Traceback" not in p.stderr and not out.exists()


@pytest.mark.system
def test_job_fails_when_srun_exits_0_without_a_surface(cluster, digits_checkpoint, tmp_path):
    """Slurm 22.05's srun can exit 0 when the step failed to launch. Stand in for it with an srun that
    does nothing and exits 0: the template's own check of the file fails the job, in clear lines."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    out = tmp_path / "never.h5"
    p = _submit(cluster, tmp_path, ["--model", "cnn", "--data", "digits", "--checkpoint", digits_checkpoint,
                                    "--x", "-1:1:3", "--out", out], prepend=f"export PATH={fake}:$PATH")
    log = "\n".join(f.read_text() for f in tmp_path.glob("job-*.log"))
    assert p.returncode != 0, p.stdout + p.stderr + log
    assert f"lsurf: {out} does not exist" in log
    assert "failed: srun exit status 0, surface check exit status 1" in log, log


@pytest.mark.system
def test_template_with_the_wrong_pmi_fails_the_job_in_clear_lines(cluster, tmp_path):
    """``LSURF_SRUN_MPI=pmi2`` for an MPI built with PMIx only (Debian's Open MPI): MPI_Init fails
    on every task, srun ends the step, and the template's check says the file was never written --
    what README's Launchers section tells users to look for."""
    out = tmp_path / "never.h5"
    cmd = _sbatch(cluster, tmp_path, ["--model", "cnn", "--data", "digits", "--subset", "64", "--x", "-1:1:3",
                                      "--out", out])
    cmd.insert(1, "--export=ALL,LSURF_SRUN_MPI=pmi2")
    p = cluster.run(*cmd, check=False)
    log = "\n".join(f.read_text() for f in tmp_path.glob("job-*.log"))
    assert p.returncode != 0, p.stdout + p.stderr + log
    assert "MPI_Init" in log and "not built with SLURM's PMI support" in log, log
    assert f"lsurf: {out} does not exist" in log and "surface check exit status 1" in log
    assert not out.exists()


@pytest.mark.system
def test_torchrun_started_by_srun_ignores_the_pmi_variables_it_inherits(cluster, tmp_path):
    """``srun --mpi=pmix torchrun …`` (how multi-node torchrun jobs start on Slurm): the workers
    inherit srun's PMIx variables but are no MPI ranks; they make one torch.distributed world."""
    assert "PMIX_RANK=" in cluster.run("srun", "-n", "1", "--mpi=pmix", "env", timeout=120).stdout
    out = tmp_path / "s.h5"
    p = cluster.run("srun", "-n", "1", "--mpi=pmix", "--chdir", str(tmp_path), "env", "OMP_NUM_THREADS=1",
                    f"PYTHONPATH={REPO}", *torchrun_command(2, "surface", "--model", "cnn", "--data", "digits",
                                                          "--subset", "64", "--x", "-1:1:3", "--y", "-1:1:3",
                                                          "--no-progress", "--out", out),
                    check=False, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(out) as f:
        assert f["done"][()].all() and (f.attrs["launcher"], f.attrs["world_size"]) == ("torchrun", 2)
