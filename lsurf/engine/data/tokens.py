"""Flat token files (``tokens:PATH[:uint16|uint32]``) cut into next-token windows, read range by range.

Language-model pipelines in the nanoGPT and Megatron style tokenize a corpus once into a raw binary
array of token ids (uint16 while the vocabulary fits, else uint32; no header) that is often far larger
than a node's memory. ``tokens:DIR`` reads nanoGPT's ``DIR/train.bin`` and ``DIR/val.bin`` (or
``DIR/test.bin``) as the train and test splits; ``tokens:FILE`` reads one file as the train split.

Window ``i`` of a split is ``tokens[i*T : i*T + T + 1]`` for ``T = seq_len``: windows do not overlap
(a loss surface wants every token counted once), the input is the window less its last token and
the target the window less its first. ``len = (n_tokens - 1) // T``; a short tail is left out.

As with the ``.npy`` stores (:mod:`lsurf.engine.data.stores`), the file is a read-only memory map opened
lazily once per process (DataLoader workers, fork or spawn, open their own; pickling drops it), and
the pages a read touched are dropped from our resident set with ``madvise(MADV_DONTNEED)`` after the
rows are copied out, so resident memory stays near one batch however large the file is. Every bad
input is a one-line :class:`~lsurf.errors.UserError` that names the spec and the file.
"""

from __future__ import annotations

import hashlib
import mmap
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsurf.engine.data.stores import RowDataset, _one_line, _pieces, empty_rows, release_pages
from lsurf.errors import UserError

TOKEN_DTYPES = ("uint16", "uint32")

_BUDGET = 16 << 20  # bytes one piece of a scattered read may touch in the mapping
_SCAN_BYTES = 4 << 20  # bytes max_token reads (and releases) at a time
_FINGERPRINT_WINDOWS = 64
_TEST_NAMES = ("val.bin", "test.bin")  # nanoGPT's name first: it wins when both exist


