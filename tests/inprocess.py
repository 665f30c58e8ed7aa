"""Run the ``lsurf`` command in this process: ``main(argv)`` with its output captured.

An interpreter start-up that imports torch costs seconds; a wrong invocation costs milliseconds.
Where a test checks what the command says and does (exit status, output, files) and not the
process around it, ``cli(...)`` gives the same answer as conftest's subprocess ``lsurf(...)``:

- as ``python -m lsurf`` does, the working directory is on ``sys.path`` (plug-ins next to a job);
- one process, by construction: ``LSURF_MPI=0`` for the call, so no communicator is ever made
  (hence no ``MPI_Abort``, which would end pytest), whatever launcher variables this process has;
- stdout and stderr are captured at the Python level and at the file-descriptor level (what a C
  library prints), warnings are shown as a fresh interpreter shows them, and garbage is collected
  afterwards, as the exit of a process would (an HDF5 file left open is flushed and closed before
  the test looks at it);
- what an entry point changes for the whole process is put back afterwards, so later tests do not
  depend on this one: the working directory, environment, torch's thread count, float32 precision
  flags, default dtype and CUDA device, the global random states of torch, numpy and ``random``,
  warnings filters, ``sys.path``, ``sys.excepthook``, interrupt handlers, and the modules imported
  from outside the installed packages (a plug-in file of the same name in another test is imported
  afresh). Not restorable, and left as it is: glibc's malloc tuning (``set_malloc_policy``).

What needs a real process stays a subprocess test (``@pytest.mark.cli``): ``--debug``'s traceback
(printed by the interpreter), a reader that closes the pipe, real MPI.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import os
import random
import signal
import site
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lsurf
from lsurf.cli.main import main

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` would return."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def cli(*args: Any, cwd: str | os.PathLike | None = None, env: dict | None = None, check: bool = False) -> Result:
    """``lsurf ARGS`` in this process (``python -m lsurf ARGS`` run in ``cwd``, with ``env`` added to the
    environment: its ``PYTHONPATH`` goes on ``sys.path``), output captured; with ``check``, a status
    other than 0 fails the test with what the command printed."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _process_state_restored(), _fd_captured(1) as fd_out, _fd_captured(2) as fd_err:
        os.chdir(cwd if cwd is not None else os.getcwd())
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        sys.path[:0] = [os.getcwd(), *filter(None, (env or {}).get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["LSURF_MPI"] = "0"
        importlib.invalidate_caches()  # a plug-in written a moment ago is found
        with _fresh_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors, --help, --version
                code = _exit_status(e)
            finally:
                gc.collect()
    result = Result(argv, code, out.getvalue() + fd_out.getvalue(), err.getvalue() + fd_err.getvalue())
    if check and code != 0:
        raise AssertionError(f"lsurf {' '.join(argv)} -> {code}\n{result.stdout}\n{result.stderr}")
    return result


def _exit_status(e: SystemExit) -> int:
    """The status ``sys.exit(e.code)`` gives a process (a message is printed and gives 1)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _fresh_warnings() -> Iterator[None]:
    """Warnings filtered and printed to ``sys.stderr`` as in a fresh interpreter (pytest records them
    instead), each shown again even if an earlier call showed it (changing the filters resets that)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()  # then a fresh interpreter's filters (no -W), the first added last
        for ignored in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=ignored)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = _show_warning
        yield


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """The stdlib's printer, which pytest's recorder would stand in for."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _fd_captured(fd: int) -> Iterator[io.StringIO]:
    """What is written to file descriptor ``fd`` meanwhile (C libraries write there, not to sys.stdout)."""
    captured = io.StringIO()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), fd)
        try:
            yield captured
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.__stdout__.flush() if fd == 1 else sys.__stderr__.flush()  # type: ignore[union-attr]
            os.dup2(saved, fd)
            os.close(saved)
            f.seek(0)
            captured.write(f.read().decode(errors="replace"))


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Whatever the call changes of this process's global state is put back afterwards."""
    cwd, environ, path, modules = os.getcwd(), dict(os.environ), list(sys.path), set(sys.modules)
    threads, dtype, precision = torch.get_num_threads(), torch.get_default_dtype(), _precision()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    hook, handlers = sys.excepthook, {s: signal.getsignal(s) for s in _INTERRUPTS}
    try:
        yield
    finally:
        os.chdir(cwd)
        for name in set(os.environ) - set(environ):
            del os.environ[name]
        os.environ.update(environ)
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if _outside_installed(sys.modules[name]):
                del sys.modules[name]
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        _set_precision(precision)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if cuda is not None:
            torch.cuda.set_device(cuda)
        sys.excepthook = hook
        for s, handler in handlers.items():
            signal.signal(s, handler)


# Where torch keeps float32 precision, parents before children (setting a parent sets its children).
_PRECISION_KNOBS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                    "mkldnn.conv", "mkldnn.rnn")


def _knob(path: str) -> Any:
    obj: Any = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _precision() -> dict[str, Any]:
    """torch's float32 precision settings, old API and new (the old one's getters refuse a state the
    two APIs set inconsistently: then only the new one's values are kept)."""
    state: dict[str, Any] = {k: _knob(k).fp32_precision for k in _PRECISION_KNOBS}
    state["matmul_precision"] = torch.get_float32_matmul_precision()
    with contextlib.suppress(RuntimeError):
        state["legacy"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    return state


def _set_precision(state: dict[str, Any]) -> None:
    """Old API first, then the new one, which overrides per backend and operation."""
    if "legacy" in state:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state["legacy"]
    torch.set_float32_matmul_precision(state["matmul_precision"])
    for k in _PRECISION_KNOBS:
        _knob(k).fp32_precision = state[k]


def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    roots += [*site.getsitepackages(), site.getusersitepackages(), str(Path(lsurf.__file__).parent)]
    return tuple(Path(r).resolve() for r in roots)


_ROOTS = _installed_roots()


def _outside_installed(module: Any) -> bool:
    """A module imported from somewhere other than the standard library, site-packages or lsurf:
    a plug-in (a built-in or frozen module has no location and stays)."""
    spec = getattr(module, "__spec__", None)
    where = [spec.origin] if spec is not None and spec.has_location else []
    where += list(getattr(spec, "submodule_search_locations", None) or [])
    return any(not any(Path(w).resolve().is_relative_to(r) for r in _ROOTS) for w in where if w)
