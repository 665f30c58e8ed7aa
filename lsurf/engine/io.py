"""What touches files and users' code: files written whole or not at all (every file lsurf makes goes
through :func:`atomic_write`), file hashes, and plug-ins (``pkg.module:callable``) loaded and called
so that whatever they raise is one line."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lsurf.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | Path, name: str | None = None) -> Iterator[Path]:
    """Yield ``PATH.tmp`` to write; when the block ends it is renamed onto ``path``, so a reader or a
    crash sees the old file or the new one, never half of one. On any failure the temporary file
    goes and ``path`` is as it was; an ``OSError`` (full disk, no permission) becomes one
    :class:`UserError` naming the file (and the parameter ``name`` that gave it, if any)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {f'`{name}` ' if name else ''}{str(path)!r}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read a MiB at a time (checkpoints are recorded and checked by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_plugin(spec: str, what: str) -> Callable:
    """Import ``pkg.module:name`` and return the attribute, with a clear error for each way it can fail."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} plug-in {spec!r}: expected pkg.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own import-time error
        raise UserError(f"{what} plug-in {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{what} plug-in {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def make_plugin(spec: str, what: str, *args: Any) -> Any:
    """What the factory ``pkg.module:factory`` returns when called with ``args``; its failure is one line."""
    return call_plugin(f"{what} plug-in {spec!r}", "", lambda: load_plugin(spec, what)(*args))


def call_plugin(who: str, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, a user's code: whatever it raises is one line, ``{who}: {what} raised ...``."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{who}{': ' + what if what else ''} raised {type(e).__name__}: {e}") from None
