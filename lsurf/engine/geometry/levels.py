"""The colour limits and contour levels a plot of a quantity uses, defined once: the plots draw
them and coarse-to-fine sampling (lsurf.engine.geometry.refine) refines where they cross."""

from __future__ import annotations

import numpy as np

from lsurf.errors import UserError

DEFAULT_LEVELS = 20


def color_range(z: np.ndarray, vmin: float | None, vmax: float | None, log: bool) -> tuple[float, float]:
    """The colour limits: given ones win; otherwise the finite range, with a heavy upper tail cut at
    the 95th percentile (when the maximum is more than 3x that percentile's distance from the minimum)."""
    finite = z[np.isfinite(z) & ((z > 0) if log else True)]
    if finite.size == 0:
        raise UserError("nothing to plot: no finite values computed yet")
    lo = float(finite.min()) if vmin is None else vmin
    hi = float(finite.max())
    p95 = float(np.percentile(finite, 95))
    if vmax is not None:
        hi = vmax
    elif hi - lo > 3 * (p95 - lo) and p95 > lo:
        hi = p95
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    return lo, hi


def contour_levels(lo: float, hi: float, n: int, geometric: bool) -> np.ndarray:
    return np.geomspace(lo, hi, n) if geometric else np.linspace(lo, hi, n)


def is_geometric(name: str, lo: float, log: bool = False) -> bool:
    """Losses rise steeply away from a minimum: geometric levels and colours resolve basin and walls alike."""
    return log or (name.endswith("loss") and lo > 0)


def default_levels(z: np.ndarray, name: str, n: int = DEFAULT_LEVELS) -> np.ndarray:
    """The levels ``lsurf plot`` draws for quantity ``name`` with values ``z`` and no limits given."""
    lo, hi = color_range(z, None, None, False)
    return contour_levels(lo, hi, n, is_geometric(name, lo))
