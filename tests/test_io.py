"""atomic_write: a file is replaced whole or not at all, and every lsurf writer goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lsurf
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError


def test_the_new_file_replaces_the_old_only_when_the_block_ends(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old" and tmp != path  # a reader meanwhile sees the old file whole
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(KeyError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise KeyError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_an_os_error_is_one_line_naming_the_file_and_parameter(tmp_path):
    missing = tmp_path / "no" / "f.txt"
    with pytest.raises(UserError, match=r"^cannot write `out` '.*/no/f\.txt': No such file or directory$"), \
            atomic_write(missing, "out") as tmp:
        tmp.write_text("x")


def test_every_writer_in_lsurf_goes_through_atomic_write():
    """A file written in place (``open(path, 'w')``, ``h5py.File(path, 'w')``, ``torch.save``, a
    rename of its own) is half a file after a crash: each writes a ``tmp`` that atomic_write gave."""
    root = Path(lsurf.__file__).parent
    writes = re.compile(r"""(open|File)\((?P<target>\w+), ["']w"""
                        r"""|torch\.save\([^,]+, (?P<saved>\w+)\)|savefig\((?P<fig>\w+)""")
    found = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in writes.finditer(text):
            found.append((path.name, m.group("target") or m.group("saved") or m.group("fig")))
        assert path.name == "io.py" or ("os.replace" not in text and ".tmp\"" not in text), path
    assert len(found) >= 10 and all(target == "tmp" for _, target in found), found
