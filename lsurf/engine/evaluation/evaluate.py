"""Loss and accuracy of a model at θ* + α·d₁ + β·d₂, over each split's batches (resident or
streamed: lsurf.engine.data.batches).

Weights at every point are written afresh from θ* with foreach ops (no drift, no allocation), and
each split's statistics stay on the device until one host synchronisation per point. Statistics
are made of additive sums and a sample count, so the ranks of a group, each holding a share of
every split, add their sums (``reduce``) and get what one process holding it all would.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lsurf.engine.curvature.hessian import Hessian
from lsurf.engine.curvature.sharded import ShardedHessian, gather_rows
from lsurf.engine.data.batches import Feed, Streamed, equal_batches, head, resident_batches, shard_range, to_device
from lsurf.engine.data.splits import AnySplit, BatchStreamSplit
from lsurf.engine.evaluation.labels import FLAGS, check_label_flags, flag_labels
from lsurf.engine.evaluation.losses import LossFn, class_targets, is_low_precision, pick_output, resolve_loss
from lsurf.engine.evaluation.metrics import METRICS, MeanLoss, Metric, metrics_for
from lsurf.engine.evaluation.precision import Precision
from lsurf.engine.evaluation.quantities import Quantities
from lsurf.engine.geometry.directions import AnyDirections, Directions, SeededDirections, target_tensors
from lsurf.engine.model.sharding import check_shardable, copy_skeleton, is_sharded_model, shard_model, without_grad
from lsurf.engine.model.snapshot import ModelSnapshot
from lsurf.engine.model.tensor_parts import local_part, local_rows
from lsurf.errors import UserError

Reduce = Callable[[np.ndarray], np.ndarray]  # sums of this rank's share -> sums of the group's
_REDUCE_EVERY = 1 << 22  # model outputs held before a loss/argmax reduction (16 MB of float32)
_GPU_HEADROOM = 0.7  # share of a GPU's memory a calibrated K may use at its peak


@contextlib.contextmanager
def evaluator(
    model: nn.Module,
    data: dict[str, AnySplit],
    directions: AnyDirections,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 128,
    channels_last: bool = False,
    loss: str | LossFn = "cross_entropy",
    bn: str = "eval",
    points_per_pass: int = 1,
    amp: bool = False,
    hessian_iters: int = 0,
    metrics: Sequence[Metric] | None = None,
    output: str | None = None,
    ignore_index: int = -100,
    streamed: Collection[str] = (),
    workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    precision: Precision | None = None,
    mesh: Any = None,
    skeleton: nn.Module | None = None,
) -> Iterator[Evaluator]:
    """``with evaluator(model, data, directions, ...) as ev:`` — the model moved to ``device`` and
    ``dtype`` (and NHWC with ``channels_last``) in eval mode, the splits resident there in batches
    (those named in ``streamed`` read afresh at every point by ``workers`` loader processes), and,
    on the way out, the model handed back exactly as it came (weights, buffers, device, dtype,
    layout, train/eval flags), also after an exception or Ctrl-C. ``shard`` (r, G): this rank holds
    the r-th of G parts of every split and ``reduce`` adds the group's sums. ``metrics`` default to
    those the targets call for (per-token for token targets, see :func:`metrics_for`); ``output``
    names the entry of a dict-like model output to score (default ``logits``). ``precision``: stop
    each split's pass once its loss is known to a tolerance (lsurf.engine.evaluation.precision), the splits'
    samples in its seeded order. ``mesh``: the group's DeviceMesh to shard the model over
    (lsurf.engine.model.sharding; ``shard`` is then this rank's place in it): a sharded copy is evaluated.
    ``skeleton``: a model that came sharded, its modules and buffers, for gradients and
    ``hessian_iters`` (they run its gathered weights through it; of a whole model, a copy is made)."""
    dev = torch.device(device)
    if precision is not None:
        data = _in_seeded_order(data, precision, bool(streamed) or shard[1] > 1)
    if mesh is not None:
        check_shardable(points_per_pass=points_per_pass, channels_last=channels_last)
    # sharded, a copy is evaluated, unless the model came sharded (lsurf.engine.model.sharding.load_sharded)
    snapshot = None if mesh is not None and not is_sharded_model(model) else ModelSnapshot(model)
    try:
        whole, model = model, _ready(model, dev, dtype, channels_last, mesh)
        names, targets = target_tensors(model, directions.meta.get("dir_type", "weights"))
        rows = [local_rows(t) for t in targets]
        targets = [local_part(t) for t in targets]
        by_batch = bn == "recalibrate"  # train-mode passes see the one process's batches (lsurf.engine.data.batches)
        batches = _feeds(data, batch_size, (dev, dtype, channels_last), (shard, by_batch, mesh is not None),
                         streamed, workers)
        loss_fn = resolve_loss(loss, ignore_index) if isinstance(loss, str) else loss
        curvature = _sharded_curvature(whole, model, skeleton, data, (dev, dtype), mesh, bool(hessian_iters))
        if metrics is None:
            metrics = metrics_for(next(iter(data.values())).rows(0, 1)[1], ignore_index)
        perturb = torch.float32 if is_low_precision(dtype) else dtype
        yield Evaluator(model, names, targets, _placed(directions, targets, perturb, rows), batches, loss_fn, bn,
                        points_per_pass, amp, hessian_iters, metrics, reduce, output,
                        origin=None if snapshot is None else [snapshot.copy_of(t) for t in targets],
                        precision=precision, row_offsets=shard_starts(data, shard, batch_size if by_batch else 1),
                        rows=rows, curvature=curvature)
    finally:
        if snapshot is not None:
            snapshot.restore()


def _in_seeded_order(data: dict[str, AnySplit], precision: Precision, shared: bool) -> dict[str, AnySplit]:
    """The splits in ``precision``'s seeded order, which only a whole split held in each process
    (not ``shared``: streamed, or in a rank group) can be taken in."""
    if shared:
        raise UserError("`tolerance` takes each split's samples in one seeded order: it needs the splits "
                        "resident and whole in each process (not streamed, `ranks_per_point` 1)")
    return {s: precision.ordered(split) for s, split in data.items()}


def _feeds(data: dict[str, AnySplit], batch_size: int, place: tuple[torch.device, torch.dtype, bool],
           part: tuple[tuple[int, int], bool, bool], streamed: Collection[str], workers: int) -> dict[str, Feed]:
    """Each split's batches on the device (``place``: device, dtype, channels-last): held, or those
    in ``streamed`` read at every pass. ``part``: this rank's share (r, G), whether it is whole
    batches of the one process's, and whether forwards are collective (a sharded model's: as many
    batches on every rank)."""
    (dev, dtype, channels_last), (shard, by_batch, collective) = place, part
    batches: dict[str, Feed] = {
        s: Streamed(split, batch_size, dev, dtype, channels_last, workers, shard, by_batch) if s in streamed
        else resident_batches(split, batch_size, dev, dtype, channels_last, shard, by_batch)
        for s, split in data.items()}
    if not collective:
        return batches
    return {s: equal_batches(b, data[s], batch_size, shard, dev, dtype, by_batch) for s, b in batches.items()}


def _ready(model: nn.Module, dev: torch.device, dtype: torch.dtype, channels_last: bool, mesh: Any) -> nn.Module:
    """The model to evaluate, in eval mode on ``dev`` in ``dtype``: the caller's own, moved (the
    snapshot hands it back), or a copy sharded over ``mesh``, or the caller's model, which came sharded."""
    if is_sharded_model(model):
        if next(model.parameters()).dtype != dtype:
            raise UserError(f"the sharded model is in {next(model.parameters()).dtype}, the evaluation in {dtype}: "
                            "load it in the evaluation's dtype")
        return model.eval()
    if mesh is not None:
        return shard_model(model, mesh, dtype)
    model.to(device=dev, dtype=dtype)
    if channels_last:  # before taking the target tensors: .to() gives parameters new storage
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid; not in torch stubs
    return model.eval()


