"""On-disk array stores (``hdf5:PATH``, ``npy:DIR``) as map-style Datasets read range by range.

HPC users keep training data as one HDF5 file (``/train/x``, ``/train/y``, ``/test/x``,
``/test/y``, chunked or not) or as ``.npy`` arrays (``DIR/{split}_x.npy``, ``DIR/{split}_y.npy``),
often larger than a node's memory. A store is therefore never loaded whole: each batch is one read
per array, and resident memory stays near one batch however large the file is.

- A range of rows is read straight into the array it is returned in (pinned host memory when it
  is bound for a GPU): ``.npy`` rows by one ``pread`` of the file, HDF5 rows by ``read_direct``.
  A streamed split is read this way in the evaluating process (:attr:`RowDataset.in_process`): a
  read costs a memcpy from the page cache, far less than passing the batch from a loader worker.
- Scattered ``.npy`` rows (a seeded subset) come from a read-only memory map. File-backed pages of
  a mapping count in the process's resident set and would pile up to the size of the file, so after
  copying rows out we drop the pages just read with ``madvise(MADV_DONTNEED)`` (they stay in the
  page cache, not in us).

The Datasets are used by DataLoader workers (fork, or spawn by pickling): each array opens its file
lazily in the process that reads it (a handle inherited through fork is never used) and pickles
without its handle. Every bad input is a :class:`~lsurf.errors.UserError` of one line that names
the spec and the file.
"""

from __future__ import annotations

import hashlib
import mmap
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lsurf.engine.io import atomic_write
from lsurf.errors import UserError

STORE_KINDS = ("hdf5", "npy")
SPLITS = ("train", "test")

_BUDGET = 16 << 20  # bytes a piece of a scattered read may span (HDF5) or touch (npy)
_MAX_POINTS = 1024  # indices in one h5py point selection: long lists are slow to build
_CHUNK_BYTES = 4 << 20  # largest HDF5 chunk save_store writes
_FINGERPRINT_ROWS = 64
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _one_line(e: BaseException) -> str:
    """Library messages may span lines; ours must not (the CLI prints one line per error)."""
    return " ".join(str(e).split()) or type(e).__name__


def _pieces(idx: np.ndarray, span_rows: int, max_count: int) -> Iterator[tuple[int, int]]:
    """Split sorted unique ``idx`` into runs ``idx[s:e]`` that span fewer than ``span_rows`` rows
    and hold at most ``max_count`` indices, so a scattered read is bounded piece by piece."""
    s = 0
    while s < len(idx):
        e = int(np.searchsorted(idx, idx[s] + span_rows, side="left"))
        e = max(s + 1, min(e, s + max_count))
        yield s, e
        s = e


