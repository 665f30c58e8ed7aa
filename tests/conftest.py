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
from inprocess import cli

from lsurf import load_data, load_model
from lsurf.engine.training.train import train

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "loss-landscape"


# The test tiers (pyproject's markers). A bare ``pytest`` runs the unmarked, fast tier; CI runs all.
TIERS = ("cli", "mpi", "system", "gpu")
FAST_TIER_LIMIT_S = float(os.environ.get("LSURF_FAST_TIER_LIMIT_S", "5"))
_running: list[pytest.Item | None] = [None]
_shared_setup_s = [0.0]  # of the running test's setup, spent making fixtures that other tests share
_cpu_s: dict[str, float] = {}  # CPU seconds of the running test's setup and call, in this process


def _timed(when: str):
    """A hook wrapper that notes the CPU seconds a phase of a test uses in this process: unlike the
    wall clock, they do not grow when CI's pytest workers share the cores with MPI tests."""
    @pytest.hookimpl(hookwrapper=True)
    def hook(item: pytest.Item):
        if when == "setup":
            _running[0] = item
            _shared_setup_s[0] = 0.0
        start = time.process_time()
        yield
        _cpu_s[when] = time.process_time() - start
    return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")


class _SharedFixtureTimer:
    """Times session- and module-wide fixtures (their own dependencies are made before this hook).
    A plugin, not a conftest hook: a conftest's hooks do not see the session's fixtures made."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        start = time.process_time()
        yield
        if fixturedef.scope in ("session", "package", "module"):
            _shared_setup_s[0] += time.process_time() - start


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_SharedFixtureTimer(), "lsurf-shared-fixture-timer")
    # One torch thread, as each rank of a job runs: CI's two workers then fill the two cores without
    # oversubscribing them, and a fast test's CPU time is its time (torch's threads would add theirs).
    torch.set_num_threads(1)


ONE_WORKER = {"tests/test_slurm.py::": "slurm"}  # tests that share one resource: one cluster's daemons at a time


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` with the tests of each ``ONE_WORKER`` prefix kept on one worker. xdist's
    own grouping (the ``xdist_group`` mark) appends the group to each test's node id, which pytest 9
    no longer lets a plugin change: it grouped nothing, and two workers could each start a Slurm
    cluster on the same ports. Every other test is a unit of its own, as with loadgroup."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((group for prefix, group in ONE_WORKER.items() if nodeid.startswith(prefix)), nodeid)

    return Grouped(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tiers first (system, mpi, cli, then the fast tier; within each, file order): the
    workers then end on short tests together, not one on a long job while the other waits."""
    rank = {m: i for i, m in enumerate(("system", "mpi", "cli"))}
    items.sort(key=lambda item: min((rank[m] for m in rank if item.get_closest_marker(m)), default=len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """An unmarked test that takes longer than the fast tier allows fails: a slow test must declare
    its tier, so that a bare ``pytest`` stays a two-minute signal. Time is the CPU time of this
    process (the fast tier starts no processes), so a loaded machine does not fail a fast test.
    Its setup counts without the fixtures it shares with other tests (the digits CNN, a module's
    workspace): whichever test comes first makes them, and they are paid once for all."""
    outcome = yield
    report = outcome.get_result()
    tiered = any(item.get_closest_marker(m) for m in TIERS)
    own = _cpu_s.pop(report.when, 0.0) - (_shared_setup_s[0] if report.when == "setup" else 0.0)
    if report.when != "teardown" and report.passed and own > FAST_TIER_LIMIT_S and not tiered:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: its {report.when} took {own:.1f} s of CPU, over the fast tier's "
                           f"{FAST_TIER_LIMIT_S:g} s (LSURF_FAST_TIER_LIMIT_S): make it faster or mark its tier "
                           f"({', '.join(TIERS)})")


def _require_tier(what: str, *allowed: str) -> None:
    """A test that starts processes belongs to a slow tier: say so rather than slow the fast one down."""
    item = _running[0]
    if item is not None and not any(item.get_closest_marker(m) for m in allowed):
        pytest.fail(f"{item.nodeid} {what} but is not marked {' or '.join(allowed)}", pytrace=False)


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none"})
    env.setdefault("PYTHONPATH", str(REPO))
    env.update(extra or {})
    return env


def lsurf(*args, cwd=None, timeout=300, env=None, check=False, process=False):
    """The lsurf command, one process, with its status and text output: run in pytest's own process
    (:func:`inprocess.cli`, no interpreter start-up) unless ``process`` asks for a real
    ``python -m lsurf`` -- for what only a process shows: the interpreter's traceback, a closed
    pipe, signals, the thread count it starts with, a hang that ``timeout`` ends."""
    _require_tier("starts the lsurf command", "cli", "mpi", "system")
    if not process:
        return cli(*args, cwd=cwd, env=env, check=check)
    cmd = [sys.executable, "-m", "lsurf", *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def mpi_command(n: int, *args) -> list[str]:
    _require_tier("launches mpirun", "mpi", "system")
    return ["mpirun", "-n", str(n), "--oversubscribe", "--allow-run-as-root",
            sys.executable, "-m", "lsurf", *map(str, args)]


def mpirun(n: int, *args, cwd=None, timeout=300, env=None, check=False) -> subprocess.CompletedProcess:
    """``mpirun -n N python -m lsurf ARGS`` for real (Open MPI, oversubscribed, as root)."""
    cmd = mpi_command(n, *args)
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def torchrun_command(n: int, *args) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m lsurf ARGS``: N processes, no MPI."""
    _require_tier("launches torchrun", "mpi", "system")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "lsurf", *map(str, args)]


def torchrun(n: int, *args, timeout=300, env=None, check=False) -> subprocess.CompletedProcess:
    """:func:`torchrun_command` for real, one torch thread per process."""
    cmd = torchrun_command(n, *args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env({"OMP_NUM_THREADS": "1",
                                                                                        **(env or {})}))
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


def train_digits(out: Path, epochs: int, seed: int = 0) -> Path:
    """The digits CNN trained in this process, as ``lsurf train --model cnn --data digits --epochs
    EPOCHS --seed SEED --out-dir OUT`` trains it (checkpoints ``model_0.t7`` … ``model_EPOCHS.t7``):
    1.6 s, where the command took 6 s to start. One thread, as a job's rank runs; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model("cnn", (1, 8, 8), 10, seed=seed)
        train(model, load_data("digits", ("train", "test")), out, epochs=epochs, seed=seed, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """``digits_run(seed)``: the run directory of the digits CNN trained for 3 epochs from ``seed``,
    trained at its first use and shared by the whole session."""
    root = tmp_path_factory.mktemp("runs")
    runs: dict[int, Path] = {}

    def run(seed: int = 0) -> Path:
        if seed not in runs:
            runs[seed] = train_digits(root / f"s{seed}", 3, seed)
        return runs[seed]

    return run


@pytest.fixture(scope="session")
def digits_checkpoint(digits_run) -> Path:
    """The digits CNN after 2 of its 3 epochs (seed 0): trained, not converged."""
    return digits_run(0) / "model_2.t7"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A token corpus (train.bin, val.bin) for the language-model tests."""
    from lm_fixtures import write_tokens

    return write_tokens(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory, corpus) -> Path:
    """A tiny GPT-2 trained on ``corpus`` and saved with ``save_pretrained`` (needs lsurf[hf]), once a session."""
    pytest.importorskip("transformers")
    from lm_fixtures import tiny_gpt2

    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"), corpus)


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


class Batches(torch.utils.data.Dataset):
    """Batch k of a store (anything with ``len`` and ``read(start, stop)``) as one DataLoader item
    (``batch_size=None``), with the reading process's pid and that of the process which opened the
    store's file (``owner``: the attribute path of that pid, e.g. ``"_x._pid"``)."""

    def __init__(self, ds, batch: int, owner: str):
        self.ds, self.batch, self.owner = ds, batch, owner

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch)

    def __getitem__(self, k: int):
        x, y = self.ds.read(k * self.batch, (k + 1) * self.batch)
        opened_in = self.ds
        for name in self.owner.split("."):
            opened_in = getattr(opened_in, name)
        return x, y, os.getpid(), opened_in
