"""Shared helpers: run the real CLI in a subprocess, alone or under a real ``mpirun``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "loss-landscape"


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none"})
    env.setdefault("PYTHONPATH", str(REPO))
    env.update(extra or {})
    return env


def lsurf(*args, cwd=None, timeout=300, env=None, check=False) -> subprocess.CompletedProcess:
    """``python -m lsurf ARGS`` in one process; returns the completed process (text output)."""
    cmd = [sys.executable, "-m", "lsurf", *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def mpi_command(n: int, *args) -> list[str]:
    return ["mpirun", "-n", str(n), "--oversubscribe", "--allow-run-as-root",
            sys.executable, "-m", "lsurf", *map(str, args)]


def mpirun(n: int, *args, cwd=None, timeout=300, env=None, check=False) -> subprocess.CompletedProcess:
    """``mpirun -n N python -m lsurf ARGS`` for real (Open MPI, oversubscribed, as root)."""
    cmd = mpi_command(n, *args)
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def wait_for_done(path, at_least: int, timeout: float = 120, proc: subprocess.Popen | None = None) -> int:
    """Poll a running job's surface file (readable while it is written) until enough points are done.

    With ``proc``, a job that ends first fails the wait at once, with what it printed.
    """
    import h5py

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with h5py.File(path, "r") as f:
                n = int(f["done"][()].sum())
            if n >= at_least:
                return n
        except (OSError, KeyError):
            pass  # not created yet
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"{path}: the job ended ({proc.returncode}) before {at_least} points:\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {at_least} points done after {timeout} s")


def rank_pids(mpirun_pid: int) -> list[int]:
    """The rank processes Open MPI's mpirun started on this node (its children)."""
    out = subprocess.run(["pgrep", "-P", str(mpirun_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


requires_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
requires_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A CNN trained for 2 epochs on digits (deterministic), shared by the whole session."""
    out = tmp_path_factory.mktemp("runs")
    lsurf("train", "--model", "cnn", "--data", "digits", "--epochs", "2", "--out-dir", out, check=True)
    return out / "model_2.t7"


def write_data_plugin(tmp_path: Path, monkeypatch, name: str, x: np.ndarray, y: np.ndarray) -> None:
    """A data plug-in module ``name`` (``name:make``) serving (x, y) as a TensorDataset, importable
    for the test: what a user's own loader module looks like."""
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import numpy as np, torch
        from torch.utils.data import TensorDataset
        def make():
            x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
            y = torch.from_numpy(np.load({str(tmp_path / 'y.npy')!r}))
            return TensorDataset(x, y), None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


N, D = 120, 5


@pytest.fixture
def regression(tmp_path, monkeypatch):
    """A data plug-in module and a float64 checkpoint for ``linear`` (params net.0.weight, net.0.bias)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    y = x @ rng.normal(size=D) + 0.3 * rng.normal(size=N)
    write_data_plugin(tmp_path, monkeypatch, "regdata", x, y)
    w0, b0 = rng.normal(size=(1, D)), rng.normal(size=1)
    torch.save({"net.0.weight": torch.tensor(w0), "net.0.bias": torch.tensor(b0)}, tmp_path / "lin.pt")
    return {"x": x, "y": y, "w0": w0, "b0": b0, "dir": tmp_path}
