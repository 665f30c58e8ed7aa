"""The model sharded over a rank group (``--shard fsdp``, issue 32): under mpirun and torchrun the
sharded runs equal one unsharded process in float64 — a linear model whose last layer has fewer
rows than ranks, a conv net with BatchNorm, a causal transformer LM, regenerated directions —
each rank holding 1/G of the weights; what the sharded path cannot do is one line."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
import shard_job
from conftest import REPO, _env, lsurf, requires_mpi, torchrun
from inprocess import cli

QUANTITIES = ("train_loss", "train_acc")


def _values(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in QUANTITIES} | {"done": f["done"][()], "layout": f.attrs["rank_layout"],
                                                   "weights": f.attrs["rank_weights"]}


@pytest.mark.mpi
@requires_mpi
def test_sharded_runs_under_mpirun_equal_one_unsharded_process(tmp_path):
    cmd = ["mpirun", "-n", "4", "--oversubscribe", sys.executable, REPO / "tests" / "shard_job.py", tmp_path]
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       env=_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}))
    assert p.returncode == 0, p.stdout + p.stderr
    (tmp_path / "one").mkdir()
    for case, (name, g, _) in shard_job.CASES.items():
        shard_job.sample(case, tmp_path / "one", sharded=False)
        one, sharded = _values(tmp_path / "one" / f"{case}.h5"), _values(tmp_path / f"{case}.h5")
        assert sharded["done"].all() and f"sharded {g} ways, fsdp" in sharded["layout"], sharded["layout"]
        for k in QUANTITIES:
            np.testing.assert_allclose(sharded[k], one[k], rtol=1e-10, atol=0, err_msg=f"{case} {k}")
        # each rank of a group holds its rows of every weight (FSDP2's dim-0 chunks): 1/G, and together all
        shapes = [p.shape for p in shard_job.build(name)[0].parameters()]
        chunk = sum(-(-s[0] // g) * int(np.prod(s[1:])) for s in shapes)
        held = sharded["weights"].reshape(4 // g, g)
        assert (held.sum(1) == sum(int(np.prod(s)) for s in shapes)).all() and (held <= chunk).all(), held


@pytest.mark.mpi
@requires_mpi
def test_torchrun_shards_the_command_line_job(tmp_path):
    args = ["surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--x", "-1:1:3", "--dtype", "float64",
            "--no-progress", "--threads", "1"]
    torchrun(2, *args, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "sharded.h5", check=True)
    cli(*args, "--fidelity", "off", "--out", tmp_path / "one.h5", check=True)
    one, sharded = _values(tmp_path / "one.h5"), _values(tmp_path / "sharded.h5")
    for k in QUANTITIES:
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-10, atol=0, err_msg=k)
    info = lsurf("info", tmp_path / "sharded.h5", check=True).stdout
    assert "not measured: the model is sharded (`shard` fsdp)" in info, info  # `fidelity` auto: skipped, said
    assert "of the model (sharded 2 ways, fsdp)" in info and " 4,965 weights" in info, info  # 1/2 of 9,930


@pytest.mark.parametrize("extra, says", [
    ([], "lsurf: error: --shard fsdp shards the model over a rank group: it needs --ranks-per-point of 2 or more"),
    (["--ranks-per-point", "2", "--points-per-pass", "2"], "it cannot be combined with --points-per-pass > 1"),
    (["--ranks-per-point", "2", "--resident", "never"], "not with --resident never"),
    (["--ranks-per-point", "2", "--fidelity", "on"], "--fidelity on: not with --shard fsdp"),
])
def test_what_the_sharded_path_cannot_do_is_one_line(tmp_path, extra, says):
    p = cli("surface", "--shard", "fsdp", *extra, "--out", tmp_path / "s.h5")
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "s.h5").exists()