_NO_SKELETON = ("`skeleton`: the Hessian or gradient at a point of a model that came sharded runs its gathered "
                "weights through the model's modules: pass them (lsurf.run.sources.model_skeleton)")


def _sharded_curvature(whole: nn.Module, model: nn.Module, skeleton: nn.Module | None, data: dict[str, AnySplit],
                       place: tuple[torch.device, torch.dtype], mesh: Any, needed: bool) -> tuple | None:
    """What gradients and the Hessian of a sharded model take (None: the model is not sharded, or
    came sharded with no ``skeleton`` while not ``needed``): the model's skeleton (a copy's, of a
    ``whole`` one), the group, and one sample to run where a rank has none."""
    if mesh is None:
        return None
    if skeleton is None:
        if is_sharded_model(whole):
            if needed:
                raise UserError(_NO_SKELETON)
            return None
        skeleton = copy_skeleton(whole, model)
    return skeleton, mesh.get_group(), to_device(*next(iter(data.values())).rows(0, 1), *place)


def shard_starts(data: dict[str, AnySplit], shard: tuple[int, int], unit: int = 1) -> dict[str, int]:
    """The row of each split where this rank's share starts (a stream's rows are not numbered)."""
    return {s: shard_range(len(split), shard, unit)[0] for s, split in data.items()
            if not isinstance(split, BatchStreamSplit)}


