"""What an ensemble of K random planes says together: the spread of the picture across draws.

One random plane is one sample of a random picture; a flat-vs-sharp claim needs the spread across
draws. :func:`summarise` gives, per plane, the centre value, the value at a few radii and the basin
radius (the smallest distance from the centre at which the loss exceeds a threshold, by default
twice the centre's), and their spread with a t confidence interval across planes.
:func:`lsurf.post.plot.plot_ensemble` draws the mean with the spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import reduce

import numpy as np

from lsurf.engine.formats.surface_file import CURVES, Surface, View
from lsurf.errors import UserError
from lsurf.post.plot import quantity


def _ensemble(surface: Surface) -> View:
    view = surface.view()
    if view.planes is None:
        raise UserError(f"{surface.path!r} holds one plane: an ensemble needs a run with `planes` > 1")
    return view


def _distances(view: View) -> np.ndarray:
    """Distance of every grid point from the centre (α, β) = (0, 0), in the grid's shape: |α| on
    a curve (hypot(0, α)), hypot(α, β) on a plane."""
    return reduce(np.hypot, np.meshgrid(*(a.coords for a in view.plane_axes)), np.zeros(()))


def basin_radius(distance: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """The smallest distance at which ``values`` exceed ``threshold`` (inf: nowhere on the grid)."""
    above = np.isfinite(values) & (values > threshold)
    return float(distance[above].min()) if above.any() else float("inf")


def value_at_radius(view: View, values: np.ndarray, r: float) -> float:
    """A quantity's value at distance r from the centre: :func:`_on_curve` or :func:`_on_ring`."""
    return (_on_curve if view.kind == CURVES else _on_ring)(view, values, r)


def _on_curve(view: View, values: np.ndarray, r: float) -> float:
    """A curve's value at ±r (interpolated, the mean of both sides)."""
    ok = np.isfinite(values)
    return float(np.mean([np.interp(s * r, view.x[ok], values[ok]) for s in (-1, 1)]))


def _on_ring(view: View, values: np.ndarray, r: float) -> float:
    """A plane's mean over the ring of grid points within half a grid step of radius r."""
    step = max(np.ptp(a.coords) / max(len(a.coords) - 1, 1) for a in view.plane_axes)
    ring = (np.abs(_distances(view) - r) <= step / 2) & np.isfinite(values)
    return float(values[ring].mean()) if ring.any() else float("nan")


def _centre(distances: np.ndarray, values: np.ndarray) -> float:
    """The value at the grid point nearest the centre."""
    return float(values.flat[int(np.argmin(distances))])


def t_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its two-sided t confidence interval (nan below 2 samples)."""
    from scipy.stats import t

    n = len(samples)
    mean = float(np.mean(samples))
    if n < 2 or not np.all(np.isfinite(samples)):
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, n - 1) * np.std(samples, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class EnsembleSummary:
    """Per-plane numbers of one quantity of an ensemble (arrays indexed by plane)."""

    quantity: str
    seeds: list[int | None]
    centre: np.ndarray
    radii: np.ndarray
    at_radii: np.ndarray  # (planes, radii)
    basin: np.ndarray
    thresholds: np.ndarray
    reach: float  # the largest radius the grid covers in every direction

    def describe(self) -> list[str]:
        """What ``lsurf info`` prints for an ensemble: a line per plane, then the spread."""
        head = "  ".join(f"r={r:.3g}" for r in self.radii)
        lines = [f"{'planes:':<20}{len(self.centre)} ({self.quantity}; centre, at {head}, basin radius)"]
        for k, seed in enumerate(self.seeds):
            at = "  ".join(f"{v:.4g}" for v in self.at_radii[k])
            label = f"plane {k}" + ("" if seed is None else f" (seed {seed})")
            lines.append(f"  {label + ':':<18}{self.centre[k]:.4g}  {at}  {_radius_text(self.basin[k], self.reach)}")
        lines.append(f"{'spread:':<20}centre {_spread_text(self.centre)}; "
                     + "; ".join(f"r={r:.3g} {_spread_text(self.at_radii[:, i])}" for i, r in enumerate(self.radii)))
        finite = np.isfinite(self.basin)
        if finite.all():
            mean, lo, hi = t_interval(self.basin)
            text = f"{mean:.4g}, 95 % CI [{lo:.4g}, {hi:.4g}] across {len(self.basin)} planes"
        else:
            text = (f"beyond the grid (> {self.reach:.3g}) in {int((~finite).sum())} of {len(self.basin)} planes; "
                    f"median {np.median(self.basin):.4g}")
        lines.append(f"{'basin radius:':<20}{text} (loss above {_threshold_text(self.thresholds)})")
        return lines


def _radius_text(r: float, reach: float) -> str:
    return f"{r:.4g}" if np.isfinite(r) else f"> {reach:.3g}"


def _spread_text(v: np.ndarray) -> str:
    return f"{np.mean(v):.4g} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2g} (sd)"


def _threshold_text(thresholds: np.ndarray) -> str:
    return f"{thresholds[0]:.4g}" if np.ptp(thresholds) == 0 else "twice each plane's centre value"


def summarise(surface: Surface, name: str = "train_loss", basin_threshold: float | None = None,
              radii: tuple[float, ...] | None = None) -> EnsembleSummary:
    """Per-plane centre value, values at ``radii`` (default ¼, ½ and all of the largest radius the
    grid covers in every direction) and basin radius: where ``name`` first exceeds
    ``basin_threshold`` (default: twice the plane's centre value)."""
    view = _ensemble(surface)
    z = quantity(view.surface, name)
    reach = float(min(np.abs(a.coords).max() for a in view.plane_axes))
    radii_arr = np.asarray(radii if radii is not None else (reach / 4, reach / 2, reach), dtype=float)
    if np.any(radii_arr < 0):
        raise UserError(f"`radii` {tuple(radii_arr)}: must not be negative")
    d = _distances(view)
    centre = np.array([_centre(d, z[k]) for k in range(len(z))])
    thresholds = np.full(len(z), basin_threshold) if basin_threshold is not None else 2 * centre
    return EnsembleSummary(
        quantity=name, seeds=_seeds(surface), centre=centre, radii=radii_arr,
        at_radii=np.array([[value_at_radius(view, z[k], r) for r in radii_arr] for k in range(len(z))]),
        basin=np.array([basin_radius(d, z[k], thresholds[k]) for k in range(len(z))]),
        thresholds=thresholds, reach=reach)


def _seeds(surface: Surface) -> list[int | None]:
    try:
        metas = json.loads(surface.attrs.get("directions", "[]"))
    except (TypeError, ValueError):
        metas = []
    planes = surface.planes or 1
    if not isinstance(metas, list) or len(metas) != planes:
        return [None] * planes
    return [m.get("seed") if isinstance(m, dict) else None for m in metas]
