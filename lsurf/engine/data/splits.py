"""Data sets by spec (``digits``, ``cifar10:PATH``, ``synthetic:...``, ``hdf5:PATH``, ``npy:DIR``,
``pkg.module:factory``), as splits of three kinds that answer the same questions (length, a range
of rows, a fingerprint):

- :class:`Split`: whole tensors in host memory (the small built-in sets);
- :class:`DatasetSplit`: a map-style Dataset read range by range, never whole unless asked (the
  on-disk stores, and plug-in Datasets), so a split larger than memory can be streamed;
- :class:`BatchStreamSplit`: batches from an iterable Dataset or a plug-in's DataLoader factory.

How a split reaches the device at every grid point (resident or streamed) is lsurf.engine.data.batches'.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsurf.engine.data.stores import STORE_KINDS, RowDataset, open_store
from lsurf.engine.data.tokens import open_tokens
from lsurf.engine.io import load_plugin
from lsurf.errors import UserError

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
SPLITS = ("train", "test")


@dataclass
class Split:
    """One split as whole tensors on the CPU: inputs ``x`` (N, ...) and targets ``y`` (N,) or (N, k)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.y)

    @property
    def num_outputs(self) -> int:
        if self.is_classification:
            return int(self.y.max().item()) + 1 if len(self.y) else 1
        return 1 if self.y.dim() == 1 else int(self.y.shape[1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def rows(self, start: int, stop: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, stop): views, or copies in pinned host memory with ``pin``."""
        return _pinned((self.x[start:stop], self.y[start:stop]), pin)

    @property
    def in_process(self) -> bool:
        """Streamed, its rows are sliced in the evaluating process (no loader workers)."""
        return True

    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def fingerprint(self) -> str:
        """SHA-256 of the bytes: a resumed run must see the very same data."""
        return _sha256(self.x, self.y)

    def materialise(self) -> Split:
        return self


def _pinned(pair: tuple[torch.Tensor, torch.Tensor], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (pair[0].pin_memory(), pair[1].pin_memory()) if pin else pair


def _sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())  # a plug-in may hand CUDA tensors
    return h.hexdigest()


class _ReadSplit:
    """What a split read through ``rows`` knows from its first row."""

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.rows(0, 1)[0].shape[1:])

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.rows(0, 1)[1])


class DatasetSplit(_ReadSplit):
    """A map-style Dataset of (x, y) items as a split, optionally through sorted ``index`` (a subset).

    Rows are read range by range: with the dataset's own ``read(start, stop)``/``read_rows(idx)``
    (the on-disk stores: one read per batch) or item by item. ``fingerprint`` hashes a fixed sample
    of rows, not every byte: a store of gigabytes is not read whole to check a resume.
    """

    def __init__(self, dataset: Any, spec: str, index: np.ndarray | None = None):
        self.dataset, self.spec, self.index = dataset, spec, index
        try:
            self._len = len(index) if index is not None else len(dataset)
        except TypeError:
            raise UserError(f"data {spec!r}: a map-style Dataset must have a length") from None
        if self._len == 0:
            raise UserError(f"data {spec!r}: a split is empty")

    def __len__(self) -> int:
        return self._len

    @property
    def in_process(self) -> bool:
        """Streamed, its rows are read in the evaluating process (lsurf's stores and token files,
        where a range costs about a memcpy) rather than by loader workers (plug-in Datasets)."""
        return isinstance(self.dataset, RowDataset) and self.dataset.in_process

    def rows(self, start: int, stop: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [start, stop) (as slices do, ``stop`` past the end reads to the end), in pinned host
        memory with ``pin`` (lsurf's stores read straight into it)."""
        ds, stop = self.dataset, min(stop, len(self))
        try:
            if self.index is None and isinstance(ds, RowDataset):
                return ds.read(start, stop, pin)
            if self.index is None and hasattr(ds, "read"):
                return _pinned(ds.read(start, stop), pin)
            idx = np.arange(start, stop) if self.index is None else self.index[start:stop]
            if hasattr(ds, "read_rows"):
                return _pinned(ds.read_rows(idx), pin)
            xs, ys = zip(*(ds[int(i)] for i in idx))
            x, y = torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])
            return _pinned((x, y), pin)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"data {self.spec!r}: items must be (x, y) tensor pairs "
                            f"({type(e).__name__}: {e})") from None

    @property
    def num_outputs(self) -> int:
        return self.materialise(labels_only=True).num_outputs

    def nbytes(self) -> int:
        x, y = self.rows(0, 1)
        return len(self) * (x.nbytes + y.nbytes)

    def fingerprint(self) -> str:
        if self.index is None and hasattr(self.dataset, "fingerprint"):
            return self.dataset.fingerprint()  # a store's own (it knows its files)
        picks = sorted({0, len(self) - 1, *np.linspace(0, len(self) - 1, 64).astype(int).tolist()})
        parts = [self.rows(i, i + 1) for i in picks]
        return _sha256(torch.tensor([len(self)]), *(t for pair in parts for t in pair))

    def subset(self, n: int, name: str) -> DatasetSplit:
        base = self.index if self.index is not None else np.arange(len(self))
        return DatasetSplit(self.dataset, self.spec, base[_subset_index(len(self), n, name).numpy()])

    def materialise(self, labels_only: bool = False) -> Split:
        """The whole split as host tensors (for training, the Hessian command, a class count),
        read a few thousand rows at a time."""
        if labels_only and self.index is None and hasattr(self.dataset, "labels"):
            y = self.dataset.labels()
            return Split(torch.empty(len(y), 0), y)
        parts = [self.rows(i, min(i + 4096, len(self))) for i in range(0, len(self), 4096)]
        return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


