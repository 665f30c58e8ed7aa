"""Real mpirun: 1, 2 and 4 ranks agree with the serial run on both write paths; kill, resume, abort, lock."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from conftest import _env, lsurf, mpi_command, mpirun, requires_mpi
from hold_plugin import PINNED, SPEC, flags, hold_env, plugin_env, release, stop, wait_held

pytestmark = [requires_mpi, pytest.mark.mpi]
GRID = ["--x", "-1:1:9", "--y", "-1:1:7"]
COMMON = ["--model", "cnn", "--data", "digits", "--subset", "300", "--no-progress"]


def arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in ("train_loss", "train_acc", "train_loss_stderr", "done")}


@pytest.fixture(scope="module")
def serial(tmp_path_factory, digits_checkpoint):
    out = tmp_path_factory.mktemp("serial") / "serial.h5"
    lsurf("surface", *COMMON, *GRID, "--checkpoint", digits_checkpoint, "--out", out, check=True)
    return arrays(out)


# each writer and each rank count once (4 ranks writing through rank 0: test_scale's groups of 2)
@pytest.mark.parametrize("ranks,writer", [(1, "auto"), (2, "root"), (4, "mpio")])
def test_ranks_and_writers_agree_with_serial(ranks, writer, serial, tmp_path, digits_checkpoint):
    out = tmp_path / "m.h5"
    p = mpirun(ranks, "surface", *COMMON, *GRID, "--checkpoint", digits_checkpoint, "--writer", writer,
               "--out", out, check=True)
    expected = "parallel HDF5" if writer == "mpio" and ranks > 1 else "rank 0"
    assert f"writer: {expected}" in p.stderr
    # one line a rank, and never more threads than cores, however the launcher binds them
    threads = [int(n) for n in re.findall(r"on cpu, (\d+) threads", p.stderr)]
    assert len(threads) == ranks and sum(threads) <= max(len(os.sched_getaffinity(0)), ranks), p.stderr
    got = arrays(out)
    assert got["done"].all()
    for k in ("train_loss", "train_acc", "train_loss_stderr"):
        np.testing.assert_allclose(got[k], serial[k], rtol=1e-6, atol=1e-9)
    with h5py.File(out) as f:
        assert len(f.attrs["rank_points"]) == ranks and f.attrs["rank_points"].sum() == 63


def test_static_schedule_and_forced_serial_h5py_path(serial, tmp_path, digits_checkpoint):
    out = tmp_path / "s.h5"
    mpirun(2, "surface", *COMMON, *GRID, "--checkpoint", digits_checkpoint, "--schedule", "static",
           "--tile", "1x9", "--writer", "root", "--out", out, check=True)
    got = arrays(out)
    np.testing.assert_allclose(got["train_loss"], serial["train_loss"], rtol=1e-6)
    with h5py.File(out) as f:  # round robin over 13 coarse-first tiles of one lattice row (of 3, 2, 5, 4 and 9 points)
        assert list(f.attrs["rank_points"]) == [36, 27]


def test_strided_tiles_through_parallel_hdf5_stamp_each_point_and_resume(serial, tmp_path, digits_checkpoint):
    """Issue 34: 2 ranks writing coarse-first (strided) tiles through parallel HDF5 give the serial
    values, with ``finished_at`` set exactly where done; a partial file (the coarse lattice done, as a
    job killed after its first tiles leaves it) resumes computing only the rest, keeping its stamps."""
    out = tmp_path / "m.h5"
    args = ["surface", *COMMON, *GRID, "--checkpoint", digits_checkpoint, "--writer", "mpio", "--out", out]
    t0 = time.time()
    assert "writer: parallel HDF5" in mpirun(2, *args, check=True).stderr
    with h5py.File(out) as f:
        stamps = f["finished_at"][()]
    assert t0 <= stamps.min() and stamps.max() <= time.time()
    keep = np.zeros(stamps.shape, bool)
    keep[::4, ::4] = True
    with h5py.File(out, "r+") as f:
        for name in ("train_loss", "train_acc", "train_loss_stderr", "finished_at"):
            f[name][...] = np.where(keep, f[name][()], np.nan)
        f["done"][...] = keep
    t1 = time.time()
    p = mpirun(2, *args, check=True)
    assert f"{63 - keep.sum()} of 63 points to do" in p.stderr
    got = arrays(out)
    assert got["done"].all()
    for k in ("train_loss", "train_acc", "train_loss_stderr"):
        np.testing.assert_allclose(got[k], serial[k], rtol=1e-6, atol=1e-9)
    with h5py.File(out) as f:
        after = f["finished_at"][()]
        assert f.attrs["rank_points"].sum() == 63 - keep.sum()
    np.testing.assert_array_equal(after[keep], stamps[keep])
    assert (after[~keep] >= t1).all()


@pytest.mark.mpi
def test_a_model_without_checkpoint_is_drawn_from_the_seed_on_every_rank_and_rerun(tmp_path):
    """Without a checkpoint each rank drew its own weights (and so its own directions): one file
    mixed tiles of different models, and a rerun gave another surface."""
    args = ["surface", "--model", "mlp", "--data", "digits", "--subset", "200", "--x", "-1:1:5", "--y", "-1:1:3",
            "--no-progress"]
    for name in ("serial", "rerun"):
        lsurf(*args, "--out", tmp_path / f"{name}.h5", check=True)
    mpirun(2, *args, "--out", tmp_path / "ranks.h5", check=True)
    serial, rerun, ranks = (arrays(tmp_path / f"{n}.h5") for n in ("serial", "rerun", "ranks"))
    assert serial["done"].all() and ranks["done"].all()
    np.testing.assert_array_equal(rerun["train_loss"], serial["train_loss"])
    for k in ("train_loss", "train_acc", "train_loss_stderr"):
        np.testing.assert_allclose(ranks[k], serial[k], rtol=1e-6, atol=1e-9)
    assert "model_seed:         0" in lsurf("info", tmp_path / "serial.h5", check=True).stdout
    with h5py.File(tmp_path / "serial.h5", "r+") as f:  # interrupted: a resume with another seed is refused
        f["done"][0, 0] = False
    p = lsurf(*args, "--seed", "1", "--out", tmp_path / "serial.h5")
    assert p.returncode == 2 and "another model seed (0, now 1)" in p.stderr and "--overwrite" in p.stderr, p.stderr


def _unseeded(tmp_path) -> dict:
    """A model plug-in ``unseeded:make`` that draws its weights from each rank's own seed; the
    environment that imports it."""
    (tmp_path / "unseeded.py").write_text(textwrap.dedent("""
        import os
        import torch
        from lsurf.engine.model.models import MLP

        def make():
            torch.manual_seed(int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")))  # a draw of its own per rank
            return MLP(64, 10)
    """))
    return {"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"}


DIFFERENT_MODELS = ("lsurf: error: rank 1's model weights differ from rank 0's: every rank must load the same model "
                    "and directions (lsurf draws a model without --checkpoint from --seed; a plug-in that draws its "
                    "own weights must seed them)")


@pytest.mark.mpi
def test_ranks_holding_different_models_are_refused_before_any_file(tmp_path):
    p = mpirun(2, "surface", "--model", "unseeded:make", "--data", "digits", "--subset", "100", "--x", "-1:1:3",
               "--out", tmp_path / "u.h5", "--no-progress", env=_unseeded(tmp_path))
    assert p.returncode == 2, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("lsurf: error")] == [DIFFERENT_MODELS], p.stderr
    assert not (tmp_path / "u.h5").exists()


@pytest.mark.mpi
@pytest.mark.parametrize("job", [("hessian", "--top-k", "1", "--iters", "3", "--trace-samples", "2"),
                                 ("sharpness", "--radius", "0.1", "--samples", "2")], ids=["hessian", "sharpness"])
def test_hessian_and_sharpness_refuse_ranks_holding_different_models(job, tmp_path):
    """Each rank's share of the Hessian's products (each rank's draws of sharpness) was of another
    model, all summed into one result: refused before any, as the surface refuses them."""
    p = mpirun(2, *job, "--model", "unseeded:make", "--data", "digits", "--subset", "100", "--out",
               tmp_path / "r.npz", env=_unseeded(tmp_path))
    assert p.returncode == 2, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("lsurf: error")] == [DIFFERENT_MODELS], p.stderr
    assert not (tmp_path / "r.npz").exists()


def test_exception_on_one_rank_aborts_everything(tmp_path):
    (tmp_path / "faulty.py").write_text(textwrap.dedent("""
        import os
        import torch
        from lsurf.engine.model.models import DigitsCNN

        class Faulty(DigitsCNN):
            calls = 0
            def forward(self, x):
                Faulty.calls += 1
                if os.environ.get("OMPI_COMM_WORLD_RANK") == "1" and Faulty.calls > 20:
                    raise RuntimeError("injected failure")
                return super().forward(x)

        def make():
            return Faulty()
    """))
    env = {"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"}
    t0 = time.time()
    p = mpirun(2, "surface", "--model", "faulty:make", "--data", "digits", "--x", "-1:1:40", "--y", "-1:1:40",
               "--out", tmp_path / "f.h5", "--no-progress", env=env, timeout=120)
    assert p.returncode != 0
    assert time.time() - t0 < 60
    assert "rank 1 failed: RuntimeError: injected failure" in p.stderr + p.stdout
    with h5py.File(tmp_path / "f.h5") as f:  # what rank 0 finished is intact and marked
        done = f["done"][()].astype(bool)
        assert np.isfinite(f["train_loss"][()][done]).all()


@pytest.mark.cli
def test_second_job_on_file_in_use_is_refused(tmp_path, digits_checkpoint):
    """The first job holds its ranks once each has written a tile (tests/hold_plugin.py), so it is
    running, and holding the file, for as long as the second job takes; released, it finishes its
    grid whole: the refused job changed nothing."""
    out = tmp_path / "busy.h5"
    args = ["surface", "--model", SPEC, "--checkpoint", digits_checkpoint, "--data", "digits", "--subset", "64",
            "--batch-size", "64", *flags(PINNED), "--x", "-1:1:5", "--y", "-1:1:5", "--tile", "1x5",
            "--no-progress", "--out", out]
    job = subprocess.Popen(mpi_command(2, *args), env=_env(hold_env(tmp_path, 5)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_held(tmp_path, 2, job)
        written = arrays(out)
        assert written["done"].sum() >= 5  # rank 0's first tile at least
        p = lsurf(*args, env=plugin_env())
        assert job.poll() is None, "the first job ended before the second started"
        assert p.returncode == 2
        assert "in use by another lsurf job" in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert os.path.exists(f"{out}.lock")  # the running job's lock file: the refused job leaves it
        after = arrays(out)
        for k, v in written.items():
            np.testing.assert_array_equal(after[k], v)
        release(tmp_path)
        _, err = job.communicate(timeout=120)
    finally:
        stop(job)
    assert job.returncode == 0, err
    with h5py.File(out) as f:
        assert f["done"][()].all() and f.attrs["rank_points"].sum() == 25


def test_worker_takes_tiles_while_rank_0_computes_over_tcp(tmp_path):
    """Across nodes without hardware atomics (simulated: ``--mca osc ^sm --mca btl self,tcp``) a worker's
    Fetch_and_op on rank 0's window needs rank 0 to enter MPI. Rank 0 takes a tile and then computes
    without MPI calls for up to 20 s, leaving early only once rank 1 has written that it took every other
    tile of the queue: rank 0's progress thread must serve the window meanwhile, and no tile goes twice."""
    (tmp_path / "tile_race.py").write_text(textwrap.dedent("""
        import json, os, sys, time
        from pathlib import Path
        from mpi4py import MPI
        from lsurf.run.transport import TileQueue
        from lsurf.run.world import World

        folder = Path(sys.argv[1])
        w = World.of(MPI.COMM_WORLD)
        queue = TileQueue(w, 50)
        taken, report = [], {}
        if w.is_root:
            taken.append(queue.next())
            t0, x = time.monotonic(), 0
            while time.monotonic() - t0 < 20 and not (folder / "rank1.json").exists():  # no MPI in here
                for i in range(20000):
                    x += i
            report = {"loop_end": time.time(), "loop_seconds": time.monotonic() - t0,
                      "note": queue.progress_note}
        while (k := queue.next()) is not None:
            taken.append(k)
        if not w.is_root:
            (folder / "tmp.json").write_text(json.dumps({"finished": time.time(), "tiles": len(taken)}))
            (folder / "tmp.json").rename(folder / "rank1.json")
        everyone = w.gather(taken)
        queue.close()
        if w.is_root:
            (folder / "rank0.json").write_text(json.dumps({**report, "taken": everyone}))
    """))
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root", "--mca", "osc", "^sm",
           "--mca", "btl", "self,tcp", sys.executable, str(tmp_path / "tile_race.py"), str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["finished"] <= rank0["loop_end"] and rank0["loop_seconds"] < 20, (rank0, rank1)
    assert rank0["note"] == "progress thread on rank 0"
    assert rank1["tiles"] == 49 and len(rank0["taken"][0]) == 1  # which one: whoever asked first (a race)
    assert sorted(rank0["taken"][0] + rank0["taken"][1]) == list(range(50))
