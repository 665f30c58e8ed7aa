"""Random, filter-normalised directions (Li et al. 2018) and the direction file.

The direction file has the layout of Li et al.'s code — groups ``xdirection`` and ``ydirection``,
one dataset per tensor named ``0``, ``1``, ... in ``model.parameters()`` order (state-dict order
for ``dir_type=states``) — plus attributes naming the tensors and recording how they were made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch
from torch import nn

from lsurf.errors import UserError

Norm = Literal["filter", "layer", "weight", "none"]
DirType = Literal["weights", "states"]
Ignore = Literal["biasbn", "none"]
NORMS: tuple[str, ...] = get_args(Norm)
DIR_TYPES: tuple[str, ...] = get_args(DirType)
IGNORES: tuple[str, ...] = get_args(Ignore)


def target_tensors(model: nn.Module, dir_type: str) -> tuple[list[str], list[torch.Tensor]]:
    """The tensors a direction moves: parameters (``weights``) or the whole state dict (``states``).

    The returned tensors share storage with the model, so writing into them moves the model.
    """
    if dir_type == "weights":
        named = list(model.named_parameters())
        return [n for n, _ in named], [p.data for _, p in named]
    if dir_type == "states":
        state = model.state_dict()
        return list(state), list(state.values())
    raise UserError(f"`dir_type` {dir_type!r}: expected one of {', '.join(DIR_TYPES)}")


def normalize(d: torch.Tensor, w: torch.Tensor, norm: str, ignore: str) -> None:
    """Scale ``d`` in place against ``w``: each slice along dim 0 (``filter``), the whole tensor
    (``layer``), elementwise (``weight``) or not at all (``none``).

    Tensors of at most one dimension (biases, BatchNorm) are zeroed with ``ignore=biasbn`` and
    otherwise set equal to ``w``, as in Li et al.'s code.
    """
    if d.dim() <= 1:
        if ignore == "biasbn":
            d.zero_()
        else:
            d.copy_(w)
        return
    if norm == "filter":
        dn = d.reshape(len(d), -1).norm(dim=1)
        wn = w.reshape(len(w), -1).norm(dim=1)
        d.mul_((wn / (dn + 1e-10)).view(-1, *([1] * (d.dim() - 1))))
    elif norm == "layer":
        d.mul_(w.norm() / (d.norm() + 1e-10))
    elif norm == "weight":
        d.mul_(w)
    elif norm != "none":
        raise UserError(f"`norm` {norm!r}: expected one of {', '.join(NORMS)}")


@dataclass
class Directions:
    """One or two directions over the same list of named tensors, plus how they were made."""

    names: list[str]
    x: list[torch.Tensor]
    y: list[torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    def sha256(self) -> str:
        """Hash of the direction values themselves, independent of where they are stored."""
        h = hashlib.sha256()
        for t in self.x + (self.y or []):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def to(self, device: torch.device, dtype: torch.dtype) -> Directions:
        def cast(ts):
            return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in ts]

        return Directions(self.names, cast(self.x), None if self.y is None else cast(self.y), dict(self.meta))


def random_directions(
    model: nn.Module,
    *,
    seed: int = 0,
    norm: str = "filter",
    ignore: str = "biasbn",
    dir_type: str = "weights",
    two: bool = True,
    same_dir: bool = False,
) -> Directions:
    """Seeded Gaussian directions normalised against the model's current tensors (the centre θ*).

    A private CPU generator makes the directions a function of ``seed`` alone: every MPI rank, and
    every rerun, gets the same bytes.
    """
    if ignore not in IGNORES:
        raise UserError(f"`ignore` {ignore!r}: expected one of {', '.join(IGNORES)}")
    if norm not in NORMS:
        raise UserError(f"`norm` {norm!r}: expected one of {', '.join(NORMS)}")
    names, targets = target_tensors(model, dir_type)
    gen = torch.Generator().manual_seed(seed)

    def one() -> list[torch.Tensor]:
        out = []
        for w in targets:
            w = w.detach().cpu()
            if not w.is_floating_point():  # e.g. BatchNorm's num_batches_tracked: never moved
                out.append(torch.zeros(w.shape, dtype=torch.float32))
                continue
            d = torch.randn(w.shape, generator=gen, dtype=w.dtype)
            normalize(d, w, norm, ignore)
            out.append(d)
        return out

    x = one()
    y = None if not two else ([t.clone() for t in x] if same_dir else one())
    meta = {"source": "random", "seed": seed, "norm": norm, "ignore": ignore, "dir_type": dir_type,
            "same_dir": same_dir}
    return Directions(names, x, y, meta)


def save_directions(dirs: Directions, path: str | Path, provenance: dict | None = None) -> None:
    """Write the direction file atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for group, tensors in (("xdirection", dirs.x), ("ydirection", dirs.y)):
            if tensors is None:
                continue
            g = f.create_group(group)
            for i, t in enumerate(tensors):
                g.create_dataset(str(i), data=t.detach().cpu().numpy())
        f.attrs["names"] = json.dumps(dirs.names)
        f.attrs["meta"] = json.dumps({**dirs.meta, **(provenance or {})})
        for k, v in {**dirs.meta, **(provenance or {})}.items():
            f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
    tmp.replace(path)


