"""The repo's own sbatch template under a real Slurm: same file as mpirun, and a pre-emption drill."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import slurm_cluster
from conftest import REPO, _env, mpirun, requires_mpi, wait_for_done

pytestmark = [requires_mpi, pytest.mark.skipif(slurm_cluster.missing() is not None,
                                               reason=str(slurm_cluster.missing()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        # The job must find this interpreter (its venv) and this checkout, whatever PATH pytest had.
        activate = f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={REPO}"
        c.env.update(_env({"LSURF_ENV": activate}))
        yield c


def _submit(cluster, folder, args, wait=True, prepend=""):
    cmd = ["sbatch", "-n", "2", "--chdir", str(folder), "--output", str(folder / "job-%j.log")]
    if prepend:  # one more shell line for the template's LSURF_ENV, for this job only
        cmd.append(f"--export=ALL,LSURF_ENV={cluster.env['LSURF_ENV']}; {prepend}")
    return cluster.run(*cmd, *(["--wait"] if wait else []), str(REPO / "slurm" / "cpu.sbatch"), *map(str, args),
                       check=False)


@pytest.mark.system
def test_sbatch_equals_mpirun(cluster, digits_checkpoint, tmp_path):
    args = ["--model", "cnn", "--data", "digits", "--checkpoint", digits_checkpoint, "--x", "-1:1:9", "--y", "-1:1:9",
            "--no-progress"]
    p = _submit(cluster, tmp_path, [*args, "--out", tmp_path / "slurm.h5"])
    log = "\n".join(f.read_text() for f in tmp_path.glob("job-*.log"))
    assert p.returncode == 0, p.stdout + p.stderr + log
    assert "lsurf: rank 1/2" in log and "2 tasks" in log
    assert f"{tmp_path / 'slurm.h5'}: complete (81 points)" in log  # the template's check after srun
    mpirun(2, "surface", *args, "--out", tmp_path / "direct.h5", check=True)
    with h5py.File(tmp_path / "slurm.h5") as a, h5py.File(tmp_path / "direct.h5") as b:
        assert a["done"][()].all() and a.attrs["mpi_ranks"] == 2
        for k in ("train_loss", "train_acc"):
            np.testing.assert_allclose(a[k][()], b[k][()], rtol=1e-12)


@pytest.mark.system
def test_preempted_job_resumes(cluster, digits_checkpoint, tmp_path):
    args = ["--model", "cnn", "--data", "digits", "--checkpoint", digits_checkpoint, "--x", "-1:1:41", "--y", "-1:1:41",
            "--tile", "1x41", "--no-progress"]
    total = 41 * 41
    out = tmp_path / "pre.h5"
    p = _submit(cluster, tmp_path, [*args, "--out", out], wait=False)
    assert p.returncode == 0, p.stderr
    job = p.stdout.split()[-1]
    wait_for_done(out, total // 5)
    cluster.run("scancel", job)
    cluster.wait_empty()
    with h5py.File(out) as f:
        done = f["done"][()].astype(bool)
        loss = f["train_loss"][()]
    assert 0 < done.sum() < total
    assert np.isfinite(loss[done]).all() and np.isnan(loss[~done]).all()
    time.sleep(0.5)
    p = _submit(cluster, tmp_path, [*args, "--out", out])
    assert p.returncode == 0, p.stdout + p.stderr
    mpirun(2, "surface", *args, "--out", tmp_path / "whole.h5", check=True)
    with h5py.File(out) as f, h5py.File(tmp_path / "whole.h5") as g:
        assert f["done"][()].all()
        assert f.attrs["rank_points"].sum() == total - done.sum()  # only the missing points were computed
        np.testing.assert_allclose(f["train_loss"][()], g["train_loss"][()], rtol=1e-6)


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
