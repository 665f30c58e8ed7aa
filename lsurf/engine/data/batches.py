"""How a split reaches the device at every grid point: resident (moved and cut into batches once,
the hot loop indexes a list) or streamed, read afresh at every pass:

- host tensors and lsurf's own stores and token files are read in the evaluating process, several
  batches per read (``READ_BYTES``) into pinned memory on a GPU, and cut into batches by slicing: a
  read costs about a memcpy, while passing a batch from a loader worker cost as much as a small
  model's forward (the digits CNN streamed that way ran at 2x its resident cost). On a GPU the
  next read overlaps the queued kernels, as the evaluator synchronises once per pass;
- plug-in Datasets (whose items may take real work: decoding, augmenting) and filtered (compressed)
  HDF5 stores are read by a DataLoader's ``workers``, kept across points, one batch per item;
- streams of batches (iterable Datasets, DataLoader factories) are read as they come.

Both read the same rows in the same batches in the same order, so they give the same numbers; a
rank of a group (``shard`` = (r, G)) takes the r-th of G contiguous row ranges of every split.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from lsurf.engine.data.splits import AnySplit, BatchStreamSplit, Split
from lsurf.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
Residency = Literal["auto", "always", "never"]
PREFETCH = 2  # batches each loader worker reads ahead
READ_BYTES = 4 << 20  # an in-process read takes whole batches up to this size, so its fixed cost is amortised


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype,
              channels_last: bool = False) -> Batch:
    """A batch on ``device``: floating tensors in ``dtype``, token ids as they are, integer targets
    as int64 (what cross-entropy and ``gather`` index with; int32 labels are common on disk)."""
    nb = device.type == "cuda"  # from pinned memory the copy overlaps the previous batch's compute
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype, non_blocking=nb)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else torch.int64, non_blocking=nb)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def shard_range(n: int, shard: tuple[int, int], unit: int = 1) -> tuple[int, int]:
    """Rows [start, stop) of rank r of G: contiguous, in runs of ``unit`` rows whose counts differ by
    at most one. Unit 1 balances rows; a batch size deals the one process's batches out whole, which
    a pass in train mode needs (BatchNorm's statistics are per batch) to see the same batches on any
    number of ranks."""
    r, g = shard
    units = -(-n // unit)
    return min(n, r * units // g * unit), min(n, (r + 1) * units // g * unit)


def resident_batches(split: AnySplit, batch_size: int, device: torch.device, dtype: torch.dtype,
                     channels_last: bool = False, shard: tuple[int, int] = (0, 1),
                     whole_batches: bool = False) -> list[Batch]:
    """This rank's rows of the split on ``device`` once, cut into ``batch_size`` samples (with
    ``whole_batches``, the rank's rows are whole batches of the one process's: :func:`shard_range`)."""
    if isinstance(split, BatchStreamSplit):
        return list(Streamed(split, batch_size, device, dtype, channels_last, shard=shard))
    start, stop = shard_range(len(split), shard, batch_size if whole_batches else 1)
    x, y = (split.x[start:stop], split.y[start:stop]) if isinstance(split, Split) else _read(split, start, stop)
    if channels_last and x.dim() == 4:
        x = _channels_last_on(device, x, dtype)
    x, y = to_device(x, y, device, dtype)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _channels_last_on(device: torch.device, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` on ``device`` in ``dtype`` and channels-last, converted on the host a slice at a time
    and copied into place: the device holds the split once (converting it there would hold the
    NCHW copy beside the NHWC one), the host one slice beyond it. A batch cut from it is a view,
    channels-last itself."""
    want = dtype if x.is_floating_point() else x.dtype
    out = torch.empty(x.shape, dtype=want, device=device, memory_format=torch.channels_last)
    step = max(1, (64 << 20) // max(1, x[0].numel() * out.element_size()))  # 64 MiB a slice
    for i in range(0, len(x), step):
        out[i : i + step].copy_(x[i : i + step].to(want).contiguous(memory_format=torch.channels_last))
    return out


def _read(split: AnySplit, start: int, stop: int) -> Batch:
    step = 4096  # a reader's rows at a time, so the host holds the split once, not twice
    parts = [split.rows(i, min(i + step, stop)) for i in range(start, stop, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class _BatchView(Dataset):
    """Item k: the k-th batch of rows [start, stop), read in one call (one read per store array)."""

    def __init__(self, split: AnySplit, batch_size: int, start: int, stop: int):
        self.split, self.batch_size, self.start, self.stop = split, batch_size, start, stop

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __getitem__(self, k: int) -> Batch:
        a = self.start + k * self.batch_size
        return self.split.rows(a, min(a + self.batch_size, self.stop))


def in_process(split: AnySplit) -> bool:
    """Whether a streamed split is read in the evaluating process (see the module's docstring)."""
    return not isinstance(split, BatchStreamSplit) and split.in_process


def read_unit(split: AnySplit, batch_size: int, dtype: torch.dtype) -> int:
    """Batches per in-process read: as many as fit ``READ_BYTES``, at least one."""
    return max(1, READ_BYTES // batch_bytes(split, batch_size, dtype))


class Streamed:
    """A split's batches read afresh at every pass, in order: in this process (:func:`in_process`),
    ``read_unit`` batches per read, or by ``workers`` loader processes that persist across points (0:
    the loader reads in this process). A stream of batches (an iterable Dataset, a DataLoader factory)
    is read as it comes; rank r of a group keeps every G-th batch of it (whole batches of the one
    process's, as ``whole_batches`` asks of the others)."""

    def __init__(self, split: AnySplit, batch_size: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, workers: int = 0, shard: tuple[int, int] = (0, 1),
                 whole_batches: bool = False):
        self.split, self.batch_size, self.shard = split, batch_size, shard
        self.pin = device.type == "cuda"
        self.convert = lambda x, y: to_device(x, y, device, dtype, channels_last)
        self.loader: DataLoader | None = None
        self.unit = 0  # batches per in-process read (0: not read in process)
        if isinstance(split, BatchStreamSplit):
            return
        self.start, self.stop = shard_range(len(split), shard, batch_size if whole_batches else 1)
        if in_process(split):
            self.unit = read_unit(split, batch_size, dtype)
        else:
            view = _BatchView(split, batch_size, self.start, self.stop)
            self.loader = DataLoader(view, batch_size=None, num_workers=workers, pin_memory=self.pin,
                                     prefetch_factor=PREFETCH if workers else None, persistent_workers=workers > 0)

    def __iter__(self) -> Iterator[Batch]:
        if self.unit:
            return self._sliced()
        if self.loader is not None:
            return (self.convert(x, y) for x, y in self.loader)
        assert isinstance(self.split, BatchStreamSplit)  # no loader only for a stream of batches
        r, g = self.shard
        mine = itertools.islice(self.split.batches(self.batch_size), r, None, g)
        return (self.convert(x, y) for x, y in mine)

    def _sliced(self) -> Iterator[Batch]:
        """This rank's rows read ``unit`` batches at a time and cut as the resident path cuts them:
        at ``start + k * batch_size``, the same batches in the same order."""
        assert not isinstance(self.split, BatchStreamSplit)
        step, b = self.unit * self.batch_size, self.batch_size
        for a in range(self.start, self.stop, step):
            x, y = self.split.rows(a, min(a + step, self.stop), pin=self.pin)
            for i in range(0, len(x), b):
                yield self.convert(x[i : i + b], y[i : i + b])

    def __len__(self) -> int:
        """Batches per pass (a stream of batches: counted once)."""
        if not isinstance(self.split, BatchStreamSplit):
            return -(-(self.stop - self.start) // self.batch_size)
        if not hasattr(self, "_count"):
            self._count = sum(1 for _ in self)
        return self._count


class Padded:
    """A stream's batches, then ``count`` in all with empty ones (see :func:`equal_batches`)."""

    def __init__(self, feed: Streamed | Padded, count: int, empty: Batch):
        self.feed, self.count, self.empty = feed, count, empty

    def __iter__(self) -> Iterator[Batch]:
        yield from self.feed
        yield from [self.empty] * (self.count - len(self.feed))

    def __len__(self) -> int:
        return self.count


Feed = Sequence[Batch] | Streamed | Padded


def head(feed: Feed, n: int) -> list[Batch]:
    """The first ``n`` batches of a feed, resident (for calibration and probes)."""
    return list(feed[:n]) if isinstance(feed, Sequence) else list(itertools.islice(feed, n))


def host_budget(local_ranks: int) -> int:
    """Half the host memory the kernel says is available, shared by the ranks on this node."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // 2 // max(local_ranks, 1)


def device_budget(device: torch.device, local_ranks: int) -> int:
    """Half the free memory of this rank's device (a GPU is one rank's; host memory is shared)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return host_budget(local_ranks)


def split_bytes(split: AnySplit, dtype: torch.dtype, shard: tuple[int, int] = (0, 1)) -> int | None:
    """Bytes this rank's rows take on the device in ``dtype`` (None: a stream of unknown length)."""
    if isinstance(split, BatchStreamSplit):
        return None
    x, y = split.rows(0, 1)
    item = dtype.itemsize if x.is_floating_point() else x.element_size()
    start, stop = shard_range(len(split), shard)
    return (stop - start) * (x.numel() * item + y.nbytes)


def batch_bytes(split: AnySplit, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of one batch of the split on the device in ``dtype``."""
    x, y = split.rows(0, 1)
    return batch_size * (x.numel() * (dtype.itemsize if x.is_floating_point() else x.element_size()) + y.nbytes)


def stream_batches(split: AnySplit, batch_size: int, workers: int, dtype: torch.dtype) -> int:
    """Batches a stream holds at most at a time: an in-process read unit, or each worker's prefetch,
    and the two batches being moved and evaluated."""
    return (read_unit(split, batch_size, dtype) if in_process(split) else workers * PREFETCH) + 2


def keep_resident(split: AnySplit, name: str, mode: Residency, budget: int, batch_size: int, workers: int,
                  dtype: torch.dtype, shard: tuple[int, int] = (0, 1)) -> bool:
    """Whether a split is held on the device (True) or streamed: ``always``/``never`` as asked,
    ``auto`` when this rank's rows fit ``budget`` bytes. A budget smaller than what the stream holds
    at a time (:func:`stream_batches`) is refused rather than overrun."""
    size = split_bytes(split, dtype, shard)
    if mode == "always":
        return True
    one = batch_bytes(split, batch_size, dtype)
    held = stream_batches(split, batch_size, workers, dtype)
    if mode == "auto" and size is not None and size <= budget:
        return True
    if held * one > budget:
        raise UserError(f"`memory_budget` {size_text(budget)} cannot hold the {name} split's stream "
                        f"({held} batches of {size_text(one)}): raise it or lower `batch_size`")
    return False


def size_text(n: float) -> str:
    """``n`` bytes for people: 4.0 KiB, 64.0 MiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def equal_batches(feed: Feed, split: AnySplit, batch_size: int, shard: tuple[int, int],
                  device: torch.device, dtype: torch.dtype, whole_batches: bool = False) -> Feed:
    """This rank's batches (held or streamed), then empty ones up to the most any rank of the group
    has: a sharded forward is collective, so every rank runs as many."""
    _, parts = shard
    if isinstance(split, BatchStreamSplit):
        raise UserError("`shard` fsdp needs splits of known length: not a stream of batches")
    unit = batch_size if whole_batches else 1
    most = max(-(-(stop - start) // batch_size) for start, stop in (shard_range(len(split), (r, parts), unit)
                                                                   for r in range(parts)))
    if len(feed) == most:
        return feed
    x, y = to_device(*split.rows(0, 1), device, dtype)
    if isinstance(feed, Sequence):
        return list(feed) + [(x[:0], y[:0])] * (most - len(feed))
    return Padded(feed, most, (x[:0], y[:0]))
