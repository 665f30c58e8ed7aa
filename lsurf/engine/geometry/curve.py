"""Mode connectivity (Garipov et al. 2018): a curve θ(t), t ∈ [0, 1], from a trained model θ_A = θ(0)
to another θ_B = θ(1), whose K bends are trained so that the loss stays low all along it.

The curve lives beside the model, over its parameter dict: a point of it is one tensor per
parameter (``named_parameters`` order), and a forward at a point is ``torch.func.functional_call``
with those tensors, so no layer is rewritten and any module lsurf loads has curves. Buffers
(BatchNorm running statistics) are not part of the curve.

Two shapes: a Bezier curve of degree K + 1 in the Bernstein basis (K = 1: the quadratic
(1−t)²θ_A + 2t(1−t)θ_1 + t²θ_B), and a polygonal chain through θ_A, θ_1..θ_K, θ_B at equally
spaced t. This module is the curve's geometry (its points, its plane); training is
lsurf.engine.training.curve, the file lsurf.engine.formats.curve_file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from lsurf.errors import UserError

CurveType = Literal["bezier", "polychain"]
CURVE_TYPES: tuple[str, ...] = get_args(CurveType)


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


def dot(u: list[torch.Tensor], v: list[torch.Tensor]) -> float:
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
    c = dot(v, d1) / dot(d1, d1)
    d2 = [x - c * y for x, y in zip(v, d1)]
    if dot(d2, d2) <= 1e-12 * dot(v, v):
        raise UserError("the curve is straight (its bend lies on the line from A to B): it spans no plane")
    return d1, d2


@torch.no_grad()
def coordinates(offsets: list[list[torch.Tensor]], d1: list[torch.Tensor], d2: list[torch.Tensor]) -> np.ndarray:
    """(α, β) of each offset from A along orthogonal ``d1``, ``d2``: one row per offset."""
    n1, n2 = dot(d1, d1), dot(d2, d2)
    return np.array([[dot(off, d1) / n1, dot(off, d2) / n2] for off in offsets])


def project(curve: Curve, d1: list[torch.Tensor], d2: list[torch.Tensor], ts: list[float]) -> np.ndarray:
    """The curve drawn on a plane around A: (α, β) of θ(t) − A for each t (a 1-bend Bezier lies
    exactly in its own plane)."""
    return coordinates([curve.offset(t) for t in ts], d1, d2)


def bend_coordinates(curve: Curve, d1: list[torch.Tensor], d2: list[torch.Tensor]) -> tuple[float, float]:
    """Where :func:`plane_point` lies on the plane (β = 1 on the curve's own plane)."""
    x, y = coordinates([[p - a for p, a in zip(plane_point(curve), curve.a)]], d1, d2)[0]
    return float(x), float(y)