def _placed(directions: AnyDirections, targets: list[torch.Tensor], dtype: torch.dtype,
            rows: Sequence[slice | None]) -> AnyDirections:
    """``directions`` on the targets' device in ``dtype``, in the targets' memory layout (so
    foreach stays fused on channels-last weights); of a sharded model, this rank's ``rows``."""
    if any(r is not None for r in rows):
        directions = directions.cut(rows)
    moved = directions.to(targets[0].device, dtype)
    return moved.like(targets) if isinstance(moved, Directions) else moved


class Evaluator:
    """Evaluates loss/accuracy of ``model`` at grid coordinates around its current weights θ*.

    Build it with :func:`evaluator`, which prepares the model and hands it back as it came.
    ``targets`` (named ``names``) are the tensors the directions move; they share storage with the
    model. θ* is copied once here, unless ``origin`` gives copies already made (the snapshot that
    hands the model back holds one; two would not fit a model that barely fits).

    Two paths give the same numbers: per point (weights written in place, one plain forward per
    batch) and stacked (``points_per_pass`` = K > 1: K perturbed weight sets, one ``vmap``-ed
    forward per batch). Which is faster depends on the model and device: :meth:`calibrate` measures.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        targets: list[torch.Tensor],
        directions: AnyDirections,
        batches: dict[str, Feed],
        loss_fn: LossFn,
        bn: str = "eval",
        points_per_pass: int = 1,
        amp: bool = False,
        hessian_iters: int = 0,
        metrics: Sequence[Metric] = METRICS,
        reduce: Reduce | None = None,
        output: str | None = None,
        origin: Sequence[torch.Tensor | None] | None = None,
        precision: Precision | None = None,
        row_offsets: dict[str, int] | None = None,
        rows: Sequence[slice | None] | None = None,
        curvature: tuple[nn.Module, Any, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.model = model.eval()
        self.output = output
        idx = [i for i, t in enumerate(targets) if t.is_floating_point()]
        self.names = [names[i] for i in idx]
        self.params = [targets[i] for i in idx]
        # θ*: a copy the caller already holds of a tensor (``origin``, read only), or a fresh one
        given = [origin[i] for i in idx] if origin is not None else [None] * len(idx)
        self.origin = [g if g is not None else t.detach().clone() for g, t in zip(given, self.params)]
        self.low_precision = is_low_precision(self.origin[0].dtype)
        self.idx, self.targets = idx, targets
        # a sharded model's: the rows of each whole tensor that this rank's targets are (lsurf.engine.model.sharding)
        self.rows = list(rows) if rows is not None else [None] * len(targets)
        self.sharded = any(r is not None for r in self.rows)
        self._hold(directions)
        self.batches = batches
        self.reduce = reduce
        self.loss_fn = loss_fn
        self.ignore_index = class_targets(loss_fn)  # None: the loss's targets are no class indices to check
        self.classes = 0  # outputs per sample, once a pass has seen them
        self.row_offsets = dict(row_offsets or {})  # the split's row of this rank's first (a shard's start)
        self.metrics = tuple(metrics)
        if bn not in ("eval", "recalibrate"):
            raise UserError(f"`bn` {bn!r}: expected eval or recalibrate")
        self.bn = bn
        if points_per_pass < 1:
            raise UserError(f"`points_per_pass` {points_per_pass}: must be at least 1")
        if points_per_pass > 1 and bn == "recalibrate":
            raise UserError("`points_per_pass` > 1 cannot be combined with `bn` recalibrate")
        if points_per_pass > 1 and not self.stackable:
            raise UserError("`points_per_pass` > 1 needs directions held in full precision: not with `regenerate` "
                            "or bfloat16 weights")
        self.points_per_pass = points_per_pass
        self.amp = amp  # bfloat16 autocast of the forward; losses are still reduced in float64
        if hessian_iters and points_per_pass > 1:
            raise UserError("`hessian_iters` evaluates one point at a time: drop `points_per_pass`")
        self.hessian_iters = hessian_iters  # Lanczos steps for λ_max, λ_min per point (0: none)
        self.sharded_curvature = curvature  # of a sharded model: the skeleton, group and filler it takes
        self._hold_precision(precision)

    def _hold_precision(self, precision: Precision | None) -> None:
        """Passes stopped early need one point per pass and the per-sample mean loss first."""
        self.precision = precision
        self.sizes: dict[str, int] = {}
        if precision is None:
            return
        if self.points_per_pass > 1:
            raise UserError("`tolerance` stops each point's pass on its own: drop `points_per_pass`")
        if not isinstance(self.metrics[0], MeanLoss):
            raise UserError("`tolerance` needs a per-sample mean loss: not for token targets")
        self.sizes = {s: sum(len(y) for _, y in feed) for s, feed in self.batches.items()}

    def _hold(self, directions: AnyDirections) -> None:
        """Take ``directions`` (already on the device): drawn again tensor by tensor at every point
        (2P memory), or held (4P); low-precision weights are perturbed in float32 one tensor at a time."""
        self.seeded = directions if isinstance(directions, SeededDirections) else None
        self.two = directions.y is not None
        self.d1 = None if self.seeded else [directions.x[i] for i in self.idx]
        self.d2 = None if self.seeded or directions.y is None else [directions.y[i] for i in self.idx]

    def with_directions(self, directions: AnyDirections) -> Evaluator:
        """The same evaluator (model, θ*, batches, plan) moving the weights along other directions
        (another plane of an ensemble), placed like the evaluator's own. This one is unchanged."""
        if directions.ndim != (2 if self.two else 1):
            raise UserError(f"the directions are {directions.ndim}-D but the evaluator's are {2 if self.two else 1}-D")
        twin = copy.copy(self)
        twin._hold(_placed(directions, self.targets, self.perturb_dtype, self.rows))
        if self.points_per_pass > 1 and not twin.stackable:
            raise UserError("`points_per_pass` > 1 needs directions held in full precision: not with `regenerate`")
        return twin

    def on_batches(self, batches: dict[str, Feed]) -> Evaluator:
        """The same evaluator (same model, θ*, directions) over other batches, alone (no group
        reduction): for calibration, which times a few batches without touching this evaluator's own."""
        twin = copy.copy(self)
        twin.batches, twin.reduce = batches, None
        return twin

    @property
    def perturb_dtype(self) -> torch.dtype:
        """The dtype of the directions and offsets: float32 for low-precision weights."""
        return torch.float32 if self.low_precision else self.origin[0].dtype

    @property
    def held_weights(self) -> int:
        """How many of the moved numbers this rank holds: all of them, or its shards' (1/G)."""
        return sum(p.numel() for p in self.params)

    @property
    def stackable(self) -> bool:
        """Whether K points can share a pass: the stacked path needs every direction held."""
        return self.seeded is None and not self.low_precision

    @torch.no_grad()
    def set_point(self, a: float, b: float) -> None:
        """Weights ← θ* + a·d₁ + b·d₂, in place (all tensors at once when the directions are held
        and the weights are full precision; else tensor by tensor, the same operations)."""
        if self.stackable:
            assert self.d1 is not None  # held directions
            torch._foreach_copy_(self.params, self.origin)
            if a != 0.0:
                torch._foreach_add_(self.params, self.d1, alpha=a)
            if self.d2 is not None and b != 0.0:
                torch._foreach_add_(self.params, self.d2, alpha=b)
            return
        for j, (p, o) in enumerate(zip(self.params, self.origin)):
            w = o.float() if self.low_precision else p.copy_(o)
            if a != 0.0:
                w.add_(self._direction(0, j, w), alpha=a)
            if self.two and b != 0.0:
                w.add_(self._direction(1, j, w), alpha=b)
            if self.low_precision:
                p.copy_(w)

    def _direction(self, which: int, j: int, like: torch.Tensor) -> torch.Tensor:
        if self.seeded is None:
            held = self.d1 if which == 0 else self.d2
            assert held is not None
            return held[j]
        return self.seeded.tensor(which, self.idx[j]).to(device=like.device, dtype=like.dtype)

    @property
    def quantities(self) -> list[str]:
        """Names of the values each point yields, e.g. ``train_loss``, ``test_acc_stderr``."""
        return Quantities.of(self.batches, self.metrics, self.hessian_iters > 0, self.precision is not None).names

    def evaluate(self, a: float, b: float = 0.0) -> dict[str, float]:
        """``{quantity: value}`` at (a, b), e.g. ``{"train_loss": 0.08, "train_acc": 97.9, ...}``."""
        return self.evaluate_many([(a, b)])[0]

    def evaluate_offset(self, delta: Sequence[torch.Tensor]) -> dict[str, float]:
        """``{quantity: value}`` at θ* + δ for any offset δ off the plane (one tensor per moved
        tensor, in the order of the directions' names): for sharpness and other probes."""
        return self.evaluate_offsets([delta])[0]

    def evaluate_held(self, delta: Sequence[torch.Tensor]) -> dict[str, float]:
        """``{quantity: value}`` at θ* + δ, δ given as this rank holds the moved tensors (one per
        entry of ``names``: of a sharded model, its rows), on their device in ``perturb_dtype``."""
        self._set_offset(list(delta))
        return self._results(1, self._measure())[0]

    def forward_at(self, weights: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model's forward with the moved tensors replaced by ``weights`` (held as this rank
        holds them, one per entry of ``names``), differentiable in them. Of a sharded model the rows
        are gathered whole through a differentiable all-gather (lsurf.engine.curvature.sharded:
        collective, so every rank of the group calls it as often) and run through its skeleton."""
        if not self.sharded:
            return lambda x: pick_output(torch.func.functional_call(self.model, dict(zip(self.names, weights)), (x,)),
                                         self.output)
        if self.sharded_curvature is None:
            raise UserError(_NO_SKELETON)
        skeleton, group, _ = self.sharded_curvature
        sizes = [self.model.get_parameter(n).shape[0] if r is not None else 0
                 for n, r in zip(self.names, (self.rows[i] for i in self.idx))]

        def forward(x: torch.Tensor) -> torch.Tensor:
            whole = {n: gather_rows(w, k, group) if k else w for n, w, k in zip(self.names, weights, sizes)}
            return pick_output(torch.func.functional_call(skeleton, whole, (x,)), self.output)
        return forward

    def evaluate_offsets(self, offsets: Iterable[Sequence[torch.Tensor]]) -> list[dict[str, float]]:
        """Results at θ* + δ for each offset δ (a geometry's points), ``points_per_pass`` per
        forward. ``offsets`` is consumed a pass at a time, so only one pass's offsets are on the
        device: a generator computing them keeps memory at K offsets however many points."""
        stream = iter(offsets)
        out: list[dict[str, float]] = []
        while chunk := [self._place(d) for d in itertools.islice(stream, self.points_per_pass)]:
            if len(chunk) > 1:
                pending = self._stacked_params(chunk)
            else:
                self._set_offset(chunk[0])
                pending = self._measure()
            out += self._results(len(chunk), pending)
        return out

    def _place(self, delta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """An offset's moved tensors on the weights' device, in the dtype they are perturbed in."""
        return [_rows_of(delta[i], self.rows[i]).to(device=o.device, dtype=self.perturb_dtype)
                for i, o in zip(self.idx, self.origin)]

    @torch.no_grad()
    def _set_offset(self, delta: list[torch.Tensor]) -> None:
        """Weights ← θ* + δ in place: the operations :meth:`set_point` does with a = 1, d₁ = δ, so
        a point reached either way has the same bits."""
        if not self.low_precision:
            torch._foreach_copy_(self.params, self.origin)
            torch._foreach_add_(self.params, delta, alpha=1.0)
            return
        for p, o, d in zip(self.params, self.origin, delta):
            p.copy_(o.float().add_(d, alpha=1.0))

    def evaluate_many(self, points: list[tuple[float, float]]) -> list[dict[str, float]]:
        """Results for each (a, b), ``points_per_pass`` points per forward pass."""
        out: list[dict[str, float]] = []
        for k in range(0, len(points), self.points_per_pass):
            chunk = points[k : k + self.points_per_pass]
            out += self._results(len(chunk), self._stacked(chunk) if len(chunk) > 1 else self._single(*chunk[0]))
        return out

    def _results(self, k: int, pending: torch.Tensor) -> list[dict[str, float]]:
        """The ``k`` points of one pass from its sums, read back in the pass's one host sync:
        [split][point][metric sums..., samples, label flags...]."""
        names = self.quantities
        local = pending.cpu().numpy()
        self._check_labels(local[:, 0, -FLAGS:])
        local = local[..., :-FLAGS]
        sums = local.tolist() if self.reduce is None else self.reduce(local).tolist()
        out = []
        for p in range(k):
            row = [v for split, s in zip(self.batches, sums) for v in self._split_row(split, s[p])]
            if self.hessian_iters:  # one point per pass: the weights are still set at it
                row += self._curvature()
            out.append(dict(zip(names, row)))
        return out

    def _split_row(self, split: str, sums: list[float]) -> list[float]:
        """A split's statistics from its sums [metric sums..., samples], and the accounting of a
        pass that may have stopped early."""
        row = self._statistics(sums[:-1], int(sums[-1]))
        if self.precision is not None:
            row += self.precision.accounting(sums[0], sums[1], int(sums[-1]), self.sizes[split])
        return row

    def _curvature(self) -> tuple[float, float]:
        """(λ_max, λ_min) of the first split's mean loss at the current weights, with the group's
        shares added as ``lsurf hessian`` adds them (one operator for both)."""
        batches = next(iter(self.batches.values()))
        loss = lambda out, y: self.loss_fn(pick_output(out, self.output), y)  # noqa: E731  # dict-like outputs too
        n = sum(len(x) for x, _ in batches)
        n = int(self.reduce(np.array([n], dtype=np.float64))[0]) if self.reduce is not None else n
        if self.sharded_curvature is not None:  # the shards at this point, gathered differentiably
            skeleton, group, filler = self.sharded_curvature
            h: Hessian = ShardedHessian.of(self.model, skeleton, batches, loss, n=n, group=group, filler=filler)
        else:
            h = Hessian(self.model, batches, loss, n=n, reduce=self.reduce)
        return h.extreme_eigenvalues(self.hessian_iters)

    def _single(self, a: float, b: float) -> torch.Tensor:
        self.set_point(a, b)
        return self._measure()

    def _measure(self) -> torch.Tensor:
        """One pass over every split at the weights as they are set."""
        if self.bn == "recalibrate":
            self._recalibrate_bn()
        forward = _autocast(self._forward) if self.amp else self._forward
        return torch.stack([self._pass(split, forward, 1) for split in self.batches])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return pick_output(self.model(x), self.output)

    def _stacked(self, chunk: list[tuple[float, float]]) -> torch.Tensor:
        a, b = _coefficients(chunk, self.origin[0].dtype, self.origin[0].device)
        params = {}
        assert self.d1 is not None  # the stacked path runs on held directions only
        for i, (name, o) in enumerate(zip(self.names, self.origin)):
            shape = (-1,) + (1,) * o.dim()
            w = o + a.view(shape) * self.d1[i]
            params[name] = w if self.d2 is None else w + b.view(shape) * self.d2[i]
        return self._vmapped(params, len(chunk))

    def _stacked_params(self, chunk: list[list[torch.Tensor]]) -> torch.Tensor:
        """K offsets' weight sets θ* + δₖ, stacked, through one ``vmap``-ed pass."""
        params = {name: o + torch.stack([d[i] for d in chunk])
                  for i, (name, o) in enumerate(zip(self.names, self.origin))}
        return self._vmapped(params, len(chunk))

    def _vmapped(self, params: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Sums of every split for the K weight sets ``params`` (each (K, ...)), one forward per batch."""
        def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return pick_output(torch.func.functional_call(self.model, p, (x,)), self.output)

        batched = torch.vmap(forward, in_dims=(0, None))
        stacked = lambda x: batched(params, x)  # noqa: E731
        forward_k = _autocast(stacked) if self.amp else stacked
        return torch.stack([self._pass(split, forward_k, k) for split in self.batches])

    def _check_labels(self, flags: np.ndarray) -> None:
        """Stop at class labels outside the model's outputs: each split's [count, row, value] of
        the pass just read back (rows counted from the rank's first, in the order of the pass)."""
        for split, found in zip(self.batches, flags.tolist()):
            check_label_flags(split, found, self.classes, self.row_offsets.get(split, 0))

    def _pass(self, split: str, forward, k: int) -> torch.Tensor:
        """Sums [metric sums..., samples] over all batches of ``split`` for the ``k`` weight sets that
        ``forward`` evaluates, and the pass's label flags [count, row, value] (see :meth:`_safe_labels`):
        (k, Σ widths + 1 + 3), float64, left on the device.

        ``forward(x)`` returns (B, ...) outputs, or (k, B, ...) when k > 1. They are gathered and
        reduced (loss, argmax) a few million values at a time rather than per batch: for small models
        the per-batch loss calls cost as much as the forward itself (an MLP on digits: 1.8x the bare pass).
        """
        with without_grad(self.sharded):
            return self._sums(split, forward, k)

    def _sums(self, split: str, forward, k: int) -> torch.Tensor:
        width = sum(m.width for m in self.metrics) + 1
        sums = torch.zeros(k, width, dtype=torch.float64, device=self.origin[0].device)  # a shard may be empty
        outs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        flags = torch.zeros(FLAGS, dtype=torch.int64, device=sums.device)
        held = row = 0
        early = self.precision
        for x, y in self.batches[split]:
            outs.append(forward(x))
            ys.append(y)
            held += outs[-1].numel()
            if held >= _REDUCE_EVERY or early is not None:
                sums += self._reduce(outs, ys, k, flags, row)
                row += sum(len(t) for t in ys)
                outs, ys, held = [], [], 0
                if early is not None:  # one host synchronisation per batch: the price of stopping early
                    total, squares, *_, n = sums[0].tolist()
                    if early.settled(total, squares, int(n), self.sizes[split]):
                        break
        if outs:
            sums += self._reduce(outs, ys, k, flags, row)
        return torch.cat([sums, flags.double().expand(k, FLAGS)], -1)

    def _reduce(self, outs: list[torch.Tensor], ys: list[torch.Tensor], k: int, flags: torch.Tensor,
                row: int) -> torch.Tensor:
        """Every metric's sums over (k, B, ...) outputs against B targets (rows ``row``... of the
        pass), and B: (k, Σ widths + 1)."""
        stacked = int(k > 1)
        out = torch.cat(outs, stacked) if len(outs) > 1 else outs[0]
        out = out if stacked else out[None]
        out = out.float() if is_low_precision(out.dtype) else out
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = self._safe_labels(out, y, flags, row)
        yk = y if k == 1 else y.repeat(k, *([1] * (y.dim() - 1)))
        per = self.loss_fn(out.flatten(0, 1), yk)
        loss = per.view(k, len(y), *per.shape[1:]).double()  # per sample (k, B) or per token (k, B, T)
        count = torch.full((k, 1), float(len(y)), dtype=torch.float64, device=loss.device)
        return torch.cat([*(m.sums(out, y, loss) for m in self.metrics), count], -1)

    def _safe_labels(self, out: torch.Tensor, y: torch.Tensor, flags: torch.Tensor, row: int) -> torch.Tensor:
        """``y`` with class labels outside the (k, B, ..., C) outputs counted into ``flags`` and
        replaced by 0 (:func:`flag_labels`): the check waits for the pass's one host sync. Only
        for the built-in cross-entropy, whose targets are class indices."""
        if self.ignore_index is None or y.is_floating_point() or out.dim() != y.dim() + 2 or not y.numel():
            return y
        self.classes = out.shape[-1]
        return flag_labels(y, self.classes, self.ignore_index, flags, row)

    def _statistics(self, sums: list[float], n: int) -> list[float]:
        """Each metric's statistics of ``n`` samples from its slice of the sums (plain floats: on a
        few numbers per point, numpy's per-call cost was 3 % of a small MLP's pass)."""
        row: list[float] = []
        k = 0
        for m in self.metrics:
            row += m.finish(sums[k : k + m.width], n)
            k += m.width
        return row

    def calibrate(self, candidates: tuple[int, ...] | None = None, n_batches: int = 2, repeats: int = 3,
                  points: int | None = None, log=None) -> int:
        """Time a few batches per point on each path and keep the fastest ``points_per_pass``.

        Candidates are K = 1, 2, 4, 8, 16, and on a GPU (where stacking amortises kernel launches
        and keeps paying longer) 32 and 64; a K that runs out of memory ends the search.

        Each candidate's best of ``repeats`` counts, K grows only while it keeps paying, and the
        stacked path must win by 10 % to be chosen, so timing noise does not pick a slower path.
        With ``points`` (how many the run will evaluate) calibration is budgeted at 3 % of the run:
        a candidate is timed only if its cost, estimated from the best time so far, still fits, so a
        short run is not calibrated at all and stays on the per-point path. BatchNorm recalibration
        and curvature maps evaluate one point at a time: nothing to choose. The timings run on
        evaluators over a few batches (:meth:`on_batches`); this one's batches are never touched.
        """
        if candidates is None:
            candidates = (1, 2, 4, 8, 16) + ((32, 64) if self.origin[0].is_cuda else ())
        if candidates[0] != 1:
            raise ValueError(f"calibration candidates must start with 1, the per-point baseline: {candidates}")
        self.points_per_pass = 1
        self.calibration_stop = ""  # why the search for K stopped early, if it did (logged)
        if self.bn == "recalibrate" or self.hessian_iters or self.precision or not self.stackable:
            return 1
        first_feed = next(iter(self.batches.values()))
        all_batches = sum(len(b) for b in self.batches.values())
        first = head(first_feed, n_batches)
        n_batches = len(first)
        # The least calibration that decides anything: the first two candidates, warm-up and repeats,
        # four calls for the estimates below. Each call costs at least its share of a point's batches.
        least = ((1 + repeats) * sum(candidates[:2]) + 4) * n_batches / all_batches
        timings: dict[int, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "slow fallback" notes: the timing says what matters
            if points is None or least <= 0.03 * points:
                start, budget, unit = time.perf_counter(), None, 0.0
                if points is not None:
                    unit, whole = self._seconds_per_point(first, n_batches, all_batches)
                    budget = 0.03 * points * whole
                probe = self.on_batches({"calibration": first[:n_batches]})
                timings = probe._time_candidates(candidates, repeats, budget, start, unit)
                self.calibration_stop = probe.calibration_stop
        best = min(timings, key=timings.__getitem__, default=1)
        self.points_per_pass = best if timings and timings[best] < 0.9 * timings[1] else 1
        if log and timings:
            shown = ", ".join(f"K={k}: {1e3 * t:.2f} ms" for k, t in timings.items())
            stop = f"; stopped: {self.calibration_stop}" if self.calibration_stop else ""
            log(f"calibration (per point, {n_batches} batches): {shown}{stop} -> points per pass "
                f"{self.points_per_pass}")
        elif log:
            log(f"calibration skipped: {points} points are too few to pay for it -> points per pass 1")
        return self.points_per_pass

    def _seconds_per_point(self, first: list, n_batches: int, all_batches: int) -> tuple[float, float]:
        """(seconds of a K=1 call on ``n_batches`` batches, estimated seconds of a whole point), from
        calls on one and on ``n_batches`` batches: scaling the second alone would overcount per-call
        costs (reductions, host sync)."""
        one_batch = self.on_batches({"calibration": first[:1]})
        one_batch.evaluate_many([(0.0, 0.0)])  # warm-up
        one = _seconds(one_batch.evaluate_many, [(0.0, 0.0)])
        if n_batches == 1:
            return one, one * all_batches
        some = _seconds(self.on_batches({"calibration": first[:n_batches]}).evaluate_many, [(0.0, 0.0)])
        per_batch = max(some - one, 0.0) / (n_batches - 1)
        return some, max(some, one + (all_batches - 1) * per_batch)

    def _time_candidates(self, candidates: tuple[int, ...], repeats: int, budget: float | None,
                         start: float, unit: float) -> dict[int, float]:
        """Seconds per point for each K, stopping where K stops paying or cannot run, or before a
        candidate whose warm-up and repeats would take the seconds spent since ``start`` past ``budget``
        (``unit``: a first look at seconds per point, until K=1 is timed)."""
        timings: dict[int, float] = {}
        device = self.origin[0].device
        cuda = device.type == "cuda"
        for i, k in enumerate(candidates):
            # Warm-up and repeats at the best per-point time so far; the first candidate alone decides nothing.
            needed = (1 + repeats) * (sum(candidates[:2]) if i == 0 else k) * min(timings.values(), default=unit)
            if budget is not None and time.perf_counter() - start + needed > budget:
                break
            pts = [(0.0, 0.0)] * k
            self.points_per_pass = k
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                warm = _seconds(self.evaluate_many, pts) / k  # warm-up (allocations, vmap tracing)
                # On a GPU the first call at a new K also picks cuDNN plans: its time says nothing yet.
                if not cuda and timings and warm > 3 * min(timings.values()) and warm * k > 0.2:
                    break  # hopeless and slow to time: do not spend seconds proving it
                timings[k] = min(_seconds(self.evaluate_many, pts) for _ in range(repeats)) / k
            except (RuntimeError, MemoryError) as e:  # out of memory, or an op vmap cannot batch
                self.calibration_stop = f"K={k} failed: {' '.join(str(e).split())[:200]}"
                break
            if cuda and torch.cuda.max_memory_allocated(device) > _GPU_HEADROOM * torch.cuda.mem_get_info(device)[1]:
                del timings[k]  # it ran, but too close to the card's limit to run for hours
                self.calibration_stop = f"K={k} used more than {_GPU_HEADROOM:.0%} of the GPU's memory"
                break
            if timings[k] > 1.2 * min(timings.values()):
                break  # larger K only gets slower where stacking does not pay (e.g. convs on a CPU)
        return timings

    @torch.no_grad()
    def _recalibrate_bn(self) -> None:
        """Re-estimate BatchNorm running statistics on the training batches at this point: their
        cumulative average, with momentum 1/(i+1) at batch i — what ``momentum=None`` computes, bit for
        bit, without reading the batch counter back from the device at every layer and batch. In a
        group each rank averages its whole batches (an empty one, a sharded rank's filler, changes
        nothing) and the group weighs the ranks' averages by their counts: the one process's average."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
        self.model.train()
        seen = 0
        for x, _ in self.batches.get("train") or next(iter(self.batches.values())):
            for m in bns:
                m.momentum = 1.0 / (seen + 1)
            self.model(x)
            seen += len(x) > 0
        self.model.eval()
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        if self.reduce is not None:
            self._pool_statistics([m for m in bns if m.running_mean is not None], seen)

    def _pool_statistics(self, bns: list[nn.modules.batchnorm._BatchNorm], seen: int) -> None:
        """The group's running statistics: each rank's averages over its ``seen`` batches, weighted."""
        assert self.reduce is not None
        stats = [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
        local = torch.cat([t.double().flatten() * seen for t in stats]).cpu().numpy()
        pooled = self.reduce(np.concatenate([local, [seen]]))
        total = torch.from_numpy(pooled[:-1] / max(pooled[-1], 1.0))
        for t, part in zip(stats, total.split([t.numel() for t in stats])):
            t.copy_(part.view_as(t))
        for m in bns:
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(pooled[-1]))


def _rows_of(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _coefficients(chunk: list[tuple[float, float]], dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's α and β as two tensors on ``device``: built on the host and sent in one copy,
    on a GPU from pinned memory without waiting (``torch.tensor(list, device=cuda)`` copies from
    pageable memory and waits for it: two host synchronisations per stacked pass)."""
    host = torch.tensor([[p[0] for p in chunk], [p[1] for p in chunk]], dtype=dtype)
    if device.type == "cuda":  # the caching host allocator keeps the pinned block until the copy is done
        host = host.pin_memory().to(device, non_blocking=True)
    return host[0], host[1]


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _autocast(forward):
    """``forward`` under bfloat16 autocast, its outputs back in float32 for the reductions."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return forward(x).float()
    return run
