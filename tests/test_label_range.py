"""A class label outside the model's outputs, past the pre-flight sample (a plug-in data set, whose
labels are not known before the run), ends every job that computes the loss with the one line the
surface's evaluator gives (exit 2): not an index error, nor on a GPU a device assert."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from conftest import _env, lsurf, mpirun

from lsurf import read_surface

LINE = ("lsurf: error: the train split holds label 12 at row 7, outside the model's 10 outputs (1 such label in "
        "the pass): labels must lie in 0 to 9")


@pytest.fixture
def inputs(tmp_path):
    """A data plug-in (train and test: 10 rows each, label 12 at row 7 of each), a 10-way linear
    model plug-in and two checkpoints of it (a curve's ends); the environment that imports them."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 64)).astype(np.float32), np.zeros(10, np.int64)
    y[7] = 12
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "badlabel.py").write_text(textwrap.dedent(f"""
        import numpy as np, torch
        from torch.utils.data import TensorDataset
        def make():
            split = TensorDataset(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})),
                                  torch.from_numpy(np.load({str(tmp_path / 'y.npy')!r})))
            return split, split
    """))
    (tmp_path / "tenway.py").write_text(textwrap.dedent("""
        import torch
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    """))
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict(),
                   tmp_path / f"end{seed}.pt")
    return tmp_path, {"PYTHONPATH": f"{tmp_path}:{_env()['PYTHONPATH']}"}


_MODEL = ("--model", "tenway:model", "--data", "badlabel:make")
_CURVE = ("--checkpoint", "{d}/end1.pt", "--model2", "{d}/end2.pt")
JOBS = {
    "hessian": ("hessian", *_MODEL, "--top-k", "1", "--iters", "3", "--trace-samples", "2", "--out", "{d}/h.npz"),
    "sharpness": ("sharpness", *_MODEL, "--radius", "0.1", "--samples", "2", "--out", "{d}/s.npz"),
    "sharpness-worst": ("sharpness", *_MODEL, "--radius", "0.1", "--kind", "worst", "--steps", "2",
                        "--restarts", "1", "--out", "{d}/w.npz"),
    "curve-train": ("curve", "train", *_MODEL, *_CURVE, "--epochs", "1", "--out", "{d}/c.h5"),
}


@pytest.mark.cli
@pytest.mark.parametrize("job", list(JOBS))
def test_a_label_beyond_the_outputs_ends_each_job_in_one_line(job, inputs):
    """hessian and curve training ended in ``RuntimeError: index 12 is out of bounds`` (exit 1)."""
    d, env = inputs
    p = lsurf(*(a.format(d=d) for a in JOBS[job]), env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == LINE, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.cli
def test_curve_evaluation_on_data_with_a_label_beyond_the_outputs_is_one_line(inputs):
    d, env = inputs
    digits = ("--model", "tenway:model", "--data", "digits", "--subset", "40", *(a.format(d=d) for a in _CURVE))
    lsurf("curve", "train", *digits, "--epochs", "1", "--out", d / "c.h5", env=env, check=True)
    p = lsurf("curve", "eval", d / "c.h5", "--data", "badlabel:make", "--points", "3",
              "--out", d / "e.h5", env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == LINE, p.stderr
    assert not read_surface(d / "e.h5").done.any()  # a surface's runner: the file holds no point, resumable


@pytest.mark.mpi
def test_the_hessian_names_the_row_of_the_split_not_of_the_ranks_share(inputs):
    """Under 2 ranks row 7 is rank 1's third row: the line names the split's row, as one process does."""
    d, env = inputs
    p = mpirun(2, *(a.format(d=d) for a in JOBS["hessian"]), env=env)
    assert p.returncode == 2, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("lsurf: error")] == [LINE], p.stderr