class TokenWindows(RowDataset):
    """One split of a token file as ``(x, y)`` windows of ``seq_len`` int64 token ids each.

    ``read(start, stop)`` is one contiguous read of the mapping (what a batch costs);
    ``read_rows(idx)`` gathers a seeded subset of windows piece by piece, bounded in memory.
    """

    unit = "window"

    def __init__(self, spec: str, split: str, path: Path, dtype: str, seq_len: int, n_tokens: int):
        self.spec, self.split, self.path = spec, split, path
        self.dtype = np.dtype(dtype).newbyteorder("<")  # the pipelines write little-endian ids
        self.seq_len, self.n_tokens = int(seq_len), int(n_tokens)
        self._handle: mmap.mmap | None = None
        self._pid = -1
        self._max_token: int | None = None

    def __repr__(self) -> str:
        return (f"TokenWindows({self.spec!r}, {self.split!r}, {self.n_tokens} {self.dtype.name} tokens, "
                f"seq_len={self.seq_len}, {len(self)} windows)")

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    @property
    def file_nbytes(self) -> int:
        return self.n_tokens * self.dtype.itemsize

    def __getstate__(self) -> dict[str, Any]:
        """A mapping cannot be pickled, and one inherited through fork is not ours: drop it."""
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def _mapping(self) -> mmap.mmap:
        """The file's read-only map, opened on first use in each process (DataLoader workers too)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def _open(self) -> mmap.mmap:
        """Map the file, refusing one that shrank since it was opened (reading past its end would
        kill the process with SIGBUS instead of raising)."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.file_nbytes:
                    raise UserError(f"data {self.spec!r}: {self.path} shrank to {size} bytes since it was opened "
                                    f"({self.file_nbytes} expected)")
                return mmap.mmap(f.fileno(), self.file_nbytes, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UserError(f"data {self.spec!r}: cannot read {self.path} ({_one_line(e)})") from None

    def _tokens(self, mm: mmap.mmap) -> np.ndarray:
        return np.ndarray((self.n_tokens,), self.dtype, buffer=mm)

    def _release(self, mm: mmap.mmap, first: int, stop: int) -> None:
        release_pages(mm, first * self.dtype.itemsize, stop * self.dtype.itemsize)  # tokens first:stop

    def read(self, start: int, stop: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``start:stop`` (slice semantics): one contiguous read of ``n * T + 1`` tokens, as
        consecutive windows share their boundary token; in pinned host memory with ``pin``."""
        start, stop, _ = slice(start, stop).indices(len(self))
        n, t = max(0, stop - start), self.seq_len
        if n == 0:
            return torch.empty((0, t), dtype=torch.int64), torch.empty((0, t), dtype=torch.int64)
        mm = self._mapping()
        first, end = start * t, stop * t + 1
        view = self._tokens(mm)
        raw = np.array(view[first:end])
        del view  # no buffer export outlives the read
        self._release(mm, first, end)
        (x, xs), (y, ys) = (empty_rows((n, t), np.dtype(np.int64), pin) for _ in range(2))
        xs[...], ys[...] = raw[:-1].reshape(n, t), raw[1:].reshape(n, t)
        return x, y

    def read_rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at ``idx`` (a seeded subset: sorted and increasing; any order and repeats also work)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window indices must lie in [0, {len(self)})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = self._gather(uniq)
        if len(uniq) != len(idx) or not np.array_equal(uniq, idx):
            out = out[inverse.reshape(-1)]
        return _int64(out[:, :-1]), _int64(out[:, 1:])

    def _gather(self, uniq: np.ndarray) -> np.ndarray:
        """Whole windows (``T + 1`` stored tokens each) at sorted unique ``uniq``, fancy-indexed from a
        strided ``(windows, T + 1)`` view of the mapping piece by piece, so the pages touched between
        two releases stay within ``_BUDGET`` whatever the indices span."""
        n, t, size = len(self), self.seq_len, self.dtype.itemsize
        out = np.empty((len(uniq), t + 1), self.dtype)
        if not len(uniq):
            return out
        mm = self._mapping()
        flat = self._tokens(mm)
        windows = np.lib.stride_tricks.as_strided(flat, (n, t + 1), (t * size, size), writeable=False)
        per_piece = max(1, _BUDGET // max((t + 1) * size, mmap.PAGESIZE))
        for s, e in _pieces(uniq, n + 1, per_piece):
            out[s:e] = windows[uniq[s:e]]  # touches only the pages of the windows asked for
            self._release(mm, int(uniq[s]) * t, int(uniq[e - 1]) * t + t + 1)
        del windows, flat  # no buffer export outlives the read
        return out

    def fingerprint(self) -> str:
        """A cheap identity for resume checks: SHA-256 over the dtype, ``seq_len``, token count and
        file size, and the stored bytes of ~64 windows spread evenly over the file (first and last
        included).

        It reads a few hundred KB, not the gigabytes: it catches a different or re-tokenized corpus,
        but not a single changed token in a window it does not sample.
        """
        picks = np.unique(np.linspace(0, len(self) - 1, _FINGERPRINT_WINDOWS).round().astype(np.int64))
        h = hashlib.sha256()
        h.update(repr((self.dtype.str, self.seq_len, self.n_tokens, self.file_nbytes)).encode())
        h.update(np.ascontiguousarray(self._gather(picks)).tobytes())
        return h.hexdigest()

    def max_token(self) -> int:
        """The largest token id in the file (a model whose vocabulary is smaller would index past its
        embedding), scanned ``_SCAN_BYTES`` at a time with each chunk's pages released; cached."""
        if self._max_token is None:
            mm = self._mapping()
            view = self._tokens(mm)
            step = max(1, _SCAN_BYTES // self.dtype.itemsize)
            best = 0
            for s in range(0, self.n_tokens, step):
                e = min(self.n_tokens, s + step)
                best = max(best, int(view[s:e].max()))
                self._release(mm, s, e)
            del view
            self._max_token = best
        return self._max_token


def _int64(a: np.ndarray) -> torch.Tensor:
    """A fresh C-ordered int64 tensor (embedding lookups and cross-entropy targets want int64)."""
    return torch.from_numpy(a.astype(np.int64, order="C"))


def _parse(spec: str) -> tuple[Path, str]:
    """``tokens:PATH[:DTYPE]``: the last ``:``-part is a dtype only when it names one, so a path
    with colons in it still works."""
    kind, sep, rest = spec.partition(":")
    if kind != "tokens" or not sep or not rest:
        raise UserError(f"data {spec!r}: expected tokens:PATH or tokens:PATH:uint16|uint32")
    head, sep, last = rest.rpartition(":")
    if sep and last in TOKEN_DTYPES:
        if not head:
            raise UserError(f"data {spec!r}: no path before :{last} (expected tokens:PATH:{last})")
        return Path(head).expanduser(), last
    return Path(rest).expanduser(), TOKEN_DTYPES[0]


def _check_seq_len(spec: str, seq_len: Any) -> int:
    if seq_len is None:
        raise UserError(f"data {spec!r} needs `seq_len` (the window length in tokens)")
    try:
        value = operator.index(seq_len)
    except TypeError:
        value = None
    if value is None or isinstance(seq_len, bool):
        raise UserError(f"data {spec!r}: `seq_len` {seq_len!r} must be a whole number of tokens")
    if value < 1:
        raise UserError(f"data {spec!r}: `seq_len` {seq_len!r} must be at least 1")
    return value


def _split_files(spec: str, path: Path) -> dict[str, Path]:
    """The files behind each split: a directory's nanoGPT names, or one file as the train split."""
    if not path.exists():
        raise UserError(f"data {spec!r}: {path} does not exist")
    if not path.is_dir():
        return {"train": path}
    found = {}
    if (path / "train.bin").is_file():
        found["train"] = path / "train.bin"
    test = next((path / name for name in _TEST_NAMES if (path / name).is_file()), None)
    if test is not None:
        found["test"] = test
    if not found:
        raise UserError(f"data {spec!r}: {path} has no train.bin, val.bin or test.bin")
    return found


def _count_tokens(spec: str, file: Path, dtype: str) -> int:
    """Tokens in ``file``, refusing what cannot be a token array of ``dtype``."""
    itemsize = np.dtype(dtype).itemsize
    if not file.is_file():
        raise UserError(f"data {spec!r}: {file} is not a regular file")
    if not os.access(file, os.R_OK):
        raise UserError(f"data {spec!r}: cannot read {file} (permission denied)")
    size = file.stat().st_size
    if size % itemsize:
        raise UserError(f"data {spec!r}: {file} is {size} bytes, not a whole number of {dtype} tokens "
                        f"({itemsize} bytes each)")
    n = size // itemsize
    if n < 2:
        raise UserError(f"data {spec!r}: {file} holds {n} {dtype} token{'s' * (n != 1)}; it needs at least 2 "
                        "(an input and its next-token target)")
    return n


def open_tokens(spec: str, seq_len: int | None) -> dict[str, TokenWindows]:
    """The splits (train and/or test, those whose files exist) of a ``tokens:...`` spec, as windows
    of ``seq_len`` tokens, checked up front (files, sizes, ``seq_len``) without mapping a byte, so a
    bad spec fails before any work starts, in one line."""
    path, dtype = _parse(spec)
    t = _check_seq_len(spec, seq_len)
    out = {}
    try:
        files = _split_files(spec, path)
        counts = {split: _count_tokens(spec, file, dtype) for split, file in files.items()}
    except OSError as e:  # stat of an unreadable directory, a broken mount, ...
        raise UserError(f"data {spec!r}: cannot read {path} ({_one_line(e)})") from None
    for split, file in files.items():
        n = counts[split]
        if n - 1 < t:
            raise UserError(f"`seq_len` {t} is longer than the {split} split of {spec!r} ({n} tokens in {file}; "
                            f"a window takes `seq_len` + 1)")
        out[split] = TokenWindows(spec, split, file, dtype, t, n)
    return out
