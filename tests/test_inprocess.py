"""The in-process ``lsurf`` (tests/inprocess.py): what it changes of pytest's process comes back, what
the command prints is all captured, and it says what a real ``python -m lsurf`` says."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, _env, lsurf
from inprocess import _precision, cli

from lsurf._version import __version__

RUN = ["surface", "--data", "digits", "--subset", "50", "--x", "0:1:2", "--no-progress"]

# A plug-in factory that changes everything an entry point or a user's module may change, then fails.
MESSY = """
    import os, random, sys, warnings
    import numpy as np, torch
    def make():
        torch.set_num_threads(3)
        torch.set_default_dtype(torch.float64)
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        sys.path.append("/nowhere")
        sys.excepthook = None
        os.environ["LSURF_TEST_LEFTOVER"] = "1"
        os.chdir("/")
        warnings.simplefilter("error")
        raise ValueError("{}")
"""


def _state() -> dict:
    return {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(), "precision": _precision(),
            "rng": (torch.get_rng_state().numpy().tobytes(),
                    np.random.get_state(legacy=False)["state"]["key"].tobytes(), random.getstate()),
            "path": list(sys.path), "hook": sys.excepthook, "env": dict(os.environ), "cwd": os.getcwd(),
            "filters": list(warnings.filters)}


def _plugin(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "messy.py").write_text(textwrap.dedent(text))
    return folder


def test_what_the_command_changes_in_the_process_comes_back(tmp_path):
    before = _state()
    for name in ("first", "second"):  # the same module name in two folders: each call imports its own
        p = cli(*RUN, "--model", "messy:make", cwd=_plugin(tmp_path / name, MESSY.format(name)))
        assert p.returncode == 2 and p.stderr == f"lsurf: error: model plug-in 'messy:make' raised ValueError: {name}\n"
        assert "messy" not in sys.modules
        after = _state()
        assert after == before


def test_all_the_command_prints_is_captured(tmp_path):
    """A warning is shown as a fresh interpreter shows it, every time (pytest would only record it), and
    what is written to the file descriptor itself (as C libraries do) is captured too."""
    _plugin(tmp_path / "p", """
        import os, warnings
        def make():
            warnings.warn("careful")
            os.write(2, b"straight to fd 2\\n")
            raise ValueError("no model")
    """)
    for _ in range(2):
        p = cli(*RUN, "--model", "messy:make", cwd=tmp_path / "p")
        lines = p.stderr.splitlines()
        assert p.returncode == 2 and "UserWarning: careful" in lines[0] and "straight to fd 2" in lines, p.stderr
        assert "lsurf: error: model plug-in 'messy:make' raised ValueError: no model" in lines


def test_usage_and_version_exit_as_a_process_would():
    p = cli("--version")
    assert p.returncode == 0 and p.stdout == f"lsurf {__version__}\n"
    p = cli("surface", "--batch", "64")
    assert p.returncode == 2 and p.stderr.startswith("lsurf: error: unrecognized arguments: --batch 64")


@pytest.mark.cli
@pytest.mark.parametrize("args", [
    ["surface", "--model", "cnn", "--batch", "64"],  # argparse, through SystemExit
    ["surface", "--model", "cnn", "--x", "1:-1:5"],  # a UserError from the options
    ["surface", *RUN[1:], "--model", "messy:make"],  # a plug-in found in the working directory
    ["info", "missing.h5"],
], ids=["usage", "options", "plugin", "info"])
def test_in_process_says_what_a_process_says(args, tmp_path):
    _plugin(tmp_path / "job", MESSY.format("from the job folder"))
    inside, outside = cli(*args, cwd=tmp_path / "job"), lsurf(*args, cwd=tmp_path / "job")
    assert (inside.returncode, inside.stdout, inside.stderr) == (outside.returncode, outside.stdout, outside.stderr)
    assert inside.returncode == 2 and len(inside.stderr.splitlines()) == 1


@pytest.mark.cli
def test_no_communicator_in_process_even_under_a_launcher(tmp_path):
    """In pytest's process a command must never build an MPI world: its failure would be MPI_Abort,
    which ends pytest. With a launcher's variables set, a fresh interpreter runs a failing command
    through cli() and must neither import mpi4py.MPI nor abort."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from inprocess import cli
        p = cli("surface", "--model", "resnet21", "--x", "0:1:2")
        assert p.returncode == 2, p
        assert "mpi4py.MPI" not in sys.modules
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=_env({"OMPI_COMM_WORLD_SIZE": "2", "PMI_SIZE": "2"}))
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr
