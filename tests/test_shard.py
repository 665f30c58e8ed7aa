"""The model sharded over a rank group (``--shard fsdp``, issue 32): under mpirun and torchrun the
sharded runs equal one unsharded process in float64 — a linear model whose last layer has fewer
rows than ranks, a conv net with BatchNorm, a causal transformer LM, regenerated directions —
each rank holding 1/G of the weights; a checkpoint (a torch file, a Hugging Face folder of several
safetensors files) read by rows, no rank loading it whole; the Hessian's spectrum through the sharded
model (its products exact through the collectives); what the sharded path cannot do is one line."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import h5py
import numpy as np
import pytest
import shard_job
import torch
from conftest import REPO, _env, lsurf, mpirun, requires_mpi, torchrun
from inprocess import cli

from lsurf.engine.model.models import load_model

QUANTITIES = ("train_loss", "train_acc")
CURVATURE = ("hessian_max", "hessian_min")  # where a case asks for them


def _values(path) -> dict:
    with h5py.File(path, "r") as f:
        values = {k: f[k][()] for k in (*QUANTITIES, *CURVATURE) if k in f}
        return values | {"done": f["done"][()], "layout": f.attrs["rank_layout"], "weights": f.attrs["rank_weights"],
                         "path": path, "fidelity": f.attrs.get("fidelity"), "plan": json.loads(f.attrs["plan"])}


@pytest.mark.mpi
@requires_mpi
def test_sharded_runs_under_mpirun_equal_one_unsharded_process(tmp_path):
    cmd = ["mpirun", "-n", "4", "--oversubscribe", sys.executable, REPO / "tests" / "shard_job.py", tmp_path]
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300,
                       env=_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}))
    assert p.returncode == 0, p.stdout + p.stderr
    (tmp_path / "one").mkdir()
    fidelities = 0
    for case, (name, g, _) in shard_job.CASES.items():
        shard_job.sample(case, tmp_path / "one", sharded=False)
        one, sharded = _values(tmp_path / "one" / f"{case}.h5"), _values(tmp_path / f"{case}.h5")
        split_only = "shard" in shard_job.CASES[case][2]  # groups that split the data, the model whole on each rank
        layout = f"{4 // g} groups of {g}" if split_only else f"sharded {g} ways, fsdp"
        assert sharded["done"].all() and layout in sharded["layout"], sharded["layout"]
        streamed = shard_job.CASES[case][2].get("resident") == "never"
        assert sharded["plan"]["streamed"] == ["train"] * streamed, sharded["plan"]
        for k in QUANTITIES:
            np.testing.assert_allclose(sharded[k], one[k], rtol=1e-10, atol=0, err_msg=f"{case} {k}")
        for k in CURVATURE:  # the Hessian at every point, the model held by rows in each group of 2
            assert (k in sharded) == (k in one) == ("hessian_iters" in shard_job.CASES[case][2]), case
            if k in one:
                assert np.isfinite(one[k]).all()
                np.testing.assert_allclose(sharded[k], one[k], rtol=1e-8, atol=1e-12, err_msg=f"{case} {k}")
        if sharded["fidelity"] is not None:  # measured by the sharded Hessian: the unsharded numbers
            a, b = (json.loads(s["fidelity"]) for s in (sharded, one))
            assert a["parameters"] == b["parameters"] and np.isfinite(a["quotients"]).all(), (a, b)
            fidelities += 1
            for key in ("lambda_max", "lambda_min", "mean_eigenvalue", "quotients", "norms2"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-8, atol=1e-12, err_msg=key)
        if split_only:
            continue
        # each rank of a group holds its rows of every weight (FSDP2's dim-0 chunks): 1/G, and together all
        shapes = [p.shape for p in shard_job.build(name)[0].parameters()]
        chunk = sum(-(-s[0] // g) * int(np.prod(s[1:])) for s in shapes)
        held = sharded["weights"].reshape(4 // g, g)
        assert (held.sum(1) == sum(int(np.prod(s)) for s in shapes)).all() and (held <= chunk).all(), held
    assert fidelities == 1  # linear_g4's
    # the Hessian with the model held by rows over all 4 ranks: exact products through the collectives
    for name in shard_job.SPECTRA:
        sharded, one = np.load(tmp_path / f"{name}_spectrum.npz"), shard_job.spectrum(name, sharded=False)
        for k in ("eigenvalues", "trace"):
            np.testing.assert_allclose(sharded[k], one[k], rtol=1e-8, atol=0, err_msg=f"{name} {k}")


@pytest.mark.mpi
@requires_mpi
def test_torchrun_shards_the_command_line_job(tmp_path):
    args = ["surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--x", "-1:1:3", "--dtype", "float64",
            "--no-progress", "--threads", "1"]
    args += ["--fidelity", "on"]  # the plane's fidelity by the sharded Hessian (the model drawn whole, then sharded)
    torchrun(2, *args, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "sharded.h5", check=True)
    cli(*args, "--out", tmp_path / "one.h5", check=True)
    one, sharded = _values(tmp_path / "one.h5"), _values(tmp_path / "sharded.h5")
    for k in QUANTITIES:
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-10, atol=0, err_msg=k)
    a, b = (json.loads(s["fidelity"]) for s in (sharded, one))
    for key in ("lambda_max", "lambda_min", "mean_eigenvalue"):
        assert a[key] == pytest.approx(b[key], rel=1e-8), key
    assert a["quotients"][0][0] == pytest.approx(b["quotients"][0][0], rel=1e-8)
    info = lsurf("info", tmp_path / "sharded.h5", check=True).stdout
    assert "of the model (sharded 2 ways, fsdp)" in info and " 4,965 weights" in info, info  # 1/2 of 9,930


def _same_surface(sharded, one) -> None:
    """The same numbers to 1e-10 (what the group's float64 sums add in another order), and the same
    identity: checkpoint, model seed, directions, data."""
    for k in QUANTITIES:
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-10, atol=0, err_msg=k)
    ids = [json.loads(h5py.File(p, "r").attrs["identity"]) for p in (sharded["path"], one["path"])]
    for k in ("checkpoint_sha256", "directions_sha256", "model_seed", "data_sha256"):
        assert ids[0][k] == ids[1][k], k


@pytest.mark.mpi
@requires_mpi
def test_a_checkpoint_is_read_by_rows_into_the_sharded_model(tmp_path):
    """No rank loads the checkpoint whole: the model is built on the meta device, sharded, and each
    rank reads its rows (lsurf.engine.model.sharding.load_sharded); the surface is the unsharded one."""
    torch.save({"state_dict": load_model("cnn", (1, 8, 8), 10, seed=5).state_dict()}, tmp_path / "cnn.t7")
    args = ["surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--x", "-1:1:3", "--y", "-1:1:2",
            "--dtype", "float64", "--checkpoint", tmp_path / "cnn.t7", "--no-progress", "--threads", "1"]
    p = mpirun(4, *args, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "s.h5", check=True)
    assert p.stderr.count("lsurf: model: built sharded 2 ways, each rank reading its 1/2 of") == 1, p.stderr
    cli(*args, "--fidelity", "off", "--out", tmp_path / "one.h5", check=True)
    sharded = _values(tmp_path / "s.h5")
    _same_surface(sharded, _values(tmp_path / "one.h5"))
    assert list(sharded["weights"]) == [4965] * 4  # 1/2 of 9,930 on each rank
    # the directions are held by rows: not written beside the surface (the seed draws them again)
    assert not (tmp_path / "s.directions.h5").exists() and (tmp_path / "one.directions.h5").exists()
    # a direction file is read by rows too: the same surface, the same hash
    mpirun(2, *args, "--dir-file", tmp_path / "one.directions.h5", "--ranks-per-point", "2", "--shard", "fsdp",
           "--out", tmp_path / "f.h5", check=True)
    _same_surface(_values(tmp_path / "f.h5"), _values(tmp_path / "one.h5"))


@pytest.mark.mpi
@requires_mpi
def test_the_plane_through_three_checkpoints_read_by_rows(tmp_path):
    """``--model2 B --model3 C`` sharded: each rank reads its rows of A, B and C, so its directions
    are its rows of B − A and C − A; their hash (each tensor gathered in turn) and the surface are
    the unsharded ones."""
    for name, seed in (("a", 5), ("b", 6), ("c", 7)):
        torch.save({"state_dict": load_model("cnn", (1, 8, 8), 10, seed=seed).state_dict()}, tmp_path / f"{name}.t7")
    args = ["surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--x", "-0.5:1.5:3", "--y", "0:1:2",
            "--dtype", "float64", "--checkpoint", tmp_path / "a.t7", "--model2", tmp_path / "b.t7",
            "--model3", tmp_path / "c.t7", "--no-progress", "--threads", "1"]
    mpirun(2, *args, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "s.h5", check=True)
    cli(*args, "--fidelity", "off", "--out", tmp_path / "one.h5", check=True)
    sharded = _values(tmp_path / "s.h5")
    _same_surface(sharded, _values(tmp_path / "one.h5"))
    assert list(sharded["weights"]) == [4965] * 2


@pytest.mark.mpi
@requires_mpi
def test_a_file_one_rank_cannot_see_is_refused_by_every_rank(tmp_path):
    """Each rank reads its rows of a direction file apart, then the group gathers each tensor to hash
    it: a rank that cannot see the file (its working directory lacks it) makes every rank refuse, in
    one line, before any gather — not a hang in one."""
    (tmp_path / "seen").mkdir(), (tmp_path / "blind").mkdir()
    torch.save({"state_dict": load_model("cnn", (1, 8, 8), 10, seed=5).state_dict()}, tmp_path / "cnn.t7")
    args = ["surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--checkpoint", tmp_path / "cnn.t7",
            "--x", "-1:1:3", "--y", "-1:1:2", "--no-progress", "--threads", "1"]
    cli(*args, "--out", tmp_path / "seen" / "d.h5", check=True)  # writes d.directions.h5 beside it
    (tmp_path / "seen" / "d.directions.h5").rename(tmp_path / "seen" / "dirs.h5")
    rank = [sys.executable, "-m", "lsurf", *map(str, args), "--dir-file", "dirs.h5", "--ranks-per-point", "2",
            "--shard", "fsdp", "--out", str(tmp_path / "s.h5")]
    cmd = ["mpirun", "--oversubscribe", "-n", "1", "-wdir", tmp_path / "seen", *rank,  # two ranks, two places
           ":", "-n", "1", "-wdir", tmp_path / "blind", *rank]
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120, env=_env())
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert p.returncode == 2 and errors == ["lsurf: error: direction file 'dirs.h5': another rank of the group "
                                            "could not read it"], p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "s.h5").exists()


@pytest.mark.mpi
@requires_mpi
def test_the_hessian_of_a_checkpoint_read_by_rows(tmp_path):
    """``lsurf hessian --shard fsdp``: each rank reads its rows of the checkpoint, runs its share of
    the split through the weights gathered whole, and holds its rows of every Lanczos vector; the
    spectrum, and a surface on the Hessian plane, are one unsharded process's."""
    torch.save({"state_dict": load_model("cnn", (1, 8, 8), 10, seed=5).state_dict()}, tmp_path / "cnn.t7")
    args = ["hessian", "--model", "cnn", "--data", "digits", "--subset", "60", "--dtype", "float64", "--checkpoint",
            tmp_path / "cnn.t7", "--top-k", "2", "--iters", "20", "--trace-samples", "2", "--threads", "1"]
    mpirun(2, *args, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "s.h5", check=True)
    cli(*args, "--out", tmp_path / "one.h5", check=True)
    with h5py.File(tmp_path / "s.h5") as s, h5py.File(tmp_path / "one.h5") as one:
        for k in ("eigenvalues", "trace"):
            np.testing.assert_allclose(s[k][()], one[k][()], rtol=1e-8, atol=0, err_msg=k)
    # a Hessian plane of the sharded model: each rank's rows of the eigenvectors move its rows of the weights
    plane = ["surface", *args[1:5], "--subset", "12", *args[7:11], "--x", "-1:1:2", "--y", "-1:1:2",
             "--directions", "hessian:max,min",
             "--threads", "1", "--no-progress", "--fidelity", "off"]  # 100 Lanczos steps: a small split
    mpirun(2, *plane, "--ranks-per-point", "2", "--shard", "fsdp", "--out", tmp_path / "hs.h5", check=True)
    cli(*plane, "--out", tmp_path / "h1.h5", check=True)
    with h5py.File(tmp_path / "hs.h5") as s, h5py.File(tmp_path / "h1.h5") as one:
        np.testing.assert_allclose(s["train_loss"][()], one["train_loss"][()], rtol=1e-8, atol=0)
        values = [json.loads(f.attrs["directions"])["eigenvalues"] for f in (s, one)]
        np.testing.assert_allclose(*values, rtol=1e-8)
    # one group of every rank, and the eigenvectors (held by rows) are not saved as directions
    p = mpirun(4, *args, "--ranks-per-point", "2", "--shard", "fsdp")
    assert p.returncode == 2 and "needs one group of all ranks: run 2 ranks, not 4" in p.stderr, p.stderr
    p = cli(*args, "--ranks-per-point", "2", "--shard", "fsdp", "--save-directions", tmp_path / "d.h5")
    assert p.returncode == 2 and "not saved as directions with --shard fsdp" in p.stderr, p.stderr
    assert not (tmp_path / "d.h5").exists()


@pytest.mark.mpi
@requires_mpi
def test_a_hugging_face_folder_of_several_files_is_read_sharded(tmp_path, gpt2, corpus):
    """GPT-2 (its output head tied to its input embedding) saved as 4 safetensors files and their
    index, sharded 4 ways, each rank reading its rows, in bfloat16 with regenerated directions (as
    slurm/shard-70b.sh runs a large model): the unsharded surface."""
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(gpt2).save_pretrained(tmp_path / "gpt2", max_shard_size="40KB")
    assert len(list((tmp_path / "gpt2").glob("*.safetensors"))) > 2
    args = ["surface", "--data", f"tokens:{corpus}", "--seq-len", "16", "--subset", "24", "--x", "-1:1:3",
            "--y", "-1:1:2", "--dtype", "bfloat16", "--regenerate", "--no-progress", "--threads", "1"]
    mpirun(4, *args, "--model", f"hf:{tmp_path / 'gpt2'}", "--ranks-per-point", "4", "--shard", "fsdp",
           "--out", tmp_path / "s.h5", check=True)
    cli(*args, "--model", f"hf:{gpt2}", "--fidelity", "off", "--out", tmp_path / "one.h5", check=True)
    _same_surface(_values(tmp_path / "s.h5"), _values(tmp_path / "one.h5"))


@pytest.mark.mpi
@requires_mpi
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    torch.save(load_model("mlp", (1, 8, 8), 10, seed=5).state_dict(), tmp_path / "mlp.pt")
    p = mpirun(2, "surface", "--model", "cnn", "--data", "digits", "--subset", "40", "--x", "-1:1:3", "--checkpoint",
               tmp_path / "mlp.pt", "--ranks-per-point", "2", "--shard", "fsdp", "--no-progress",
               "--out", tmp_path / "s.h5")
    errors = [line for line in p.stderr.splitlines() if line.startswith("lsurf: error")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr
    assert "does not fit this model: 6 missing keys, first 'conv1.weight'; 6 unexpected keys" in errors[0], errors
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("extra, says", [
    ([], "lsurf: error: --shard fsdp shards the model over a rank group: it needs --ranks-per-point of 2 or more"),
    (["--ranks-per-point", "2", "--points-per-pass", "2"], "it cannot be combined with --points-per-pass > 1"),
    (["--ranks-per-point", "2", "--layout", "channels-last"], "not with --layout channels-last"),
    (["--ranks-per-point", "2", "--checkpoint", "a.pt", "--geometry", "circles:make"],
     "--shard fsdp reads each rank's part of the weights: not with --geometry, which need the whole model on "
     "one rank"),
])
def test_what_the_sharded_path_cannot_do_is_one_line(tmp_path, extra, says):
    p = cli("surface", "--shard", "fsdp", *extra, "--out", tmp_path / "s.h5")
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "s.h5").exists()


def test_the_70b_example_passes_options_lsurf_takes(tmp_path):
    """slurm/shard-70b.sh's options, checked as its job's own ``--verify`` checks them (the output is
    only looked for: a typo in a flag or a refused combination would say so instead)."""
    text = (REPO / "slurm" / "shard-70b.sh").read_text()
    args = shlex.split(text[text.rindex("slurm/gpu.sbatch") + len("slurm/gpu.sbatch"):].replace("\\\n", " "))
    p = cli("surface", "--verify", *args, cwd=tmp_path)
    assert p.returncode == 1 and "llama70b.h5 does not exist: the run wrote nothing" in p.stderr, p.stderr
