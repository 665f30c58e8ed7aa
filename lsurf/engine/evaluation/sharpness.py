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
from lsurf.engine.evaluation.losses import pick_output
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


def ascend(objective: Objective, start: Tensors, radius: float, steps: int) -> Tensors:
    """The best of ``steps`` + 1 iterates of projected normalised-gradient ascent in the ball |u| ≤ ρ.

    Each step moves to u ← ρ·g/|g|, where g is the gradient at the current u: the point of the ball
    that maximises the loss's linearisation there (projected gradient ascent with an unbounded step,
    SAM's ascent step repeated). For a convex loss every step is an ascent, since
    L(v) ≥ L(u) + gᵀ(v − u) ≥ L(u); on a quadratic ½uᵀMu it is power iteration on M, which converges
    to ρ·v_max, the maximiser, with value error shrinking like (λ₂/λ₁)^(2k). The best iterate is
    kept, so a non-convex loss that makes the iterates oscillate still gives its best point.
    """
    u, best_u, best = start, start, -math.inf
    for k in range(steps + 1):
        last = k == steps
        value, g = objective(u, not last)
        if value > best:
            best_u, best = u, value
        norm = 0.0 if last else global_norm(g)
        if norm == 0.0 or not math.isfinite(norm):  # the last iterate, or a critical point: nowhere to go
            break
        u = [t * (radius / norm) for t in g]
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
    """

    def __init__(self, ev: Evaluator, split: str, radius: float, adaptive: bool = False, seed: int = 0):
        self.ev, self.split, self.radius, self.seed = ev, split, radius, seed
        self.dtype = ev.perturb_dtype  # what offsets are computed in
        self.scale = [o.to(self.dtype).abs() for o in ev.origin] if adaptive else None
        self.batches = ev.batches[split]
        self.n = sum(len(y) for _, y in self.batches)
        self.centre = ev.evaluate(0.0)[f"{split}_loss"]

    def sphere(self, index: int) -> Tensors:
        """Draw ``index``: a Gaussian per tensor from (seed, 2 + index, tensor index), drawn on the CPU
        and scaled jointly to norm ρ (uniform on the sphere), then moved to the device."""
        parts = [torch.randn(o.shape, generator=tensor_generator(self.seed, _FIRST_DRAW + index, i), dtype=self.dtype)
                 for i, o in zip(self.ev.idx, self.ev.origin)]
        factor = self.radius / global_norm(parts)
        return [(p * factor).to(o.device) for p, o in zip(parts, self.ev.origin)]

    def offset(self, u: Tensors) -> Tensors:
        """δ for coordinates u: u itself, or |θ*| ⊙ u when adaptive (also maps gradients in δ to u)."""
        return u if self.scale is None else [s * t for s, t in zip(self.scale, u)]

    def rise(self, delta: Tensors) -> float:
        """L(θ* + δ) − L(θ*), the loss as the evaluator reports it."""
        full: list[torch.Tensor] = [torch.empty(0)] * (self.ev.idx[-1] + 1)  # indexed as the targets
        for i, d in zip(self.ev.idx, delta):
            full[i] = d
        return self.ev.evaluate_offset(full)[f"{self.split}_loss"] - self.centre

    def average(self, index: int) -> float:
        """The rise at draw ``index`` of the (adaptive) sphere."""
        return self.rise(self.offset(self.sphere(index)))

    def worst(self, index: int, steps: int) -> float:
        """The rise at the best point of a ``steps``-step ascent started at draw ``index``."""
        return self.rise(self.offset(ascend(self._objective, self.sphere(index), self.radius, steps)))

    def _objective(self, u: Tensors, grad: bool) -> tuple[float, Tensors]:
        value, g = self.loss_and_gradient(self.offset(u), grad)
        return value, self.offset(g)  # ∂L(θ* + s⊙u)/∂u = s ⊙ ∇L

    def loss_and_gradient(self, delta: Tensors, grad: bool = True) -> tuple[float, Tensors]:
        """The mean per-sample loss over the split's batches at θ* + δ and its gradient in δ (empty
        without ``grad``), batch by batch. Token losses are summed per sequence: a constant multiple of
        the token mean, which changes neither the ascent's direction nor which iterate is best."""
        ev = self.ev
        ws = [(o.to(d.dtype) + d).to(o.dtype).requires_grad_(grad) for o, d in zip(ev.origin, delta)]
        grads = [torch.zeros_like(d) for d in delta] if grad else []
        total = 0.0
        with torch.set_grad_enabled(grad):
            for x, y in self.batches:
                out = pick_output(torch.func.functional_call(ev.model, dict(zip(ev.names, ws)), (x,)), ev.output)
                loss = ev.loss_fn(out.float() if ev.low_precision else out, y).sum() / self.n
                total += float(loss.detach())
                if grad:
                    parts = torch.autograd.grad(loss, ws, allow_unused=True)
                    for acc, p in zip(grads, parts):
                        if p is not None:
                            acc += p.to(acc.dtype)
        return total, grads