class _Array:
    """One on-disk array of rows. The file is opened lazily, once per process: a handle inherited
    through fork shares state with the parent's, so a child opens its own, and pickling drops it."""

    filtered = False  # stored through filters (compression): a read costs more than a copy

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(int(n) for n in shape), np.dtype(dtype)
        self._handle: Any = None
        self._pid = -1

    @property
    def row_nbytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def handle(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def _open(self) -> Any:
        raise NotImplementedError

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` (in range) into ``out``, C-ordered and of the stored dtype."""
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        self.read_into(start, stop, out)
        return out

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted unique ``idx``."""
        raise NotImplementedError


def release_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drop bytes ``begin:end`` of a read-only mapping from our resident set (from the page that
    holds ``begin``): the page cache keeps them for the next read, and a pass over a file larger
    than memory does not grow the process."""
    begin -= begin % mmap.PAGESIZE
    if _MADV_DONTNEED is not None and end > begin:
        mm.madvise(_MADV_DONTNEED, begin, end - begin)


class _NpyArray(_Array):
    """An ``.npy`` array: ranges read with ``pread`` (no page of the file enters our resident set),
    scattered rows through a read-only memory map, its pages released after each read."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        super().__init__(path, shape, dtype)
        self.offset = offset

    def _open(self) -> tuple[Any, mmap.mmap]:
        f = open(self.path, "rb", buffering=0)  # noqa: SIM115  # held for the process's reads
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _view(self, mm: mmap.mmap) -> np.ndarray:
        return np.ndarray(self.shape, self.dtype, buffer=mm, offset=self.offset)

    def _release(self, mm: mmap.mmap, first: int, stop: int) -> None:
        release_pages(mm, self.offset + first * self.row_nbytes, self.offset + stop * self.row_nbytes)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """One ``pread`` (a few for reads over 2 GiB): the kernel copies from the page cache into ``out``."""
        if out.size == 0:
            return  # a view with a zero in its shape cannot be cast to bytes
        fd, buf = self.handle()[0].fileno(), out.data.cast("B")
        done, at = 0, self.offset + start * self.row_nbytes
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], at + done)
            if n == 0:
                raise UserError(f"{self.path} ended {at + done} bytes in: it was truncated since it was opened")
            done += n

    def take(self, idx: np.ndarray) -> np.ndarray:
        mm = self.handle()[1]
        view = self._view(mm)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        per_piece = max(1, _BUDGET // max(self.row_nbytes, mmap.PAGESIZE))
        for s, e in _pieces(idx, self.shape[0] + 1, per_piece):
            out[s:e] = view[idx[s:e]]  # touches only the pages of the rows asked for
            self._release(mm, int(idx[s]), int(idx[e - 1]) + 1)
        del view
        return out


def _h5_file(path: Path) -> Any:
    """Open read-only. ``best-effort`` locking: HPC file systems (Lustre, GPFS mounts) often have no
    flock, and HDF5's default then refuses to open at all."""
    import h5py

    version = h5py.version.hdf5_version_tuple
    if version >= (1, 12, 1) or (1, 10, 7) <= version < (1, 11):
        return h5py.File(path, "r", locking="best-effort")
    return h5py.File(path, "r")


class _H5Array(_Array):
    """A dataset of an HDF5 file; slices go straight from the file (or its chunks) into one array."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, filtered: bool = False):
        super().__init__(path, shape, dtype)
        self.key, self.filtered = key, filtered

    def _open(self) -> Any:
        f = _h5_file(self.path)
        return f, f[self.key]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        if stop > start:  # h5py refuses an empty selection
            self.handle()[1].read_direct(out, np.s_[start:stop])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Dense runs are read as their covering slice and picked from; sparse ones as an h5py point
        selection (increasing, as h5py requires). Either way a piece spans at most ``_BUDGET`` bytes."""
        ds = self.handle()[1]
        out = np.empty((len(idx), *self.shape[1:]), ds.dtype)
        span = max(1, _BUDGET // max(1, self.row_nbytes))
        for s, e in _pieces(idx, span, min(span, _MAX_POINTS)):
            piece = idx[s:e]
            a, b = int(piece[0]), int(piece[-1]) + 1
            if b - a == len(piece):
                out[s:e] = ds[a:b]
            elif b - a <= 4 * len(piece):
                out[s:e] = ds[a:b][piece - a]
            else:
                out[s:e] = ds[piece]
        return out


def _returned_dtype(dtype: np.dtype, is_y: bool) -> np.dtype:
    """Native byte order (torch has no other); integer labels as int64, which losses and indexing need."""
    if is_y and dtype.kind in "iu":
        return np.dtype(np.int64)
    return dtype.newbyteorder("=")


def _tensor(a: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a if a.dtype == dtype else a.astype(dtype)))


def empty_rows(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh tensor to read rows into and the numpy array that shares its memory: with ``pin`` in
    pinned host memory (a copy to a GPU then overlaps its compute; torch's host cache reuses it), else
    from numpy's plain ``malloc``. Not ``torch.empty``: its aligned blocks could not reuse the holes
    freed reads left between the small tensors the evaluator holds (labels, outputs), and under
    lsurf's malloc policy (runtime.set_malloc_policy) a pass over a store grew us by its size."""
    if pin:
        out = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        return out, out.numpy()
    a = np.empty(shape, dtype)
    return torch.from_numpy(a), a


def _read_rows(a: _Array, start: int, stop: int, dtype: np.dtype, pin: bool) -> torch.Tensor:
    """Rows ``start:stop`` of ``a`` as a tensor of ``dtype``: read straight into it when stored in
    that dtype, else read and converted (byte order, integer labels to int64)."""
    out, target = empty_rows((stop - start, *a.shape[1:]), dtype, pin)
    if a.dtype == dtype:
        a.read_into(start, stop, target)
    else:
        target[...] = a.read(start, stop)
    return out


class RowDataset(Dataset):
    """A map-style dataset read range by range (``read(start, stop, pin)``): one item is a one-row read.
    ``unit`` names a row in errors. ``in_process``: a range costs about a memcpy, so a streamed split
    is read in the evaluating process rather than passed from loader workers."""

    unit = "row"
    in_process = True

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start:stop`` (slice semantics), in pinned host memory with ``pin``."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.unit} {i} out of range for {n} {self.unit}s")
        x, y = self.read(i, i + 1)
        return x[0], y[0]


class ArrayDataset(RowDataset):
    """One split of a store: ``(x, y)`` rows as tensors, read range by range and never whole.

    ``read(start, stop)`` is one read per array (what a batch costs); ``read_rows(idx)`` reads a
    seeded subset piece by piece. ``x`` keeps its stored dtype (uint8 images stay uint8, floats stay
    as stored: the evaluator casts); integer ``y`` comes back as int64.
    """

    def __init__(self, kind: str, spec: str, split: str, x: _Array, y: _Array):
        self.kind, self.spec, self.split = kind, spec, split
        self._x, self._y = x, y
        self.in_process = not (x.filtered or y.filtered)  # decompressing chunks is work for loader workers
        self._x_dtype = _returned_dtype(x.dtype, is_y=False)
        self._y_dtype = _returned_dtype(y.dtype, is_y=True)

    def __repr__(self) -> str:
        shapes = f"x={self.x_shape} {self.x_dtype}, y={self.y_shape} {self.y_dtype}"
        return f"ArrayDataset({self.spec!r}, {self.split!r}, {shapes})"

    def __len__(self) -> int:
        return self._x.shape[0]

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The whole array's shape, rows first."""
        return self._x.shape

    @property
    def y_shape(self) -> tuple[int, ...]:
        return self._y.shape

    @property
    def x_dtype(self) -> np.dtype:
        """The dtype ``x`` tensors come back in (the stored one, in native byte order)."""
        return self._x_dtype

    @property
    def y_dtype(self) -> np.dtype:
        """The dtype ``y`` tensors come back in (int64 for any integer labels)."""
        return self._y_dtype

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one (x, y) row as returned: what memory planning multiplies by a batch size."""
        x_items = int(np.prod(self._x.shape[1:], dtype=np.int64))
        y_items = int(np.prod(self._y.shape[1:], dtype=np.int64))
        return x_items * self._x_dtype.itemsize + y_items * self._y_dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split as returned tensors (x and y together)."""
        return len(self) * self.sample_nbytes

    def read(self, start: int, stop: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start:stop`` (slice semantics), one read per array into the returned tensors."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        return (_read_rows(self._x, start, stop, self._x_dtype, pin),
                _read_rows(self._y, start, stop, self._y_dtype, pin))

    def read_rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at ``idx`` (a seeded subset: sorted, increasing; any order and repeats also work),
        read piece by piece so the temporary memory stays bounded whatever the indices span."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)})")
        uniq, inverse = np.unique(idx, return_inverse=True)
        x, y = self._x.take(uniq), self._y.take(uniq)
        if len(uniq) != len(idx) or not np.array_equal(uniq, idx):
            x, y = x[inverse], y[inverse]
        return _tensor(x, self._x_dtype), _tensor(y, self._y_dtype)

    def labels(self) -> torch.Tensor:
        """All of ``y`` (labels are small next to inputs): to count classes."""
        return _tensor(self._y.read(0, len(self)), self._y_dtype)

    def fingerprint(self) -> str:
        """A cheap identity for resume checks: SHA-256 over the kind, shapes, stored dtypes and the
        bytes of a fixed sample of rows (first, last and 64 evenly spaced ones) of x and y.

        It reads ~66 rows, not the gigabytes: it catches a different or regenerated store, but not a
        single flipped byte in a row it does not sample.
        """
        picks = np.unique(np.linspace(0, len(self) - 1, _FINGERPRINT_ROWS).round().astype(np.int64))
        h = hashlib.sha256()
        h.update(repr((self.kind, self._x.shape, self._x.dtype.str, self._y.shape, self._y.dtype.str)).encode())
        for a in (self._x, self._y):
            h.update(np.ascontiguousarray(a.take(picks)).tobytes())
        return h.hexdigest()


def _parse(spec: str) -> tuple[str, Path]:
    kind, sep, rest = spec.partition(":")
    if kind not in STORE_KINDS or not sep or not rest:
        raise UserError(f"data {spec!r}: expected hdf5:PATH or npy:DIR")
    return kind, Path(rest).expanduser()


def open_store(spec: str) -> dict[str, ArrayDataset]:
    """The splits (train and/or test) an ``hdf5:PATH`` or ``npy:DIR`` store holds, checked up front
    (layout, lengths, dtypes) so a bad store fails before any work starts, in one line."""
    kind, path = _parse(spec)
    if not path.exists():
        raise UserError(f"data {spec!r}: {path} does not exist")
    arrays = _hdf5_arrays(spec, path) if kind == "hdf5" else _npy_arrays(spec, path)
    out = {}
    for split, (x, y) in arrays.items():
        _check_pair(spec, split, x, y)
        out[split] = ArrayDataset(kind, spec, split, x, y)
    return out


def _check_dtype(spec: str, where: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise UserError(f"data {spec!r}: {where} has object dtype; store plain numbers")
    try:
        torch.from_numpy(np.zeros(0, dtype.newbyteorder("=")))
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"data {spec!r}: {where} has dtype {dtype}, which torch cannot hold") from None


def _check_pair(spec: str, split: str, x: _Array, y: _Array) -> None:
    """The checks both formats share: a row axis, equal lengths, some rows, 1-D/2-D targets, dtypes."""
    for name, a in (("x", x), ("y", y)):
        if len(a.shape) == 0:
            raise UserError(f"data {spec!r}: {split} {name} is a scalar; it needs a row axis")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"data {spec!r}: {split} x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise UserError(f"data {spec!r}: the {split} split is empty (0 rows)")
    if len(y.shape) not in (1, 2):
        raise UserError(f"data {spec!r}: {split} y has shape {y.shape}; it must be 1-D (labels) or 2-D (targets)")
    _check_dtype(spec, f"{split} x", x.dtype)
    _check_dtype(spec, f"{split} y", y.dtype)


def _hdf5_arrays(spec: str, path: Path) -> dict[str, tuple[_Array, _Array]]:
    import h5py

    if path.is_dir():
        raise UserError(f"data {spec!r}: {path} is a directory, not an HDF5 file")
    if not os.access(path, os.R_OK):
        raise UserError(f"data {spec!r}: cannot read {path} (permission denied)")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise UserError(f"data {spec!r}: cannot read {path} ({_one_line(e)})") from None
    if not is_hdf5:
        raise UserError(f"data {spec!r}: {path} is not an HDF5 file")
    try:
        with _h5_file(path) as f:
            found = {s: _h5_split(spec, path, f, s) for s in SPLITS if s in f}
    except OSError as e:
        raise UserError(f"data {spec!r}: cannot read {path} ({_one_line(e)})") from None
    if not found:
        raise UserError(f"data {spec!r}: {path} has no train or test group (expected /train/x, /train/y, ...)")
    return found


def _h5_split(spec: str, path: Path, f: Any, split: str) -> tuple[_Array, _Array]:
    """``/split/x`` and ``/split/y`` of an open file, each proven readable by reading its first row
    (a compression filter missing here fails now, not mid-run)."""
    import h5py

    group = f[split]
    if not isinstance(group, h5py.Group):
        raise UserError(f"data {spec!r}: {path}: /{split} is not a group (expected /{split}/x and /{split}/y)")
    arrays = []
    for name in ("x", "y"):
        ds = group.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise UserError(f"data {spec!r}: {path}: group /{split} has no dataset {name!r}")
        if ds.shape is None or len(ds.shape) == 0:
            raise UserError(f"data {spec!r}: {path}: /{split}/{name} is a scalar; it needs a row axis")
        if ds.shape[0] > 0:
            try:
                ds[0:1]
            except Exception as e:  # h5py raises OSError, TypeError, ... for unreadable data
                raise UserError(f"data {spec!r}: {path}: cannot read /{split}/{name} ({_one_line(e)})") from None
        filtered = ds.id.get_create_plist().get_nfilters() > 0
        arrays.append(_H5Array(path, ds.name, ds.shape, ds.dtype, filtered))
    return arrays[0], arrays[1]


def _npy_arrays(spec: str, path: Path) -> dict[str, tuple[_Array, _Array]]:
    if not path.is_dir():
        raise UserError(f"data {spec!r}: {path} is not a directory (npy:DIR reads DIR/train_x.npy, ...)")
    found: dict[str, tuple[_Array, _Array]] = {}
    for split in SPLITS:
        files = [path / f"{split}_{name}.npy" for name in ("x", "y")]
        present = [f.is_file() for f in files]
        if not any(present):
            continue
        if not all(present):
            missing, other = (files[1], files[0]) if present[0] else (files[0], files[1])
            raise UserError(f"data {spec!r}: {missing} is missing (found {other.name})")
        found[split] = (_npy_array(spec, files[0]), _npy_array(spec, files[1]))
    if not found:
        raise UserError(f"data {spec!r}: {path} has no train_x.npy/train_y.npy or test_x.npy/test_y.npy")
    return found


def _npy_array(spec: str, file: Path) -> _NpyArray:
    """Shape, dtype and data offset from the header (numpy's own parser), refusing what a memory
    map of C-ordered rows cannot serve: Fortran order, object arrays, a truncated file."""
    fmt = np.lib.format
    try:
        with open(file, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise UserError(f"data {spec!r}: {file}: .npy format version {version} is not supported (1.0, 2.0)")
            offset = f.tell()
    except UserError:
        raise
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
        raise UserError(f"data {spec!r}: {file}: not a valid .npy file ({_one_line(e)})") from None
    if fortran:
        raise UserError(f"data {spec!r}: {file}: Fortran-ordered array; save it C-ordered (np.ascontiguousarray)")
    if dtype.hasobject:
        raise UserError(f"data {spec!r}: {file}: object arrays (pickled Python objects) are not supported")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if file.stat().st_size < need:
        raise UserError(f"data {spec!r}: {file}: truncated ({file.stat().st_size} bytes, the header implies {need})")
    return _NpyArray(file, tuple(shape), dtype, offset)


def save_store(spec: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], chunk_rows: int = 1024) -> None:
    """Write ``{split: (x, y)}`` as an ``hdf5:PATH`` or ``npy:DIR`` store (fixtures, benchmarks,
    converting a data set). Arrays are copied ``chunk_rows`` at a time, so memory-mapped inputs
    larger than memory can be written; each file appears whole or not at all (temp file, rename)."""
    kind, path = _parse(spec)
    for split, (x, y) in splits.items():
        if split not in SPLITS:
            raise UserError(f"data {spec!r}: unknown split {split!r} (expected train and/or test)")
        if len(x) != len(y):
            raise UserError(f"data {spec!r}: {split} x has {len(x)} rows but y has {len(y)}")
    if chunk_rows < 1:
        raise UserError(f"`chunk_rows` {chunk_rows}: must be at least 1")
    if kind == "hdf5":
        _save_hdf5(path, splits, chunk_rows)
    else:
        _save_npy(path, splits)


def _save_hdf5(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], chunk_rows: int) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        for split, (x, y) in splits.items():
            group = f.create_group(split)
            _write_h5(group, "x", x, chunk_rows)
            _write_h5(group, "y", y, chunk_rows)


def _write_h5(group: Any, name: str, a: np.ndarray, chunk_rows: int) -> None:
    """Chunked along rows (a batch read then touches whole chunks), chunks capped at a few MiB."""
    row_nbytes = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize)
    rows = max(1, min(chunk_rows, len(a), _CHUNK_BYTES // row_nbytes))
    chunks = (rows, *a.shape[1:]) if a.size else None
    ds = group.create_dataset(name, shape=a.shape, dtype=a.dtype, chunks=chunks)
    for s in range(0, len(a), rows):
        ds[s : s + rows] = np.ascontiguousarray(a[s : s + rows])


def _save_npy(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for split, arrays in splits.items():
        for name, a in zip(("x", "y"), arrays):
            with atomic_write(path / f"{split}_{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(a))  # C order: the reader refuses Fortran order
