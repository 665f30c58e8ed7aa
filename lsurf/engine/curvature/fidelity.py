"""Projection fidelity: how much of the Hessian's curvature a sampled plane sees.

A random plane is one draw, and random directions almost never point where the curvature is
extreme (Böttcher & Wheeler 2022): a picture can look flat at a saddle. So next to every plane we
record what its axes see — the Rayleigh quotient dᵀHd/|d|² of each direction, i.e. the curvature
per unit length along it — beside the Hessian's extremes λ_max, λ_min and its mean eigenvalue
tr(H)/n (Hutchinson's estimate, with its standard error), all at the centre. The surface's own
second differences at the centre, per unit length, are the same quotient measured the other way
(exactly so for a quadratic loss), and show whether the grid is fine enough to resolve it.

A quotient near the mean eigenvalue is what an isotropic random direction sees on average: the
plane is *typical*. Far above it the plane is *sharp-biased* (a Hessian plane is, by design), far
below *flat-biased*. Only parameters enter the quotient: a state-dict direction's components on
buffers (BatchNorm running statistics) are not curvature of the weights and are left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from lsurf.engine.curvature.hessian import Hessian
from lsurf.engine.geometry.directions import AnyDirections

# A plane's quotient within this factor of the mean eigenvalue is typical; beyond it biased.
TYPICAL_FACTOR = 3.0
# Hessian-vector products a fidelity check spends, besides one per direction.
LANCZOS_STEPS, TRACE_SAMPLES = 20, 10
# One Hessian-vector product (gradient with a graph, then its gradient) costs about this many
# forward passes over the same data: what the automatic choice weighs against the run.
PASSES_PER_PRODUCT = 5.0


@dataclass(frozen=True)
class Fidelity:
    """What the planes of one surface see of the Hessian at its centre (JSON in the file's
    ``fidelity`` attribute). ``quotients`` and ``norms2`` hold (x, y) per plane (y None on a curve)."""

    split: str
    lambda_max: float
    lambda_min: float
    mean_eigenvalue: float
    mean_eigenvalue_stderr: float
    parameters: int
    quotients: list[tuple[float, float | None]]
    norms2: list[tuple[float, float | None]]
    lanczos_steps: int
    trace_samples: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def only(self, plane: int) -> Fidelity:
        """What plane ``plane`` of an ensemble sees, as the fidelity of a single-plane surface."""
        return replace(self, quotients=[self.quotients[plane]], norms2=[self.norms2[plane]])

    @classmethod
    def from_json(cls, text: str) -> Fidelity:
        raw = json.loads(text)
        raw["quotients"] = [tuple(q) for q in raw["quotients"]]
        raw["norms2"] = [tuple(n) for n in raw["norms2"]]
        return cls(**raw)


def quotient(h: Hessian, v: torch.Tensor) -> tuple[float, float]:
    """(vᵀHv/|v|², |v|²); a zero direction sees no curvature (0, 0)."""
    norm2 = h.dot(v, v)
    return (h.dot(v, h.hvp(v)) / norm2 if norm2 > 0 else 0.0), norm2


def measure(h: Hessian, model: nn.Module, planes: Sequence[AnyDirections], split: str, seed: int = 0,
            steps: int = LANCZOS_STEPS, samples: int = TRACE_SAMPLES) -> Fidelity:
    """The fidelity of ``planes`` at the model's current weights: one short Lanczos run for the
    extremes, Hutchinson for the mean eigenvalue, one product per direction."""
    lam_max, lam_min = h.extreme_eigenvalues(steps, seed=seed)
    trace, stderr = h.trace_and_error(samples, seed)
    quotients, norms = [], []
    for d in planes:
        qx, nx = quotient(h, h.flat(model, d.names, d.x))
        qy, ny = quotient(h, h.flat(model, d.names, d.y)) if d.y is not None else (None, None)
        quotients.append((qx, qy))
        norms.append((nx, ny))
    # Every Rayleigh quotient lies in [λ_min, λ_max]: a short Lanczos run that has not yet reached
    # an extreme a direction (e.g. a Hessian plane's) already shows is tightened by it.
    seen = [q for pair in quotients for q in pair if q is not None]
    lam_max, lam_min = max([lam_max, *seen]), min([lam_min, *seen])
    return Fidelity(split, lam_max, lam_min, trace / h.size, stderr / h.size, h.size, quotients, norms, steps, samples)


def relative_cost(products: int, hessian_samples: int, points: int, samples_per_point: int) -> float:
    """A fidelity check's cost as a fraction of the run's: ``products`` Hessian-vector products
    over ``hessian_samples`` against ``points`` passes over ``samples_per_point`` (all splits)."""
    return PASSES_PER_PRODUCT * products * hessian_samples / max(1, points * samples_per_point)


def verdict(q: float, mean: float) -> str:
    """``typical``, ``sharp-biased`` or ``flat-biased``: the quotient against the mean eigenvalue."""
    if mean <= 0:
        return "sharp-biased" if q > 0 else "typical"
    if q > TYPICAL_FACTOR * mean:
        return "sharp-biased"
    return "flat-biased" if q < mean / TYPICAL_FACTOR else "typical"


def centre_curvature(x: np.ndarray, y: np.ndarray | None, z: np.ndarray) -> tuple[float | None, float | None]:
    """Second differences of ``z`` ([j, i] at (x[i], y[j]); (nx,) on a curve) at the grid point
    nearest the centre, along α and β: dᵀHd for each axis direction d of a quadratic loss. None
    where the centre is not inside the grid or a neighbour is missing."""
    zz = z.reshape(1, -1) if y is None else z
    i, hx = _centre(x)
    j, hy = (0, None) if y is None else _centre(y)
    if j is None:
        return None, None
    cx = None if i is None or hx is None else _second(zz[j, i - 1], zz[j, i], zz[j, i + 1], hx)
    cy = None if y is None or i is None or hy is None else _second(zz[j - 1, i], zz[j, i], zz[j + 1, i], hy)
    return cx, cy


def _centre(axis: np.ndarray) -> tuple[int | None, float | None]:
    """The interior index nearest 0 and the spacing there (None, None if 0 is not on the grid)."""
    if len(axis) < 3:
        return None, None
    k = int(np.argmin(np.abs(axis)))
    step = float(axis[1] - axis[0])
    if not 1 <= k <= len(axis) - 2 or abs(axis[k]) > step / 2:
        return None, None
    return k, step


def _second(a: float, b: float, c: float, step: float) -> float | None:
    value = (a - 2 * b + c) / step**2
    return float(value) if np.isfinite(value) else None


def describe(fid: Fidelity, sampled: Sequence[tuple[float | None, float | None]] = ()) -> list[str]:
    """What ``lsurf info`` prints: the Hessian's extremes and mean, then each plane's quotients,
    their share of λ_max, the verdict, and the surface's own curvature per unit length."""
    lines = [f"{'curvature at θ*:':<20}λ_max {fid.lambda_max:.4g}, λ_min {fid.lambda_min:.4g}, mean eigenvalue "
             f"{fid.mean_eigenvalue:.3g} ± {fid.mean_eigenvalue_stderr:.2g} over {fid.parameters} parameters "
             f"({fid.split} split; {fid.lanczos_steps} Lanczos steps, {fid.trace_samples} Hutchinson samples)"]
    for k, (q, norm2) in enumerate(zip(fid.quotients, fid.norms2)):
        seen = sampled[k] if k < len(sampled) else (None, None)
        axes = []
        for label, qa, na, sa in (("x", q[0], norm2[0], seen[0]), ("y", q[1], norm2[1], seen[1])):
            if qa is None:
                continue
            text = f"{label} {qa:.4g} ({_share(qa, fid.lambda_max)} of λ_max, {verdict(qa, fid.mean_eigenvalue)})"
            if sa is not None and na:
                text += f", sampled {sa / na:.4g}"
            axes.append(text)
        name = "plane fidelity:" if len(fid.quotients) == 1 else f"plane {k} fidelity:"
        lines.append(f"{name:<20}" + "; ".join(axes))
    return lines


def title_line(fid: Fidelity) -> str:
    """One line under a plot's title: the curvature the plotted plane's axes see (an ensemble's:
    the median over its planes), and its verdict."""
    seen: Sequence[float | None]
    if len(fid.quotients) == 1:
        lead, seen = "curvature", fid.quotients[0]
    else:
        lead = f"median curvature of {len(fid.quotients)} planes"
        seen = tuple(None if q[0] is None else float(np.median(q)) for q in zip(*fid.quotients))
    axes = [f"{label} {q:.3g} ({verdict(q, fid.mean_eigenvalue).removesuffix('-biased')})"
            for label, q in zip("xy", seen) if q is not None]
    return (f"{lead} {', '.join(axes)}; λ in [{fid.lambda_min:.3g}, {fid.lambda_max:.3g}], "
            f"mean {fid.mean_eigenvalue:.2g}")


def _share(q: float, lam_max: float) -> str:
    return f"{100 * q / lam_max:.1f} %" if lam_max > 0 else "n/a"