def load_directions(path: str | Path, names: list[str], targets: list[torch.Tensor], want_y: bool) -> Directions:
    """Read a direction file (ours or Li et al.'s) and check it fits these tensors exactly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"direction file {str(path)!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"direction file {str(path)!r} is not a readable HDF5 file ({e})") from None
    with f:
        if "xdirection" not in f:
            raise UserError(f"direction file {str(path)!r} has no 'xdirection' group")
        if want_y and "ydirection" not in f:
            raise UserError(f"direction file {str(path)!r} has only an x direction but `y` asks for 2-D")
        groups = ["xdirection", "ydirection"] if want_y else ["xdirection"]
        lists = [_read_group(f[g], path, g, names, targets) for g in groups]
        meta = json.loads(f.attrs["meta"]) if "meta" in f.attrs else {"source": "file"}
    return Directions(names, lists[0], lists[1] if want_y else None, meta)


def _read_group(g: h5py.Group, path: Path, group: str, names: list[str], targets: list[torch.Tensor]):
    if len(g) != len(targets):
        raise UserError(
            f"direction file {str(path)!r} is for another model: {group} has {len(g)} tensors, "
            f"this model has {len(targets)}"
        )
    out = []
    for i, (name, w) in enumerate(zip(names, targets)):
        if str(i) not in g:
            raise UserError(f"direction file {str(path)!r}: {group} lacks dataset '{i}' ({name})")
        a = np.asarray(g[str(i)][()])
        if a.shape != tuple(w.shape):
            raise UserError(
                f"direction file {str(path)!r} is for another model: {group}/{i} ({name}) has shape "
                f"{a.shape}, the model's tensor has {tuple(w.shape)}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UserError(f"direction file {str(path)!r}: {group}/{i} ({name}) contains NaN or inf")
        out.append(torch.from_numpy(a.astype(np.float32) if a.dtype.kind != "f" else a))
    return out


def model_directions(model: nn.Module, others: list[dict[str, torch.Tensor]], dir_type: str = "weights",
                     sources: list[str] | None = None) -> Directions:
    """Unnormalised directions to other models: d₁ = θ₂ − θ₁ (and d₂ = θ₃ − θ₁).

    Coordinates then mean models: α = 1 is exactly model 2 and (0, 1) exactly model 3, so a 1-D
    run interpolates (Goodfellow et al.) and a 2-D run spans the plane through three models.
    ``others`` are state dicts of the same architecture (already checked to fit).
    """
    names, targets = target_tensors(model, dir_type)  # parameter names are state-dict keys too

    def towards(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [(state[n].to(w) - w).detach().cpu() if w.is_floating_point() else torch.zeros(w.shape)
                for n, w in zip(names, targets)]

    dirs = [towards(s) for s in others]
    meta = {"source": "models", "dir_type": dir_type, "models": sources or []}
    return Directions(names, dirs[0], dirs[1] if len(dirs) > 1 else None, meta)


def markers(meta: dict) -> list[dict]:
    """Where the models of an interpolation or a plane through models lie, for plots: derived from
    how the directions were made (``source`` models: model 2 at α = 1, model 3 at β = 1)."""
    if meta.get("source") != "models":
        return []
    marks = [{"label": "model 1", "x": 0.0, "y": 0.0}, {"label": "model 2", "x": 1.0, "y": 0.0}]
    return marks + ([{"label": "model 3", "x": 0.0, "y": 1.0}] if len(meta.get("models", [])) > 1 else [])
