"""The curve file (HDF5) of ``lsurf curve train``: the bends (group ``bend_k``, one dataset per
parameter), the optimiser's momentum, the per-epoch history and the hashes of the two end
checkpoints; written whole or not at all, read back as a :class:`StoredCurve`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from lsurf.engine.formats.surface_file import open_h5
from lsurf.engine.geometry.curve import Curve
from lsurf.engine.io import atomic_write, file_sha256
from lsurf.engine.model.models import read_state_dict
from lsurf.engine.training.curve import Progress
from lsurf.errors import UserError

FORMAT = "lsurf-curve-1"


def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def save_curve(path: str | Path, curve: Curve, progress: Progress, attrs: dict) -> None:
    """Write the curve file atomically (a temporary file renamed into place): a run killed while
    saving leaves the previous epoch's file whole. ``attrs``: provenance and the resume identity."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"format": FORMAT, "curve_type": curve.kind, "bends": curve.num_bends,
                        "epochs_done": progress.epochs_done, "names": json.dumps(curve.names), **attrs})
        for k, bend in enumerate(curve.bends, start=1):
            g = f.create_group(f"bend_{k}")
            for name, p in zip(curve.names, bend):
                g.create_dataset(name, data=_array(p))
        for k, bend in enumerate(progress.momentum or [], start=1):
            g = f.create_group(f"momentum/bend_{k}")
            for name, m in zip(curve.names, bend):
                g.create_dataset(name, data=_array(m))
        f.create_dataset("train_loss", data=np.asarray(progress.train_loss, dtype=np.float64))
        f.create_dataset("lr", data=np.asarray(progress.lr, dtype=np.float64))


@dataclass
class StoredCurve:
    """A curve file read back: its shape, bends (CPU tensors by parameter), progress and attributes."""

    path: str
    kind: str
    names: list[str]
    bends: list[list[torch.Tensor]]
    progress: Progress
    attrs: dict

    def curve(self, names: list[str], a: list[torch.Tensor], b: list[torch.Tensor]) -> Curve:
        """The curve between ends ``a`` and ``b`` (parameters ``names``, in their dtype and device)."""
        if names != self.names:
            extra = sorted(set(names) ^ set(self.names))
            raise UserError(f"curve {self.path!r} spans other parameters than this model's"
                            + (f" (first {extra[0]!r})" if extra else " (in another order)"))
        bends = [[p.to(x) for p, x in zip(bend, a)] for bend in self.bends]
        return Curve(self.kind, names, a, b, bends)

    def describe(self) -> list[str]:
        """Human-readable shape, progress and provenance, one line per item (what ``lsurf info`` prints)."""
        p, k = self.progress, len(self.bends)
        lines = [f"{'file:':<20}{self.path}  (a curve of `lsurf curve train`)",
                 f"{'curve:':<20}{self.kind}, {k} bend{'s' * (k > 1)}",
                 f"{'epochs done:':<20}{p.epochs_done}"]
        if p.train_loss:
            lines.append(f"{'train loss:':<20}" + ", ".join(f"{v:.4g}" for v in p.train_loss) + " (per epoch)")
            lines.append(f"{'lr:':<20}" + ", ".join(f"{v:.4g}" for v in p.lr))
        for key in ("model", "data", "checkpoint", "checkpoint_sha256", "model2", "model2_sha256", "lsurf_version",
                    "config"):
            if self.attrs.get(key):
                lines.append(f"{key + ':':<20}{self.attrs[key]}")
        return lines


def is_curve_file(path: str | Path) -> bool:
    """Whether ``path`` is a file of :func:`save_curve` (not a surface file)."""
    with open_h5(path, "r") as f:
        return f.attrs.get("format") == FORMAT


def _checked_attrs(f: h5py.File, path: str | Path) -> dict:
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a curve file (made by `lsurf curve train`)")
    return attrs


def curve_attrs(path: str | Path) -> dict:
    """A curve file's attributes (provenance, the recorded options) without reading its tensors."""
    with open_h5(path, "r") as f:
        return _checked_attrs(f, path)


def read_curve(path: str | Path) -> StoredCurve:
    """Read a file of ``save_curve``; anything else is refused in one line."""
    with open_h5(path, "r") as f:
        attrs = _checked_attrs(f, path)
        names = json.loads(attrs["names"])
        k = int(attrs["bends"])

        def group(prefix: str) -> list[list[torch.Tensor]]:
            return [[torch.from_numpy(f[f"{prefix}bend_{i}/{n}"][()]) for n in names] for i in range(1, k + 1)]

        momentum = group("momentum/") if "momentum" in f else None
        progress = Progress(int(attrs["epochs_done"]), momentum, f["train_loss"][()].tolist(), f["lr"][()].tolist())
        return StoredCurve(str(path), str(attrs["curve_type"]), names, group(""), progress, attrs)


def recorded_ends(stored: StoredCurve) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Models A and B read from the checkpoints the curve file names, refused if either has
    changed since the curve was trained (its SHA-256 differs)."""
    ends = []
    for key in ("checkpoint", "model2"):
        path = str(stored.attrs.get(key, ""))
        if not Path(path).is_file() or file_sha256(path) != stored.attrs.get(f"{key}_sha256"):
            raise UserError(f"curve {stored.path!r} was trained from {path!r}, which is missing or has changed "
                            "since (its sha256 differs)")
        state = read_state_dict(path)
        ends.append([state[n] for n in stored.names])
    return ends[0], ends[1]
