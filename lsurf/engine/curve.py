"""Mode connectivity (Garipov et al. 2018): a curve θ(t), t ∈ [0, 1], from a trained model θ_A = θ(0)
to another θ_B = θ(1), whose K bends are trained so that the loss stays low all along it.

The curve lives beside the model, over its parameter dict: a point of it is one tensor per
parameter (``named_parameters`` order), and a forward at a point is ``torch.func.functional_call``
with those tensors, so no layer is rewritten and any module lsurf loads has curves. Buffers
(BatchNorm running statistics) are not part of the curve.

Two shapes: a Bezier curve of degree K + 1 in the Bernstein basis (K = 1: the quadratic
(1−t)²θ_A + 2t(1−t)θ_1 + t²θ_B), and a polygonal chain through θ_A, θ_1..θ_K, θ_B at equally
spaced t. The curve file (HDF5) holds the bends (group ``bend_k``, one dataset per parameter),
the optimiser's momentum, the per-epoch history and the hashes of the two end checkpoints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import h5py
import numpy as np
import torch
from torch import nn

from lsurf.engine.data import Split
from lsurf.engine.evaluate import Reduce
from lsurf.engine.io import atomic_write
from lsurf.engine.losses import LossFn, pick_output
from lsurf.engine.models import file_sha256, read_state_dict
from lsurf.engine.snapshot import preserved
from lsurf.engine.surface_file import open_h5
from lsurf.errors import UserError

CurveType = Literal["bezier", "polychain"]
CURVE_TYPES: tuple[str, ...] = get_args(CurveType)
FORMAT = "lsurf-curve-1"


def check_shape(kind: str, bends: int) -> None:
    """Refuse a curve that cannot be built, naming the option."""
    if kind not in CURVE_TYPES:
        raise UserError(f"`curve_type` {kind!r}: expected one of {', '.join(CURVE_TYPES)}")
    if bends < 1:
        raise UserError(f"`bends` {bends}: must be at least 1 (0 bends is the straight line, which "
                        "`lsurf curve eval` reports beside every curve)")


def weights(kind: str, bends: int, t: float) -> list[float]:
    """The coefficients of θ_A, θ_1..θ_K, θ_B at ``t``: the point is their weighted sum. Both bases
    sum to 1 and give exactly (1, 0, ..., 0) at t = 0 and (0, ..., 0, 1) at t = 1, so the ends of
    every curve are the two models bit for bit."""
    n = bends + 1  # Bezier degree; also the number of segments of the chain
    if kind == "bezier":
        return [math.comb(n, i) * t**i * (1 - t) ** (n - i) for i in range(n + 1)]
    s = min(int(t * n), n - 1)  # the segment t lies on
    u = t * n - s
    return [1 - u if i == s else u if i == s + 1 else 0.0 for i in range(n + 1)]


@dataclass
class Curve:
    """The ends (fixed) and bends (trained) of a curve over parameters ``names``."""

    kind: str
    names: list[str]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    bends: list[list[torch.Tensor]]

    @classmethod
    def straight(cls, kind: str, names: list[str], a: list[torch.Tensor], b: list[torch.Tensor],
                 bends: int) -> Curve:
        """A curve whose bends lie on the line, θ_k = A + k/(K+1)(B − A): training starts from the
        straight path, whose barrier it then lowers."""
        check_shape(kind, bends)
        frac = [k / (bends + 1) for k in range(1, bends + 1)]
        return cls(kind, names, a, b, [[x + f * (y - x) for x, y in zip(a, b)] for f in frac])

    @property
    def num_bends(self) -> int:
        return len(self.bends)

    def point(self, t: float) -> list[torch.Tensor]:
        """θ(t), one tensor per parameter; differentiable in the bends. Terms of weight 0 are left
        out, so the ends are exact and a chain touches two of its points only."""
        terms = [(w, p) for w, p in zip(weights(self.kind, self.num_bends, t), [self.a, *self.bends, self.b])
                 if w != 0.0]
        return [sum((w * p[j] for w, p in terms[1:]), terms[0][0] * terms[0][1][j]) for j in range(len(self.names))]

    @torch.no_grad()
    def offset(self, t: float) -> list[torch.Tensor]:
        """θ(t) − θ_A: where an evaluator centred on model A moves to reach the curve's point."""
        return [p - a for p, a in zip(self.point(t), self.a)]