class BatchStreamSplit(_ReadSplit):
    """Batches of (x, y) from ``make(batch_size)``: an iterable Dataset (batched by a DataLoader) or
    a plug-in's DataLoader factory. Its length is unknown until counted, so it is always streamed;
    the fingerprint hashes the first batch."""

    def __init__(self, make: Callable[[int], Iterable], spec: str):
        self.make, self.spec = make, spec

    def batches(self, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for item in self.make(batch_size):
            try:
                x, y = item
            except (TypeError, ValueError):
                raise UserError(f"data {self.spec!r}: batches must be (x, y) pairs") from None
            yield torch.as_tensor(x), torch.as_tensor(y)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start != 0:
            raise ValueError("a stream of batches can only give its first rows")
        for x, y in self.batches(stop):
            return x[:stop], y[:stop]
        raise UserError(f"data {self.spec!r}: the stream gave no batches")

    @property
    def num_outputs(self) -> int:
        return self.materialise().num_outputs

    def fingerprint(self) -> str:
        return _sha256(*self.rows(0, 256))

    def materialise(self) -> Split:
        parts = list(self.batches(1024))
        return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


AnySplit = Split | DatasetSplit | BatchStreamSplit


def _digits() -> dict[str, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return {"train": Split(x[train], y[train]), "test": Split(x[test], y[test])}


def _cifar_batch(path: Path) -> Split:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        # CIFAR-10's own files (Python 2 pickles) have bytes keys; re-pickled copies have str keys.
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data, labels = batch["data"], batch["labels"]
        x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(labels, dtype=np.int64)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise UserError(f"CIFAR-10 batch {str(path)!r} is unreadable ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise UserError(f"CIFAR-10 batch {str(path)!r} has {len(x)} images but {len(y)} labels")
    xt = torch.from_numpy(x).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return Split((xt - mean) / std, torch.from_numpy(y))


def _cifar10(root: str) -> dict[str, Split]:
    """CIFAR-10's python batches at ``root`` (or ``root/cifar-10-batches-py``), in file order."""
    base = Path(root)
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*names, "test_batch"] if not (base / n).is_file()]
    if missing:
        raise UserError(f"cifar10:{root}: no CIFAR-10 python batches there (missing {', '.join(missing)})")
    parts = [_cifar_batch(base / n) for n in names]
    train = Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    return {"train": train, "test": _cifar_batch(base / "test_batch")}


def _synthetic(options: str) -> dict[str, Split]:
    """``synthetic:shape=3x32x32,classes=10,n=1000,seed=0`` or ``...,task=regression,outputs=1``."""
    opts = {"shape": "3x32x32", "classes": "10", "n": "1000", "seed": "0", "task": "classification", "outputs": "1"}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in opts:
            raise UserError(f"synthetic data option {item!r}: expected one of {', '.join(f'{k}=' for k in opts)}")
        opts[key] = value
    try:
        shape = tuple(int(s) for s in opts["shape"].split("x"))
        n, seed, classes, outputs = (int(opts[k]) for k in ("n", "seed", "classes", "outputs"))
    except ValueError:
        raise UserError(f"synthetic data {options!r}: shape, n, seed, classes, outputs must be integers") from None
    if opts["task"] not in ("classification", "regression") or n < 1 or min(shape) < 1:
        raise UserError(f"synthetic data {options!r}: need n>=1, positive shape, task classification|regression")
    g = torch.Generator().manual_seed(seed)
    n_test = max(1, n // 5)
    f32 = torch.float32  # explicit: the same numbers whatever torch's default dtype is
    x = torch.randn(n + n_test, *shape, generator=g, dtype=f32)
    if opts["task"] == "regression":
        w = torch.randn(int(np.prod(shape)), outputs, generator=g, dtype=f32)
        y = x.flatten(1) @ w + 0.1 * torch.randn(n + n_test, outputs, generator=g, dtype=f32)
        y = y.squeeze(1) if outputs == 1 else y
    else:
        y = torch.randint(0, classes, (n + n_test,), generator=g)
    return {"train": Split(x[:n], y[:n]), "test": Split(x[n:], y[n:])}


def _plugin(spec: str) -> dict[str, AnySplit]:
    factory = load_plugin(spec, "data")
    try:
        train, test = factory()
    except Exception as e:
        raise UserError(f"data plug-in {spec!r} raised {type(e).__name__}: {e}") from None
    out = {"train": _as_split(train, spec)}
    if test is not None:
        out["test"] = _as_split(test, spec)
    return out


def _as_split(obj: Any, spec: str) -> AnySplit:
    """What a plug-in returned, as a split: a Split as is, a map-style Dataset read by rows, an
    iterable Dataset or a DataLoader factory ``f(batch_size)`` read batch by batch."""
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(obj, Split):
        return obj
    if isinstance(obj, IterableDataset):
        return BatchStreamSplit(lambda batch_size: DataLoader(obj, batch_size=batch_size), spec)
    if hasattr(obj, "__getitem__"):
        return DatasetSplit(obj, spec)
    if callable(obj):
        return BatchStreamSplit(obj, spec)
    raise UserError(f"data plug-in {spec!r}: expected Datasets or DataLoader factories, got {type(obj).__name__}")


def _store(spec: str, seq_len: int | None) -> dict[str, AnySplit]:
    kind = spec.partition(":")[0]
    opened = open_tokens(spec, seq_len) if kind == "tokens" else open_store(spec)
    return {name: DatasetSplit(ds, spec) for name, ds in opened.items()}


def load_data(spec: str, splits: tuple[str, ...] = ("train",), subset: int | None = None,
              seq_len: int | None = None) -> dict[str, AnySplit]:
    """Load the named splits of a data spec (the small built-in sets as host tensors, stores, token
    files cut into ``seq_len`` windows and plug-in Datasets as readers), optionally a fixed seeded
    subset of each (of windows, for tokens)."""
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"`split` {s!r}: expected train and/or test")
    data: dict[str, AnySplit]
    if spec == "digits":
        data = dict(_digits())
    elif spec.startswith("cifar10:"):
        data = dict(_cifar10(spec[len("cifar10:") :]))
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        data = dict(_synthetic(spec.partition(":")[2]))
    elif spec.partition(":")[0] in (*STORE_KINDS, "tokens"):
        data = _store(spec, seq_len)
    elif ":" in spec:
        data = _plugin(spec)
    else:
        raise UserError(f"unknown data {spec!r}: use digits, cifar10:PATH, synthetic[:opts], hdf5:PATH, npy:DIR, "
                        "tokens:DIR or pkg.module:factory")
    out = {}
    for s in splits:
        if s not in data:
            raise UserError(f"data {spec!r} has no {s} split")
        out[s] = _subset(data[s], subset, s) if subset else data[s]
    return out


def max_token(split: AnySplit) -> int | None:
    """The largest input id of a split of token ids (None: float inputs, or unknown without reading
    a stream): a model whose vocabulary is smaller would index past its embedding."""
    if isinstance(split, DatasetSplit) and hasattr(split.dataset, "max_token"):
        return int(split.dataset.max_token())
    if isinstance(split, Split) and not split.x.is_floating_point() and len(split.x):
        return int(split.x.max())
    return None


def label_range(split: AnySplit) -> tuple[int, int] | None:
    """The smallest and largest class label of a split with one integer label per sample, where
    that is cheap to know (host tensors, a store's label array); None otherwise."""
    if isinstance(split, Split):
        y = split.y
    elif isinstance(split, DatasetSplit) and hasattr(split.dataset, "labels"):
        y = split.dataset.labels()
        y = y if split.index is None else y[torch.from_numpy(split.index)]
    else:
        return None
    if y.is_floating_point() or y.dim() != 1 or not len(y):
        return None
    return int(y.min()), int(y.max())


def _subset_index(size: int, n: int, name: str) -> torch.Tensor:
    """A fixed seeded choice of ``n`` of ``size`` rows, in order."""
    if n < 1:
        raise UserError(f"`subset` {n}: must be at least 1")
    if n > size:
        raise UserError(f"`subset` {n} is larger than the {name} split ({size} samples)")
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:n].sort().values


def _subset(split: AnySplit, n: int, name: str) -> AnySplit:
    if isinstance(split, BatchStreamSplit):
        raise UserError(f"`subset`: the {name} split is a stream of batches, which has no rows to choose from")
    if isinstance(split, DatasetSplit):
        return split.subset(n, name)
    idx = _subset_index(len(split), n, name)
    return Split(split.x[idx], split.y[idx])
