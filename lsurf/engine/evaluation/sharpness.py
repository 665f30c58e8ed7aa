"""Sharpness of the loss at the centre θ*: how much the loss of one split can rise within a ball of
radius ρ around θ* (pure torch; the run layer deals samples and restarts to MPI ranks).

* average-case: L(θ* + δ) − L(θ*) for δ uniform on the sphere of radius ρ, in the space of all
  perturbed tensors jointly; its mean over N draws estimates E_δ, and sd/√N is its standard error.
* worst-case: max over the ball of L(θ* + δ) − L(θ*), by projected gradient ascent from random
  points of the sphere (see :func:`ascend`), the best of a few restarts.
* adaptive (scale-invariant, Kwon et al. 2021 "ASAM", Andriushchenko et al. 2023): the ball is taken
  in the coordinates u of δ = |θ*| ⊙ u, |u| ≤ ρ, so rescaling a layer does not change the value.

The perturbed tensors are the floating-point tensors the evaluator moves (``target_tensors`` of
``dir_type``: every parameter, biases and norm gains included, or the whole state dict). Every
random draw is a function of (seed, sample or restart index, tensor index) alone, drawn on the CPU,
so the values do not depend on the device, the number of MPI ranks or which rank computes them.
Values are the evaluator's ``{split}_loss`` (the loss a surface reports), so they agree with a
surface through the same points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lsurf.engine.evaluation.evaluate import Evaluator
from lsurf.engine.geometry.directions import tensor_generator
from lsurf.errors import UserError

KINDS = ("average", "worst")
Tensors = list[torch.Tensor]
# The ascent's objective: (u, whether the gradient is needed) -> (loss at u, its gradient in u)
Objective = Callable[[Tensors, bool], tuple[float, Tensors]]
# tensor_generator's ``which`` of sample/restart 0: 0 and 1 are a surface's x and y directions
_FIRST_DRAW = 2


@dataclass(frozen=True)
class SharpnessSpec:
    """What ``lsurf sharpness`` measures within ``radius`` ρ of θ*: ``kind`` average (``samples``
    draws on the sphere) or worst (``restarts`` ascents of ``steps`` steps), in |θ*|-scaled
    coordinates with ``adaptive``. Refused on construction, naming the setting, where it would
    give no value or a meaningless one."""

    radius: float
    kind: str = "average"
    adaptive: bool = False
    samples: int = 100
    steps: int = 20
    restarts: int = 3

    def __post_init__(self) -> None:
        r = self.radius
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r):
            raise UserError(f"`radius` {r!r}: must be a positive number")
        if self.kind not in KINDS:
            raise UserError(f"`kind` {self.kind!r}: expected {' or '.join(KINDS)}")
        for name in ("samples", "steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"`{name}` {value!r}: must be a whole number, at least 1")

    @property
    def settings(self) -> str:
        """The settings of its kind, for people: "100 samples", "3 restarts x 20 steps"."""
        return f"{self.samples} samples" if self.kind == "average" else f"{self.restarts} restarts x {self.steps} steps"

    @property
    def count(self) -> int:
        """Draws (average) or restarts (worst): the independent pieces of work."""
        return self.samples if self.kind == "average" else self.restarts


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The Euclidean norm of all tensors taken as one vector (in float64: no overflow, no drift)."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def ascend(objective: Objective, start: Tensors, radius: float, steps: int,
           norm: Callable[[Sequence[torch.Tensor]], float] = global_norm) -> Tensors:
    """The best of ``steps`` + 1 iterates of projected normalised-gradient ascent in the ball |u| ≤ ρ.

    Each step moves to u ← ρ·g/|g|, where g is the gradient at the current u: the point of the ball
    that maximises the loss's linearisation there (projected gradient ascent with an unbounded step,
    SAM's ascent step repeated). For a convex loss every step is an ascent, since
    L(v) ≥ L(u) + gᵀ(v − u) ≥ L(u); on a quadratic ½uᵀMu it is power iteration on M, which converges
    to ρ·v_max, the maximiser, with value error shrinking like (λ₂/λ₁)^(2k). The best iterate is
    kept, so a non-convex loss that makes the iterates oscillate still gives its best point.
    ``norm``: of tensors held by rows over a group, the group's.
    """
    u, best_u, best = start, start, -math.inf
    for k in range(steps + 1):
        last = k == steps
        value, g = objective(u, not last)
        if value > best:
            best_u, best = u, value
        size = 0.0 if last else norm(g)
        if size == 0.0 or not math.isfinite(size):  # the last iterate, or a critical point: nowhere to go
            break
        u = [t * (radius / size) for t in g]
    return best_u


def summarise(values: Sequence[float], kind: str) -> tuple[float, float]:
    """(sharpness, its standard error): for ``average`` the mean and sd/√N (0 for one sample); for
    ``worst`` the largest value and 0 — a maximum has no sampling error to estimate, and the spread
    of the restarts is kept in the per-restart values instead."""
    v = np.asarray(values, dtype=np.float64)
    if kind == "worst":
        return float(v.max()), 0.0
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


class Probe:
    """Loss rises L(θ* + δ) − L(θ*) on one split of an :class:`Evaluator` (built around θ*), for
    perturbations drawn from (``seed``, index) on the sphere of radius ``radius``, in the adaptive
    coordinates u (δ = |θ*| ⊙ u) with ``adaptive``.

    The evaluator's weights are rewritten from θ* at every value; gradients are taken through a
    functional call on θ* + δ, never by writing the model, so nothing needs restoring in between.
    In a rank group the split's sums and gradients are the group's; of a sharded model every
    tensor here is this rank's rows, drawn whole and cut, its norms the group's.
    """

    def __init__(self, ev: Evaluator, split: str, radius: float, adaptive: bool = False, seed: int = 0):
        self.ev, self.split, self.radius, self.seed = ev, split, radius, seed
        self.dtype = ev.perturb_dtype  # what offsets are computed in
        self.scale = [o.to(self.dtype).abs() for o in ev.origin] if adaptive else None
        self.batches = ev.batches[split]
        self.n = int(self._group_sum([sum(len(y) for _, y in self.batches)])[0])
        self.centre = ev.evaluate(0.0)[f"{split}_loss"]

    def _group_sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return values if self.ev.reduce is None else np.asarray(self.ev.reduce(values))

    def norm(self, tensors: Sequence[torch.Tensor]) -> float:
        """The norm of all tensors as one vector: of rows held over a group, the group's."""
        if not self.ev.sharded:
            return global_norm(tensors)
        rows = [self.ev.rows[i] is not None for i in self.ev.idx]
        squares = [float(t.double().square().sum()) for t in tensors]
        held = sum(q for q, r in zip(squares, rows) if r)  # this rank's rows: the group adds them
        return math.sqrt(float(self._group_sum([held])[0]) + sum(q for q, r in zip(squares, rows) if not r))

    def sphere(self, index: int) -> Tensors:
        """Draw ``index``: a Gaussian per tensor from (seed, 2 + index, tensor index), drawn whole on
        the CPU and scaled jointly to norm ρ (uniform on the sphere), then this rank's rows of it
        moved to the device."""
        parts: Tensors = []
        squares = 0.0
        for name, i, o in zip(self.ev.names, self.ev.idx, self.ev.origin):
            rows = self.ev.rows[i]
            shape = o.shape if rows is None else self.ev.model.get_parameter(name).shape
            whole = torch.randn(shape, generator=tensor_generator(self.seed, _FIRST_DRAW + index, i), dtype=self.dtype)
            squares += float(whole.double().square().sum())
            parts.append(whole if rows is None else whole[rows])
        factor = self.radius / math.sqrt(squares)
        return [(p * factor).to(o.device) for p, o in zip(parts, self.ev.origin)]

    def offset(self, u: Tensors) -> Tensors:
        """δ for coordinates u: u itself, or |θ*| ⊙ u when adaptive (also maps gradients in δ to u)."""
        return u if self.scale is None else [s * t for s, t in zip(self.scale, u)]

    def rise(self, delta: Tensors) -> float:
        """L(θ* + δ) − L(θ*), the loss as the evaluator reports it."""
        return self.ev.evaluate_held(delta)[f"{self.split}_loss"] - self.centre

    def average(self, index: int) -> float:
        """The rise at draw ``index`` of the (adaptive) sphere."""
        return self.rise(self.offset(self.sphere(index)))

    def worst(self, index: int, steps: int) -> float:
        """The rise at the best point of a ``steps``-step ascent started at draw ``index``."""
        return self.rise(self.offset(ascend(self._objective, self.sphere(index), self.radius, steps, self.norm)))

    def _objective(self, u: Tensors, grad: bool) -> tuple[float, Tensors]:
        value, g = self.loss_and_gradient(self.offset(u), grad)
        return value, self.offset(g)  # ∂L(θ* + s⊙u)/∂u = s ⊙ ∇L

    def loss_and_gradient(self, delta: Tensors, grad: bool = True) -> tuple[float, Tensors]:
        """The mean per-sample loss over the split's batches at θ* + δ and its gradient in δ (empty
        without ``grad``), batch by batch, the group's. Token losses are summed per sequence: a
        constant multiple of the token mean, which changes neither the ascent's direction nor which
        iterate is best. A sharded rank runs the one-sample filler where its batches are empty (its
        loss counted zero): the gathers are collective."""
        ev = self.ev
        ws = [(o.to(d.dtype) + d).to(o.dtype).requires_grad_(grad) for o, d in zip(ev.origin, delta)]
        forward = ev.forward_at(ws)
        filler = ev.sharded_curvature[2] if ev.sharded_curvature is not None else None
        grads = [torch.zeros_like(d) for d in delta] if grad else []
        total = 0.0
        with torch.set_grad_enabled(grad):
            for x, y in self.batches:
                empty = len(x) == 0 and filler is not None
                if filler is not None and empty:
                    x, y = filler
                out = forward(x)
                loss = ev.loss_fn(out.float() if ev.low_precision else out, y).sum()
                loss = loss * 0.0 if empty else loss / self.n
                total += float(loss.detach())
                if grad:
                    parts = torch.autograd.grad(loss, ws, allow_unused=True)
                    for acc, p in zip(grads, parts):
                        if p is not None:
                            acc += p.to(acc.dtype)
        return self._group_total(total, grads)

    def _group_total(self, total: float, grads: Tensors) -> tuple[float, Tensors]:
        """The group's loss and gradient from this rank's shares (a sharded rank's gradient rows are
        the group's already: the gathers' backward added them; tensors it holds whole are added here)."""
        if self.ev.reduce is None:
            return total, grads
        shares = [k for k, i in enumerate(self.ev.idx) if self.ev.rows[i] is None] if grads else []
        summed = self._group_sum(np.concatenate([[total], *(grads[k].double().flatten().cpu().numpy()
                                                             for k in shares)]))
        out = list(grads)
        for k, part in zip(shares, torch.from_numpy(summed[1:]).split([grads[k].numel() for k in shares])):
            out[k] = part.view_as(grads[k]).to(grads[k])
        return float(summed[0]), out
