"""A corpus of wrong invocations: each ends with exit 2, one line naming the problem and the value,
no traceback, and every file that existed before is byte-identical afterwards.

The corpus runs the command in this process (tests/inprocess.py: ``main(argv)``, output captured,
process state restored); what needs a real process (the interpreter's traceback, a closed pipe)
starts one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import _env, lsurf, write_data_plugin
from inprocess import cli

from lsurf import load_model, random_directions, save_directions

SMALL = ["--model", "cnn", "--data", "digits", "--subset", "100", "--no-progress"]
CURVE = ["--model", "cnn", "--data", "digits", "--subset", "100"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, digits_checkpoint):
    """A workspace of good and bad files, and a finished surface to protect."""
    d = tmp_path_factory.mktemp("bad")
    shutil.copy(digits_checkpoint, d / "good.t7")
    raw = (d / "good.t7").read_bytes()
    (d / "truncated.t7").write_bytes(raw[: len(raw) // 2])
    (d / "notes.t7").write_text("these are not weights\n")
    torch.save(load_model("mlp", (1, 8, 8), 10).state_dict(), d / "mlp.t7")
    save_directions(random_directions(load_model("resnet20", None, None), seed=0), d / "resnet_dirs.h5")
    nan_dirs = random_directions(load_model("cnn", (1, 8, 8), 10, d / "good.t7"), seed=0)
    nan_dirs.x[2][0] = float("nan")
    save_directions(nan_dirs, d / "nan_dirs.h5")
    save_directions(random_directions(load_model("cnn", (1, 8, 8), 10, d / "good.t7"), seed=0, two=False),
                    d / "x_only.h5")
    (d / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    (d / "cifar_empty").mkdir()
    (d / "job_unknown.toml").write_text('model = "cnn"\nbatchsize = 64\n')
    (d / "job_broken.toml").write_text('model = "cnn\n')
    (d / "a_file").write_text("x")
    (d / "lengths").mkdir()
    np.save(d / "lengths" / "train_x.npy", np.zeros((10, 1, 8, 8), np.float32))
    np.save(d / "lengths" / "train_y.npy", np.zeros(9, np.int64))
    (d / "trainonly").mkdir()
    np.save(d / "trainonly" / "train_x.npy", np.zeros((10, 1, 8, 8), np.float32))
    np.save(d / "trainonly" / "train_y.npy", np.zeros(10, np.int64))
    (d / "plugins.py").write_text(textwrap.dedent("""
        import torch
        def raising():
            raise ValueError("factory exploded")
        def three_outputs():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        def bad_items():
            return [1, 2, 3], None
    """))
    cli("surface", *SMALL, "--checkpoint", d / "good.t7", "--x", "-1:1:3", "--y", "-1:1:3", "--out", d / "done.h5",
        check=True)
    torch.save(load_model("cnn", (1, 8, 8), 10, seed=1).state_dict(), d / "other.t7")
    cli("curve", "train", *CURVE, "--checkpoint", d / "good.t7", "--model2", d / "good.t7", "--epochs", "1",
        "--out", d / "curve.h5", check=True)
    return d


def _grid(extra=()):
    return ["--x", "-1:1:3", "--y", "-1:1:3", *extra]


# (id, argument builder given the workspace, substrings the one line must contain)
CASES = [
    ("grid-two-parts", lambda d: ["surface", *SMALL, "--x", "-1:1"], ["--x", "'-1:1'", "MIN:MAX:NUM"]),
    ("grid-reversed", lambda d: ["surface", *SMALL, "--x", "1:-1:5"], ["'1:-1:5'", "greater than MIN"]),
    ("grid-letters", lambda d: ["surface", *SMALL, "--x", "a:b:c"], ["'a:b:c'", "numbers"]),
    ("grid-zero-points", lambda d: ["surface", *SMALL, "--x", "0:1:0"], ["'0:1:0'", "at least 1"]),
    ("grid-float-count", lambda d: ["surface", *SMALL, "--y", "0:1:2.5"], ["--y", "'0:1:2.5'", "whole number"]),
    ("grid-too-large", lambda d: ["surface", *SMALL, "--x", "0:1:1000000", "--y", "0:1:1000000"],
     ["grid of", "GiB"]),
    ("axis-too-large", lambda d: ["surface", *SMALL, "--x", "0:1:10000000000"], ["grid of", "GiB"]),
    ("tile-zero", lambda d: ["surface", *SMALL, *_grid(["--tile", "0x3"])], ["--tile", "'0x3'"]),
    ("unknown-model", lambda d: ["surface", "--model", "resnet21", "--x", "0:1:2"], ["'resnet21'", "'resnet20'"]),
    ("plugin-not-importable", lambda d: ["surface", "--model", "nosuchpkg.mod:make", "--x", "0:1:2"],
     ["nosuchpkg.mod", "cannot import"]),
    ("plugin-raises", lambda d: ["surface", "--model", "plugins:raising", "--x", "0:1:2"],
     ["plugins:raising", "factory exploded"]),
    ("checkpoint-missing", lambda d: ["surface", *SMALL, "--checkpoint", d / "nope.t7", "--x", "0:1:2"],
     ["nope.t7", "does not exist"]),
    ("checkpoint-truncated", lambda d: ["surface", *SMALL, "--checkpoint", d / "truncated.t7", "--x", "0:1:2"],
     ["truncated.t7", "not a readable torch checkpoint"]),
    ("checkpoint-not-weights", lambda d: ["surface", *SMALL, "--checkpoint", d / "notes.t7", "--x", "0:1:2"],
     ["notes.t7", "not a readable"]),
    ("checkpoint-other-architecture", lambda d: ["surface", *SMALL, "--checkpoint", d / "mlp.t7", "--x", "0:1:2"],
     ["mlp.t7", "missing keys, first 'conv1.weight'", "unexpected keys, first 'net.0.weight'"]),
    ("dirs-other-model", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--dir-file",
                                    d / "resnet_dirs.h5", *_grid()], ["resnet_dirs.h5", "another model"]),
    ("dirs-nan", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--dir-file", d / "nan_dirs.h5",
                            *_grid()], ["nan_dirs.h5", "NaN"]),
    ("dirs-only-x-for-2d", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--dir-file",
                                      d / "x_only.h5", *_grid()], ["x_only.h5", "only an x direction"]),
    ("dirs-corrupt-hdf5", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--dir-file",
                                     d / "corrupt.h5", *_grid()], ["corrupt.h5", "not a readable HDF5"]),
    ("output-corrupt-hdf5", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", *_grid(),
                                       "--out", d / "corrupt.h5"], ["corrupt.h5", "not a readable HDF5"]),
    ("output-other-grid", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--x", "-1:1:5",
                                     "--y", "-1:1:3", "--out", d / "done.h5"],
     ["done.h5", "another grid", "x -1:1:3", "x -1:1:5", "--overwrite"]),
    ("output-other-directions", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", *_grid(["--seed", "5"]),
                                           "--out", d / "done.h5"], ["done.h5", "directions sha256"]),
    ("output-other-checkpoint", lambda d: ["surface", *SMALL, "--checkpoint", d / "truncated.t7", *_grid(),
                                           "--out", d / "done.h5"], ["truncated.t7"]),
    ("output-other-data", lambda d: ["surface", "--model", "cnn", "--data", "digits", "--subset", "120",
                                     "--checkpoint", d / "good.t7", *_grid(), "--out", d / "done.h5"],
     ["done.h5", "another"]),
    ("output-folder-missing", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", *_grid(),
                                         "--out", d / "a_file" / "s.h5"], ["a_file", "does not exist"]),
    ("output-not-writable", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", *_grid(),
                                       "--out", "/proc/lsurf.h5"], ["/proc/lsurf.h5"]),
    ("cifar-without-batches", lambda d: ["surface", "--model", "resnet20", "--data", f"cifar10:{d / 'cifar_empty'}",
                                         "--x", "0:1:2"], ["cifar_empty", "data_batch_1"]),
    ("subset-too-large", lambda d: ["surface", "--model", "cnn", "--data", "digits", "--subset", "99999",
                                    "--x", "0:1:2"], ["--subset 99999", "larger than"]),
    ("outputs-do-not-fit-labels", lambda d: ["surface", "--model", "plugins:three_outputs", "--data", "digits",
                                             "--x", "0:1:2", "--out", d / "o.h5"],
     ["class labels 0 to 9", "gives 3 outputs"]),
    ("data-plugin-bad-items", lambda d: ["surface", "--model", "cnn", "--data", "plugins:bad_items", "--x", "0:1:2"],
     ["plugins:bad_items", "(x, y)"]),
    ("store-missing", lambda d: ["surface", "--model", "cnn", "--data", f"npy:{d / 'nope'}", "--x", "0:1:2"],
     ["nope", "does not exist"]),
    ("store-not-hdf5", lambda d: ["surface", "--model", "cnn", "--data", f"hdf5:{d / 'notes.t7'}", "--x", "0:1:2"],
     ["notes.t7", "not an HDF5 file"]),
    ("store-x-y-lengths", lambda d: ["surface", "--model", "cnn", "--data", f"npy:{d / 'lengths'}", "--x", "0:1:2"],
     ["lengths", "10 rows but y has 9"]),
    ("store-unknown-split", lambda d: ["surface", "--model", "cnn", "--data", f"npy:{d / 'trainonly'}",
                                       "--split", "test", "--x", "0:1:2"], ["has no test split"]),
    ("unknown-data", lambda d: ["surface", "--model", "cnn", "--data", "imagenet", "--x", "0:1:2"], ["'imagenet'"]),
    ("unknown-split", lambda d: ["surface", *SMALL, "--split", "validation", "--x", "0:1:2"], ["'validation'"]),
    ("batch-size-zero", lambda d: ["surface", *SMALL, "--batch-size", "0", "--x", "0:1:2", "--out", d / "o.h5"],
     ["--batch-size 0"]),
    ("synthetic-bad-option", lambda d: ["surface", "--model", "cnn", "--data", "synthetic:colour=red", "--x", "0:1:2"],
     ["colour=red"]),
    ("no-cuda", lambda d: pytest.skip("this machine has CUDA: nothing to refuse") if torch.cuda.is_available() else
     ["surface", *SMALL, "--device", "cuda", "--x", "0:1:2", "--out", d / "o.h5"], ["--device cuda", "no CUDA"]),
    ("toml-unknown-key", lambda d: ["surface", "--config", d / "job_unknown.toml"],
     ["job_unknown.toml", "'batchsize'", "'batch-size'"]),
    ("toml-broken", lambda d: ["surface", "--config", d / "job_broken.toml"], ["job_broken.toml", "not valid TOML"]),
    ("bad-dtype", lambda d: ["surface", *SMALL, "--dtype", "float16"], ["--dtype", "float16"]),
    ("fidelity-unknown", lambda d: ["surface", *SMALL, "--fidelity", "always"], ["--fidelity", "always"]),
    ("model2-with-dir-file", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", "--model2", d / "good.t7",
                                        "--dir-file", d / "x_only.h5", "--x", "0:1:2"], ["--dir-file", "--model2"]),
    ("info-missing", lambda d: ["info", d / "nothing.h5"], ["nothing.h5", "does not exist"]),
    ("info-not-a-surface", lambda d: ["info", d / "resnet_dirs.h5"], ["resnet_dirs.h5", "not a surface file"]),
    ("abbreviated-flag", lambda d: ["surface", *SMALL, "--batch", "64", "--x", "0:1:2"], ["--batch 64"]),
    ("resume-against-the-plan", lambda d: ["surface", *SMALL, "--checkpoint", d / "good.t7", *_grid(),
                                           "--batch-size", "7", "--out", d / "done.h5"],
     ["--batch-size 7", "--overwrite"]),
    ("amp-with-float64", lambda d: ["surface", *SMALL, "--amp", "bf16", "--dtype", "float64"], ["--amp", "float64"]),
    ("export-unknown-format", lambda d: ["export", d / "done.h5", "--format", "stl"], ["--format", "'stl'"]),
    ("export-onto-itself", lambda d: ["export", d / "done.h5", "--format", "ll", "--out", d / "done.h5"],
     ["done.h5", "source file itself"]),
    ("plot-diff-one-file", lambda d: ["plot", d / "done.h5", "--diff", "ratio"], ["--diff", "two"]),
    ("budget-below-the-coarse-picture", lambda d: ["surface", *SMALL, "--x", "-1:1:33", "--y", "-1:1:33",
                                                   "--budget", "20", "--out", d / "o.h5"],
     ["--budget 20", "81 points"]),
    ("budget-with-planes", lambda d: ["surface", *SMALL, *_grid(["--budget", "50", "--planes", "2"])],
     ["--budget", "--planes"]),
    ("refine-tol-negative", lambda d: ["surface", *SMALL, *_grid(["--refine-tol", "-0.1"])], ["--refine-tol -0.1"]),
    ("tolerance-zero", lambda d: ["surface", *SMALL, *_grid(["--tolerance", "0"])], ["--tolerance 0", "positive"]),
    ("tolerance-with-points-per-pass", lambda d: ["surface", *SMALL, *_grid(["--tolerance", "0.1",
                                                                            "--points-per-pass", "4"])],
     ["--tolerance", "--points-per-pass"]),
    ("min-samples-one", lambda d: ["surface", *SMALL, *_grid(["--tolerance", "0.1", "--min-samples", "1"])],
     ["--min-samples 1"]),
    ("curve-other-architecture", lambda d: ["curve", "train", *CURVE, "--checkpoint", d / "good.t7", "--model2",
                                            d / "mlp.t7", "--out", d / "o.h5"], ["--model2", "mlp.t7", "architecture"]),
    ("curve-no-bends", lambda d: ["curve", "train", *CURVE, "--checkpoint", d / "good.t7", "--model2", d / "other.t7",
                                  "--bends", "0", "--out", d / "o.h5"], ["--bends 0", "at least 1"]),
    ("curve-train-on-test", lambda d: ["curve", "train", *CURVE, "--checkpoint", d / "good.t7", "--model2",
                                       d / "good.t7", "--split", "test", "--out", d / "o.h5"],
     ["--split 'test'", "train split"]),
    ("curve-of-other-models", lambda d: ["curve", "eval", d / "curve.h5", *CURVE, "--checkpoint", d / "good.t7",
                                         "--model2", d / "other.t7", "--out", d / "o.h5"],
     ["--model2", "other.t7", "curve.h5", "trained from"]),
]


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case,build,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, needles, ws):
    before = _snapshot(ws)
    p = cli(*build(ws), cwd=ws)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, f"{case}: exit {p.returncode}\n{p.stderr}"
    assert len(lines) == 1, f"{case}: expected one line, got:\n{p.stderr}"
    assert lines[0].startswith("lsurf: error"), lines[0]
    assert "Traceback" not in p.stderr
    for needle in needles:
        assert needle in lines[0], f"{case}: {needle!r} not in {lines[0]!r}"
    after = _snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, f"{case} changed an existing file"
    assert not [k for k in after if k not in before and not k.endswith((".lock", "o.directions.h5"))], after


@pytest.mark.cli
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_a_label_beyond_the_outputs_past_the_preflight_sample_is_one_line(device, tmp_path, monkeypatch):
    """A plug-in data set's labels are not known before the run (only two rows are tried): label
    12 at row 7 of a 10-class model ended in an index error (a device assert on a GPU)."""
    y = np.zeros(10, np.int64)
    y[7] = 12
    write_data_plugin(tmp_path, monkeypatch, "badlabel", np.random.default_rng(0).normal(size=(10, 64)), y)
    (tmp_path / "tenway.py").write_text(textwrap.dedent("""
        import torch
        def model():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    """))
    p = lsurf("surface", "--model", "tenway:model", "--data", "badlabel:make", "--x", "-1:1:3", "--no-progress",
              "--device", device, "--out", tmp_path / "s.h5", env={"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("lsurf: error: the train split holds label 12 at row 7, outside "
                                                 "the model's 10 outputs (1 such label in the pass): labels must "
                                                 "lie in 0 to 9"), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.cli
def test_debug_shows_the_traceback(ws):
    p = lsurf("surface", "--model", "resnet21", "--x", "0:1:2", "--debug", cwd=ws, process=True)
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserError" in p.stderr


def test_overflow_is_stored_flagged_and_not_an_error(tmp_path):
    """Far out along a direction the loss overflows to inf: that is a result, not a failure."""
    out = tmp_path / "far.h5"
    cli("surface", "--model", "linear", "--data", "synthetic:shape=4,n=50,task=regression", "--loss", "mse",
        "--norm", "none", "--x", "0:1e30:3", "--out", out, "--no-progress", check=True)
    with h5py.File(out) as f:
        loss, done = f["train_loss"][()], f["done"][()]
    assert done.all() and np.isfinite(loss[0]) and not np.isfinite(loss[2])
    info = cli("info", out, check=True).stdout
    assert "non-finite" in info


def test_verify_says_in_one_line_whether_the_surface_is_complete(ws, tmp_path):
    """``surface --verify`` (run by the sbatch templates after srun) resolves --out as a run would, reads it,
    and answers in one line: 0 when every point is done, 1 when some are missing or there is no file."""
    args = ["surface", "--verify", *SMALL, "--checkpoint", ws / "good.t7", *_grid()]
    (tmp_path / "job.toml").write_text(f'out = "{ws / "done.h5"}"\n')
    for where in (["--out", ws / "done.h5"], ["--config", tmp_path / "job.toml"]):
        p = cli(*args, *where)
        assert p.returncode == 0 and p.stdout.strip() == f"{ws / 'done.h5'}: complete (9 points)", p.stderr
    shutil.copy(ws / "done.h5", tmp_path / "part.h5")
    with h5py.File(tmp_path / "part.h5", "r+") as f:
        f["done"][0, :2] = 0
    before = _snapshot(tmp_path)
    p = cli(*args, "--out", tmp_path / "part.h5")
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"lsurf: {tmp_path / 'part.h5'} is incomplete: 7 of 9 points done; resubmit the same command to finish it"]
    assert _snapshot(tmp_path) == before  # read only
    p = cli(*args, "--out", tmp_path / "none.h5")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith(f"lsurf: {tmp_path / 'none.h5'} does not exist") and not (tmp_path / "none.h5").exists()


@pytest.mark.cli
def test_a_reader_that_goes_away_ends_output_quietly(ws):
    """``lsurf info f.h5 | head -1``: the reader closes the pipe; lsurf stops as a shell tool killed
    by SIGPIPE would (status 141), with no traceback. Here the pipe is closed before lsurf writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, "-m", "lsurf", "info", str(ws / "done.h5")], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120, env=_env())
    finally:
        os.close(write)
    assert p.returncode == 141 and p.stderr == "", p.stderr