def parameters_of(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The model's floating-point parameters by name, detached copies: the tensors a curve spans."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    return [n for n, _ in named], [p.detach().clone() for _, p in named]


def check_same_architecture(own: dict[str, torch.Tensor], other: dict[str, torch.Tensor], other_path: str) -> None:
    """Both ends of a curve must have the same tensors: refuse ``model2`` otherwise, naming the
    first tensor that differs."""
    missing = [k for k in own if k not in other]
    extra = [k for k in other if k not in own]
    why = ""
    if missing or extra:
        first = (missing or extra)[0]
        why = f"{len(missing) + len(extra)} tensors differ by name, first {first!r}"
    else:
        bad = next((k for k in own if tuple(own[k].shape) != tuple(other[k].shape)), None)
        if bad is not None:
            why = f"{bad!r} has shape {tuple(other[bad].shape)} there, {tuple(own[bad].shape)} in `checkpoint`"
    if why:
        raise UserError(f"`model2` {other_path!r} is not the architecture of `checkpoint`: {why}")


@dataclass(frozen=True)
class Training:
    """How the bends are trained: SGD with momentum, weight decay (on the bends: the ends are fixed),
    a per-epoch cosine schedule from ``lr`` over ``epochs``, ``batch_size`` samples per step and
    one t per step, both drawn from ``seed``. The schedule is over ``epochs``: continuing a finished
    curve to more epochs runs the remaining ones on the schedule of the new total (the finished ones
    keep theirs, recorded in the file's ``lr``)."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"`{name}` {getattr(self, name)}: must be at least 1")
        if not self.lr > 0:
            raise UserError(f"`lr` {self.lr}: must be positive")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based): cosine from ``lr`` towards 0."""
        return self.lr * (1 + math.cos(math.pi * epoch / self.epochs)) / 2

    def identity(self) -> dict:
        """What a resumed run must share with the one that started the file (not ``epochs``: a
        finished curve may be trained on)."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "batch_size": self.batch_size, "seed": self.seed}


def epoch_draws(seed: int, epoch: int, n: int, batch_size: int) -> tuple[torch.Tensor, list[float]]:
    """The sample order and the t of each step of ``epoch``: a function of (seed, epoch) alone, so
    every rank draws the same ones and a resumed run draws what an unbroken one would have."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    perm = torch.randperm(n, generator=gen)
    ts = torch.rand(-(-n // batch_size), generator=gen, dtype=torch.float64)
    return perm, ts.tolist()


@dataclass
class Progress:
    """Where training stands: epochs done, the momentum of each bend tensor, the history."""

    epochs_done: int = 0
    momentum: list[list[torch.Tensor]] | None = None
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


def train_curve(model: nn.Module, curve: Curve, split: Split, training: Training, progress: Progress, *,
                loss_fn: LossFn, output: str | None = None, shard: tuple[int, int] = (0, 1),
                reduce: Reduce | None = None, device: torch.device | str = "cpu",
                on_epoch: Callable[[Curve, Progress], None] | None = None) -> tuple[Curve, Progress]:
    """Minimise E_{t~U(0,1)} loss(θ(t)) over the bends, from ``progress`` to ``training.epochs``.

    BatchNorm layers run in train mode on each step's batch statistics (Garipov et al.): the
    running statistics of the ends say nothing about a point between them. Every rank of a job
    draws the same steps and t, computes the loss summed over its ``shard`` (r, R) of each batch,
    and ``reduce`` adds the gradient sums of all ranks, so R ranks take the step one process
    would (for a model without BatchNorm: with it each rank normalises its share by the share's
    own statistics). ``on_epoch(curve, progress)`` sees each finished epoch (to save it). The model comes
    back as it was; the returned curve and progress are on the CPU.
    """
    with preserved(model):
        model.to(device).train()
        live = _live(curve, torch.device(device))
        flat = [p for bend in live.bends for p in bend]
        opt = torch.optim.SGD(flat, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
        if progress.momentum is not None:
            for p, m in zip(flat, (m for bend in progress.momentum for m in bend)):
                opt.state[p]["momentum_buffer"] = m.to(p).clone()
        for epoch in range(progress.epochs_done, training.epochs):
            lr = training.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            mean = _epoch(model, live, split, training, epoch, opt, loss_fn, output, shard, reduce)
            buffers = [opt.state[p]["momentum_buffer"].detach().cpu().clone() for p in flat]
            progress = Progress(epoch + 1, _regroup(buffers, live.num_bends), [*progress.train_loss, mean],
                                [*progress.lr, lr])
            curve = _on_cpu(live)
            if on_epoch is not None:
                on_epoch(curve, progress)
    return curve, progress


def _live(curve: Curve, device: torch.device) -> Curve:
    """The curve on ``device`` with bends as fresh leaf tensors that collect gradients."""
    bends = [[p.detach().to(device).clone().requires_grad_(True) for p in bend] for bend in curve.bends]
    return Curve(curve.kind, curve.names, [a.to(device) for a in curve.a], [b.to(device) for b in curve.b], bends)


def _on_cpu(curve: Curve) -> Curve:
    bends = [[p.detach().cpu().clone() for p in bend] for bend in curve.bends]
    return Curve(curve.kind, curve.names, [a.cpu() for a in curve.a], [b.cpu() for b in curve.b], bends)


def _regroup(flat: list[torch.Tensor], bends: int) -> list[list[torch.Tensor]]:
    per = len(flat) // bends
    return [flat[k * per : (k + 1) * per] for k in range(bends)]


def _epoch(model: nn.Module, live: Curve, split: Split, training: Training, epoch: int, opt: torch.optim.Optimizer,
           loss_fn: LossFn, output: str | None, shard: tuple[int, int], reduce: Reduce | None) -> float:
    """One pass over the training split; returns its mean loss (over all ranks' shares)."""
    perm, ts = epoch_draws(training.seed, epoch, len(split), training.batch_size)
    flat = [p for bend in live.bends for p in bend]
    dtype = flat[0].dtype
    total = torch.zeros((), dtype=torch.float64, device=flat[0].device)  # read once an epoch, not once a step
    for step, t in enumerate(ts):
        idx = perm[step * training.batch_size : (step + 1) * training.batch_size]
        r, size = shard
        mine = idx[r * len(idx) // size : (r + 1) * len(idx) // size]
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), dtype=torch.float64, device=flat[0].device)
        if len(mine):
            x, y = split.x[mine].to(flat[0].device), split.y[mine].to(flat[0].device)
            params = dict(zip(live.names, live.point(t)))
            out = pick_output(torch.func.functional_call(model, params, (x.to(dtype) if x.is_floating_point() else x,)),
                              output)
            per = loss_fn(out, y)
            loss = per.reshape(len(per), -1).mean(1).sum()  # per sample, whatever the loss's shape
            loss.backward()
        total += _average_gradients(flat, loss.detach().double(), len(idx), reduce)
        opt.step()
    return float(total) / len(split)


def _average_gradients(flat: list[torch.Tensor], loss_sum: torch.Tensor, n: int, reduce: Reduce | None) -> torch.Tensor:
    """Every bend's gradient of the batch's mean loss, divided by the batch size where it lies.
    Several ranks add their sums first, in one float64 buffer through the host (the loss sum rides
    along; one allreduce); one process keeps them on the device in their dtype, where the division
    rounds as the float64 one did (53 bits hold twice a float32's 24 and two more). Returns the
    batch's loss sum (float64, on the device)."""
    grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in flat]
    if reduce is not None:
        buf = torch.cat([*(g.reshape(-1).double() for g in grads), loss_sum.reshape(1)]).cpu().numpy()
        summed = torch.from_numpy(np.ascontiguousarray(reduce(buf))).to(loss_sum.device)
        grads = list(summed[:-1].split([p.numel() for p in flat]))
        loss_sum = summed[-1]
    for p, g in zip(flat, grads):
        p.grad = (g / n).view_as(p).to(p)
    return loss_sum


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


def _dot(u: list[torch.Tensor], v: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(u, v)))


def plane_point(curve: Curve) -> list[torch.Tensor]:
    """The point that, with the ends, spans the curve's plane: the bend of a 1-bend curve (the
    quadratic Bezier lies in that plane), θ(1/2) of a curve with more bends."""
    return curve.bends[0] if curve.num_bends == 1 else curve.point(0.5)


@torch.no_grad()
def curve_plane(curve: Curve) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Directions of the plane through A, the bend and B, centred on A: d₁ = B − A, and d₂ = bend − A
    made orthogonal to d₁ (Gram–Schmidt over all parameters at once). Then (1, 0) is model B and
    the bend lies at β = 1."""
    d1 = [b - a for a, b in zip(curve.a, curve.b)]
    v = [p - a for p, a in zip(plane_point(curve), curve.a)]
    c = _dot(v, d1) / _dot(d1, d1)
    d2 = [x - c * y for x, y in zip(v, d1)]
    if _dot(d2, d2) <= 1e-12 * _dot(v, v):
        raise UserError("the curve is straight (its bend lies on the line from A to B): it spans no plane")
    return d1, d2


@torch.no_grad()
def coordinates(offsets: list[list[torch.Tensor]], d1: list[torch.Tensor], d2: list[torch.Tensor]) -> np.ndarray:
    """(α, β) of each offset from A along orthogonal ``d1``, ``d2``: one row per offset."""
    n1, n2 = _dot(d1, d1), _dot(d2, d2)
    return np.array([[_dot(off, d1) / n1, _dot(off, d2) / n2] for off in offsets])


def project(curve: Curve, d1: list[torch.Tensor], d2: list[torch.Tensor], ts: list[float]) -> np.ndarray:
    """The curve drawn on a plane around A: (α, β) of θ(t) − A for each t (a 1-bend Bezier lies
    exactly in its own plane)."""
    return coordinates([curve.offset(t) for t in ts], d1, d2)


def bend_coordinates(curve: Curve, d1: list[torch.Tensor], d2: list[torch.Tensor]) -> tuple[float, float]:
    """Where :func:`plane_point` lies on the plane (β = 1 on the curve's own plane)."""
    x, y = coordinates([[p - a for p, a in zip(plane_point(curve), curve.a)]], d1, d2)[0]
    return float(x), float(y)


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
