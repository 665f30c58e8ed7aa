"""Random, filter-normalised directions (Li et al. 2018) and the direction file.

The direction file has the layout of Li et al.'s code — groups ``xdirection`` and ``ydirection``,
one dataset per tensor named ``0``, ``1``, ... in ``model.parameters()`` order (state-dict order
for ``dir_type=states``) — plus attributes naming the tensors and recording how they were made.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch
from torch import nn

from lsurf.engine.io import atomic_write
from lsurf.engine.model.tensor_parts import local_part, local_rows, read_in_group, whole, whole_of
from lsurf.errors import UserError

Norm = Literal["filter", "layer", "weight", "none"]
DirType = Literal["weights", "states"]
Ignore = Literal["biasbn", "none"]
NORMS: tuple[str, ...] = get_args(Norm)
DIR_TYPES: tuple[str, ...] = get_args(DirType)
IGNORES: tuple[str, ...] = get_args(Ignore)


def target_tensors(model: nn.Module, dir_type: str) -> tuple[list[str], list[torch.Tensor]]:
    """The tensors a direction moves: parameters (``weights``) or the whole state dict (``states``).

    The returned tensors share storage with the model, so writing into them moves the model. A
    tensor tied to another (a language model's output head = its input embedding) is listed once,
    under its first name: two directions for one tensor would move it twice.
    """
    if dir_type == "weights":
        named = list(model.named_parameters())  # already without tied duplicates
        return [n for n, _ in named], [p.data for _, p in named]
    if dir_type == "states":
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        names, tensors = [], []
        for name, t in model.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            names.append(name)
            tensors.append(t)
        return names, tensors
    raise UserError(f"`dir_type` {dir_type!r}: expected one of {', '.join(DIR_TYPES)}")


def zero_directions(model: nn.Module, dir_type: str, two: bool = False) -> Directions:
    """The directions an :func:`~lsurf.engine.evaluation.evaluate.evaluator` is built with where the points are
    offsets, not steps along directions (sharpness's probes, a plug-in geometry): zeros, as
    broadcast views that hold no memory; ``two`` for a 2-D grid."""
    names, targets = target_tensors(model, dir_type)
    x = [torch.zeros((), dtype=torch.float32).expand(t.shape) for t in targets]
    return Directions(names, x, x if two else None, {"dir_type": dir_type})


def filter_axes(model: nn.Module, names: list[str]) -> list[int]:
    """The axis along which each named tensor holds its filters (output units): 0 for Linear rows,
    Embedding rows, attention in-projections and convolutions; 1 for the transposed ``Conv1D``
    layers of Hugging Face's GPT-2 family, whose weight is (in, out)."""
    axes = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
        transposed = type(module).__name__ == "Conv1D" and hasattr(module, "nf") and leaf == "weight"
        axes.append(1 if transposed else 0)
    return axes


def normalize(d: torch.Tensor, w: torch.Tensor, norm: str, ignore: str, axis: int = 0) -> None:
    """Scale ``d`` in place against ``w``: each filter, the slices along ``axis`` (``filter``), the
    whole tensor (``layer``), elementwise (``weight``) or not at all (``none``).

    Tensors of at most one dimension (biases, BatchNorm, LayerNorm and RMSNorm gains) are zeroed
    with ``ignore=biasbn`` and otherwise set equal to ``w``, as in Li et al.'s code.
    """
    if d.dim() <= 1:
        if ignore == "biasbn":
            d.zero_()
        else:
            d.copy_(w)
        return
    if norm == "weight":
        d.mul_(w)
        return
    factor = norm_factor(d, w, norm, axis)
    if factor is not None:
        d.mul_(factor)


def norm_factor(d: torch.Tensor, w: torch.Tensor, norm: str, axis: int = 0) -> torch.Tensor | None:
    """What ``filter``/``layer`` normalisation multiplies a tensor of two or more dimensions by
    (shaped to broadcast), or None (``none``): kept by regenerated directions, which then redo the
    same multiplication bit for bit without keeping the direction."""
    if norm == "filter":
        dn = d.movedim(axis, 0).reshape(d.shape[axis], -1).norm(dim=1)
        wn = w.movedim(axis, 0).reshape(w.shape[axis], -1).norm(dim=1)
        shape = [1] * d.dim()
        shape[axis] = -1
        return (wn / (dn + 1e-10)).view(shape)
    if norm == "layer":
        return w.norm() / (d.norm() + 1e-10)
    if norm == "none":
        return None
    raise UserError(f"`norm` {norm!r}: expected one of {', '.join(NORMS)}")


def _hash(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        hash_into(h, t)
    return h.hexdigest()


def hash_into(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().data)  # its bytes, not a copy


@dataclass
class Directions:
    """One or two directions over the same list of named tensors, plus how they were made.

    Those of a sharded model (lsurf.engine.model.sharding) hold only this rank's ``rows`` of each whole
    tensor (None: whole), and the hash of the whole ones, taken as they were drawn (``digest``)."""

    names: list[str]
    x: list[torch.Tensor]
    y: list[torch.Tensor] | None = None
    meta: dict = field(default_factory=dict)
    rows: list[slice | None] | None = None
    digest: str = ""

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    def sha256(self) -> str:
        """Hash of the direction values themselves, independent of where they are stored."""
        return self.digest or _hash(self.x + (self.y or []))

    def to(self, device: torch.device, dtype: torch.dtype) -> Directions:
        def cast(ts):
            return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in ts]

        return replace(self, x=cast(self.x), y=None if self.y is None else cast(self.y), meta=dict(self.meta))

    def like(self, targets: list[torch.Tensor]) -> Directions:
        """The same values laid out in memory as ``targets`` (e.g. channels-last weights), so adding
        them to the weights takes torch's fused path."""
        def lay(ts):
            return [t if t.stride() == w.stride() else torch.empty_like(w, dtype=t.dtype).copy_(t)
                    for t, w in zip(ts, targets)]

        return replace(self, x=lay(self.x), y=None if self.y is None else lay(self.y), meta=dict(self.meta))

    def cut(self, rows: Sequence[slice | None]) -> Directions:
        """Rows ``rows[i]`` of tensor i (None: whole), a sharded model's part (lsurf.engine.model.sharding):
        copies, so the whole tensors can go; a broadcast view (zero directions) stays a view. Directions
        drawn for a sharded model already are those rows."""
        if self.rows is not None:
            if self.rows != list(rows):
                raise UserError("directions drawn for one sharding of the model cannot move another")
            return self

        def part(ts):
            return [t if r is None else t[r].clone() if t.is_contiguous() else t[r] for t, r in zip(ts, rows)]

        return Directions(self.names, part(self.x), None if self.y is None else part(self.y), dict(self.meta),
                          list(rows), self.digest)


def tensor_generator(seed: int, which: int, index: int) -> torch.Generator:
    """A CPU generator for tensor ``index`` of direction ``which`` (0: x, 1: y). Each tensor's draw
    depends on (seed, which, index) alone, so one tensor can be drawn again without the others."""
    state = np.random.SeedSequence([seed % 2**64, which, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _draw_dtype(w: torch.Tensor) -> torch.dtype:
    """Directions of bfloat16/float16 weights are drawn and kept in float32: the perturbation is
    computed in float32 and only the perturbed weight is rounded."""
    return torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype


# What regenerated directions keep per tensor: the tensor itself (non-floating, or at most one
# dimension: small) or (dtype, normalisation factor or None) for a tensor drawn again when needed.
_Kept = torch.Tensor | tuple[torch.dtype, torch.Tensor | None]


def _direction(targets: list[torch.Tensor], axes: list[int], seed: int, which: int, norm: str, ignore: str,
               keep_values: bool, digest: hashlib._Hash | None = None) -> tuple[list[torch.Tensor], list[_Kept]]:
    """Direction ``which`` tensor by tensor: the values (if ``keep_values``) and what redraws it.
    Of a sharded model's tensor: drawn whole against the whole tensor (gathered, collective) and
    cut to this rank's rows; ``digest`` then takes the whole values."""
    values: list[torch.Tensor] = []
    kept: list[_Kept] = []
    for i, (w, axis) in enumerate(zip(targets, axes)):
        rows = local_rows(w)
        w = whole(w).detach().cpu()
        if not w.is_floating_point():  # e.g. BatchNorm's num_batches_tracked: never moved
            d = torch.zeros(w.shape, dtype=torch.float32)
            kept.append(d)
        else:
            wf = w.to(_draw_dtype(w))
            d = torch.randn(w.shape, generator=tensor_generator(seed, which, i), dtype=wf.dtype)
            if d.dim() <= 1 or norm == "weight":
                normalize(d, wf, norm, ignore, axis)
                kept.append(d if d.dim() <= 1 else (d.dtype, None))  # weight: stored only, never redrawn
            else:
                factor = norm_factor(d, wf, norm, axis)
                if factor is not None:
                    d.mul_(factor)
                kept.append((d.dtype, factor))
        if digest is not None:
            hash_into(digest, d)
        if keep_values:
            values.append(d if rows is None else d[rows].clone())
    return values, kept


class SeededDirections:
    """Seeded random directions that are never held whole: tensor i of direction k is drawn again
    from (seed, k, i) when it is needed and scaled by its cached normalisation factor, which gives
    the very bits :func:`random_directions` stores, in the memory of one tensor. A model of P
    parameters is then evaluated with 2P (weights and θ*) instead of 4P (and d₁, d₂).

    ``x`` and ``y`` are sequences that draw on indexing, so saving and hashing work as for
    :class:`Directions`; the evaluator draws one tensor at a time with :meth:`tensor`.
    """

    def __init__(self, names: list[str], shapes: list[torch.Size], kept: list[list[_Kept]], seed: int,
                 meta: dict):
        self.names, self.shapes, self.kept, self.seed, self.meta = names, shapes, kept, seed, meta
        self.rows: Sequence[slice | None] = [None] * len(names)
        self.x = _Drawn(self, 0)
        self.y = _Drawn(self, 1) if len(kept) > 1 else None

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    def tensor(self, which: int, i: int) -> torch.Tensor:
        """Tensor ``i`` of direction ``which``, on the CPU (a y equal to x is drawn as x); of a
        :meth:`cut`, its rows, drawn whole and cut (the same values whatever the cut)."""
        kept, rows = self.kept[which][i], self.rows[i]
        if isinstance(kept, torch.Tensor):
            return kept if rows is None else kept[rows]
        dtype, factor = kept
        draw_as = 0 if self.meta.get("same_dir") else which
        d = torch.randn(self.shapes[i], generator=tensor_generator(self.seed, draw_as, i), dtype=dtype)
        d = d.mul_(factor) if factor is not None else d
        return d if rows is None else d[rows].clone()

    def cut(self, rows: Sequence[slice | None]) -> SeededDirections:
        """The same directions giving rows ``rows[i]`` of tensor i (None: whole): a sharded model's part."""
        part = copy.copy(self)
        part.rows = list(rows)
        part.x, part.y = _Drawn(part, 0), None if self.y is None else _Drawn(part, 1)
        return part

    def sha256(self) -> str:
        return _hash(itertools.chain(self.x, self.y or []))  # drawn one at a time

    def to(self, device: torch.device, dtype: torch.dtype) -> SeededDirections:
        """Itself: its tensors are drawn on the CPU and moved one at a time by whoever uses them."""
        return self

    def materialise(self) -> Directions:
        return Directions(self.names, list(self.x), None if self.y is None else list(self.y), dict(self.meta))


class _Drawn(Sequence):
    def __init__(self, owner: SeededDirections, which: int):
        self.owner, self.which = owner, which

    def __len__(self) -> int:
        return len(self.owner.names)

    def __getitem__(self, i):  # int indices only
        return self.owner.tensor(self.which, i)


AnyDirections = Directions | SeededDirections


def random_directions(
    model: nn.Module,
    *,
    seed: int = 0,
    norm: str = "filter",
    ignore: str = "biasbn",
    dir_type: str = "weights",
    two: bool = True,
    same_dir: bool = False,
    regenerate: bool = False,
) -> AnyDirections:
    """Seeded Gaussian directions normalised against the model's current tensors (the centre θ*),
    filter by filter along each tensor's :func:`filter_axes`.

    Each tensor is drawn from its own generator seeded by (seed, direction, tensor index), so the
    directions are a function of ``seed`` alone (every MPI rank, every rerun gets the same bytes)
    and ``regenerate`` can give :class:`SeededDirections` that draw them again tensor by tensor.
    """
    if ignore not in IGNORES:
        raise UserError(f"`ignore` {ignore!r}: expected one of {', '.join(IGNORES)}")
    if norm not in NORMS:
        raise UserError(f"`norm` {norm!r}: expected one of {', '.join(NORMS)}")
    if regenerate and norm == "weight":
        raise UserError("`regenerate` cannot redraw `norm` weight directions (they need θ* itself): use filter, "
                        "layer or none")
    names, targets = target_tensors(model, dir_type)
    axes = filter_axes(model, names)
    meta = {"source": "random", "seed": seed, "norm": norm, "ignore": ignore, "dir_type": dir_type,
            "same_dir": same_dir}
    rows = [local_rows(t) for t in targets]
    sharded = any(r is not None for r in rows) and not regenerate  # regenerated ones are cut when placed
    digest = hashlib.sha256() if sharded else None
    x, kept_x = _direction(targets, axes, seed, 0, norm, ignore, not regenerate, digest)
    if regenerate:
        kept = [kept_x] + ([kept_x if same_dir else _direction(targets, axes, seed, 1, norm, ignore, False)[1]]
                           if two else [])
        return SeededDirections(names, [t.shape for t in targets], kept, seed, meta)
    if two and (sharded or not same_dir):  # sharded, a y equal to x is drawn again to hash it whole
        y: list[torch.Tensor] | None = _direction(targets, axes, seed, 0 if same_dir else 1, norm, ignore, True,
                                                  digest)[0]
    else:
        y = [t.clone() for t in x] if two else None
    if digest is None:
        return Directions(names, x, y, meta)
    return Directions(names, x, y, meta, rows, digest.hexdigest())


def save_directions(dirs: AnyDirections, path: str | Path, provenance: dict | None = None) -> None:
    """Write the direction file atomically (a temporary file renamed into place)."""
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
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


def load_directions(path: str | Path, names: list[str], targets: list[torch.Tensor], want_y: bool) -> Directions:
    """Read a direction file (ours or Li et al.'s) and check it fits these tensors exactly; of a
    sharded model, each rank its rows (collective: the ranks of its group refuse together)."""
    path = Path(path)
    groups = ["xdirection", "ydirection"] if want_y else ["xdirection"]
    lists, meta = read_in_group(lambda: _read_file(path, groups, names, targets), targets,
                                f"direction file {str(path)!r}")
    rows = [local_rows(t) for t in targets]
    digest = _checked_digest(path, dict(zip(groups, lists)), names, targets)
    return Directions(names, lists[0], lists[1] if want_y else None, meta,
                      None if all(r is None for r in rows) else rows, digest)


def _read_file(path: Path, groups: list[str], names: list[str],
               targets: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], dict]:
    """The tensors of each of ``groups`` (see :func:`_read_group`) and the file's meta."""
    if not path.is_file():
        raise UserError(f"direction file {str(path)!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"direction file {str(path)!r} is not a readable HDF5 file ({e})") from None
    with f:
        _check_names(f, path, names)
        if "xdirection" not in f:
            raise UserError(f"direction file {str(path)!r} has no 'xdirection' group")
        if "ydirection" in groups and "ydirection" not in f:
            raise UserError(f"direction file {str(path)!r} has only an x direction but `y` asks for 2-D")
        lists = [_read_group(f[g], path, g, names, targets) for g in groups]
        meta = json.loads(f.attrs["meta"]) if "meta" in f.attrs else {"source": "file"}
    return lists, meta


def _check_names(f: h5py.File, path: Path, names: list[str]) -> None:
    """Our files name their tensors: refuse a model whose tensors are named otherwise (Li et al.'s
    files carry no names and are checked by count and shape alone)."""
    if "names" not in f.attrs:
        return
    theirs = json.loads(f.attrs["names"])
    for i, (a, b) in enumerate(zip(theirs, names)):
        if a != b:
            raise UserError(f"direction file {str(path)!r} is for another model: tensor {i} is {a!r} there, "
                            f"{b!r} in this model")


def _read_group(g: h5py.Group, path: Path, group: str, names: list[str], targets: list[torch.Tensor]):
    """Each tensor of ``group`` as the model holds its target: whole, or a sharded target's rows
    (read from the file alone: no rank holds a whole direction of a sharded model)."""
    if len(g) != len(targets):
        raise UserError(
            f"direction file {str(path)!r} is for another model: {group} has {len(g)} tensors, "
            f"this model has {len(targets)}"
        )
    out = []
    for i, (name, w) in enumerate(zip(names, targets)):
        if str(i) not in g:
            raise UserError(f"direction file {str(path)!r}: {group} lacks dataset '{i}' ({name})")
        data = g[str(i)]
        if data.shape != tuple(w.shape):
            raise UserError(
                f"direction file {str(path)!r} is for another model: {group}/{i} ({name}) has shape "
                f"{data.shape}, the model's tensor has {tuple(w.shape)}"
            )
        rows = local_rows(w)
        a = np.asarray(data[()] if rows is None else data[rows.start:rows.stop])
        out.append(torch.from_numpy(a.astype(np.float32) if a.dtype.kind != "f" else a))
    return out


def _checked_digest(path: Path, groups: dict[str, list[torch.Tensor]], names: list[str],
                    targets: list[torch.Tensor]) -> str:
    """The hash of the whole directions, each tensor refused if not finite. Of a sharded model's
    rows each tensor is gathered in turn (collective): every rank checks the same whole tensor, so
    the ranks refuse together rather than one leaving the others in a gather."""
    digest = hashlib.sha256()
    for group, parts in groups.items():
        for i, (name, part, w) in enumerate(zip(names, parts, targets)):
            t = whole_of(part, w)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UserError(f"direction file {str(path)!r}: {group}/{i} ({name}) contains NaN or inf")
            hash_into(digest, t)
    return digest.hexdigest()


def model_directions(model: nn.Module, others: list[dict[str, torch.Tensor]], dir_type: str = "weights",
                     sources: list[str] | None = None) -> Directions:
    """Unnormalised directions to other models: d₁ = θ₂ − θ₁ (and d₂ = θ₃ − θ₁).

    Coordinates then mean models: α = 1 is exactly model 2 and (0, 1) exactly model 3, so a 1-D
    run interpolates (Goodfellow et al.) and a 2-D run spans the plane through three models.
    ``others`` are state dicts of the same architecture (already checked to fit); of a sharded
    model, each rank's rows of them (lsurf.engine.model.sharding.read_rows), and the directions are
    those rows (collective: the hash is of the whole ones).
    """
    names, targets = target_tensors(model, dir_type)  # parameter names are state-dict keys too
    held = [local_part(t) for t in targets]  # of a sharded model, this rank's rows (and ``others``' are)

    def towards(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [(state[n].to(w) - w).detach().cpu() if w.is_floating_point() else torch.zeros(w.shape)
                for n, w in zip(names, held)]

    dirs = [towards(s) for s in others]
    meta = {"source": "models", "dir_type": dir_type, "models": sources or []}
    rows = [local_rows(t) for t in targets]
    if all(r is None for r in rows):
        return Directions(names, dirs[0], dirs[1] if len(dirs) > 1 else None, meta)
    digest = hashlib.sha256()  # of the whole directions, each tensor gathered in turn: the unsharded hash
    for d in dirs:
        for part, t in zip(d, targets):
            hash_into(digest, whole_of(part, t))
    return Directions(names, dirs[0], dirs[1] if len(dirs) > 1 else None, meta, rows, digest.hexdigest())


def markers(meta: dict) -> list[dict]:
    """Where the models of an interpolation or a plane through models lie, for plots: derived from
    how the directions were made (``source`` models: model 2 at α = 1, model 3 at β = 1)."""
    if meta.get("source") == "curve":  # the plane of a curve: its ends and bend, placed when it was made
        return list(meta.get("markers", []))
    if meta.get("source") != "models":
        return []
    marks = [{"label": "model 1", "x": 0.0, "y": 0.0}, {"label": "model 2", "x": 1.0, "y": 0.0}]
    return marks + ([{"label": "model 3", "x": 0.0, "y": 1.0}] if len(meta.get("models", [])) > 1 else [])
