"""Data sets by spec (``digits``, ``cifar10:PATH``, ``synthetic:...``, ``pkg.module:factory``) and
their device-resident, pre-batched form.

Every grid point is a full pass over the split, so the split is converted once to tensors on the
evaluation device and cut into batches once; the hot loop only indexes a Python list.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lsurf.engine.models import load_plugin
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

    def fingerprint(self) -> str:
        """SHA-256 of the bytes: a resumed run must see the very same data."""
        h = hashlib.sha256()
        for t in (self.x, self.y):
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


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


def _plugin(spec: str) -> dict[str, Split]:
    factory = load_plugin(spec, "data")
    try:
        train, test = factory()
    except Exception as e:
        raise UserError(f"data plug-in {spec!r} raised {type(e).__name__}: {e}") from None
    out = {"train": _dataset_to_split(train, spec)}
    if test is not None:
        out["test"] = _dataset_to_split(test, spec)
    return out


def _dataset_to_split(ds, spec: str) -> Split:
    try:
        xs, ys = zip(*(ds[i] for i in range(len(ds))))
        return Split(torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys]))
    except Exception as e:
        raise UserError(f"data plug-in {spec!r}: items must be (x, y) tensor pairs ({e})") from None


def load_data(spec: str, splits: tuple[str, ...] = ("train",), subset: int | None = None) -> dict[str, Split]:
    """Load the named splits of a data spec as CPU tensors, optionally a fixed seeded subset of each."""
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"`split` {s!r}: expected train and/or test")
    if spec == "digits":
        data = _digits()
    elif spec.startswith("cifar10:"):
        data = _cifar10(spec[len("cifar10:") :])
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        data = _synthetic(spec.partition(":")[2])
    elif ":" in spec:
        data = _plugin(spec)
    else:
        raise UserError(f"unknown data {spec!r}: use digits, cifar10:PATH, synthetic[:opts] or pkg.module:factory")
    out = {}
    for s in splits:
        if s not in data:
            raise UserError(f"data {spec!r} has no {s} split")
        out[s] = _subset(data[s], subset, s) if subset else data[s]
    return out


def _subset(split: Split, n: int, name: str) -> Split:
    if n < 1:
        raise UserError(f"`subset` {n}: must be at least 1")
    if n > len(split):
        raise UserError(f"`subset` {n} is larger than the {name} split ({len(split)} samples)")
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return Split(split.x[idx], split.y[idx])


def resident_batches(
    split: Split, batch_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The split on ``device`` once, cut into ``batch_size`` samples (the last may be shorter)."""
    x = split.x.to(device=device, dtype=dtype if torch.is_floating_point(split.x) else split.x.dtype)
    y = split.y.to(device=device, dtype=dtype if torch.is_floating_point(split.y) else split.y.dtype)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if channels_last and x.dim() == 4:
        batches = [(bx.contiguous(memory_format=torch.channels_last), by) for bx, by in batches]
    return batches
