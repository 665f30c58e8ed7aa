"""Files written whole or not at all: every file lsurf makes goes through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

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
