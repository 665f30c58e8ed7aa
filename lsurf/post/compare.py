"""Several surfaces in one figure, drawn so that they can be compared by eye.

Side-by-side plots only mean something when every panel uses the same contour levels, the same
colour scale and the same axes: otherwise two very different surfaces look alike because each
was stretched over its own colour map. :func:`plot_comparison` therefore computes ONE set of
levels and ONE colour norm from all surfaces together (with :func:`lsurf.post.plot.color_range`,
the same robust limits as single plots), shares the axes and draws one colour bar. With ``diff``
it draws B − A (or B / A) instead, which needs the very same grid. 1-D files become curves
overlaid in one axes with a legend.

The figure is a :class:`matplotlib.figure.Figure` made without pyplot, so calling this from a
notebook never switches the notebook's backend nor registers figures with pyplot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsurf.engine.formats.surface_file import CURVE, Surface, View, describe_grid
from lsurf.engine.geometry.levels import DEFAULT_LEVELS, color_range, contour_levels
from lsurf.errors import UserError
from lsurf.post.plot import comparable_axes, draw_overlay, values_of

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: every command line imports this module
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

COMPARE_KINDS = ("contour", "filled", "heatmap")
DIFFS = ("difference", "ratio")


@dataclass
class Scale:
    """What every panel shares: colour limits, contour levels, the norm object itself, colours."""

    lo: float
    hi: float
    levels: np.ndarray
    norm: Normalize
    cmap: str
    extend: str


def short_names(surfaces: list[Surface]) -> list[str]:
    """Distinct short names for legends and titles: the file stem, or ``folder/stem`` where stems repeat."""
    stems = [Path(s.path).stem for s in surfaces]
    if len(set(stems)) == len(stems):
        return stems
    return [str(Path(Path(s.path).parent.name) / Path(s.path).stem) for s in surfaces]


def provenance(surface: Surface) -> str:
    """``cnn on digits, seed 3``: what distinguishes runs, from the file's attributes (may be empty)."""
    a = surface.attrs
    parts = [str(p) for p in (a.get("model"), a.get("data")) if p]
    text = " on ".join(parts)
    seed = surface.directions_meta.get("seed")
    if surface.planes is not None:
        text += (", " if text else "") + f"{surface.planes} planes from seed {seed}"
    elif seed is not None:
        text += (", " if text else "") + f"seed {seed}"
    return text


def panel_title(surface: Surface, name: str) -> str:
    """Two lines: the file's short name, then its provenance."""
    prov = provenance(surface)
    return f"{name}\n{prov}" if prov else name


def grid_text(view: View) -> str:
    """The grid in the syntax of the options, e.g. ``x -1:1:51, y -1:1:51``."""
    return describe_grid(view.source.grid)


def same_grid(a: View, b: View) -> bool:
    """The same kind of grid with the very same coordinates on every axis."""
    return a.kind == b.kind and all(np.array_equal(p.coords, q.coords) for p, q in zip(a.axes, b.axes))


def _check(surfaces: list[Surface], kind: str, diff: str | None, levels: int) -> list[View]:
    """The surfaces' views, each one plane and all of one kind; the options checked."""
    if not surfaces:
        raise UserError("`surfaces` is empty: give at least one surface")
    views = [s.view("a comparison") for s in surfaces]
    if len({v.kind for v in views}) > 1:
        listing = ", ".join(f"{n} ({len(v.axes)}-D)" for n, v in zip(short_names(surfaces), views))
        raise UserError(f"`surfaces` mixes 1-D and 2-D files: {listing}")
    if kind not in COMPARE_KINDS:
        raise UserError(f"`kind` {kind!r}: expected one of {', '.join(COMPARE_KINDS)}")
    if diff is not None and diff not in DIFFS:
        raise UserError(f"`diff` {diff!r}: expected one of {', '.join(DIFFS)} (or None)")
    if diff is not None and len(surfaces) < 2:
        raise UserError("`diff` needs at least two surfaces: B − A compares each to the first")
    if int(levels) < 2:
        raise UserError(f"`levels` {levels}: need at least 2")
    return views


def differences(views: list[View], zs: list[np.ndarray], diff: str) -> list[np.ndarray]:
    """B − A or B / A for every surface B after the first, A; refuses grids that differ at all."""
    names = short_names([v.surface for v in views])
    for v, n in zip(views[1:], names[1:]):
        if not same_grid(views[0], v):
            raise UserError(f"`diff` needs surfaces on the same grid: {names[0]} has {grid_text(views[0])}, "
                            f"{n} has {grid_text(v)}" + (" (same size, other coordinates)"
                                                       if grid_text(v) == grid_text(views[0]) else ""))
    with np.errstate(divide="ignore", invalid="ignore"):
        return [z - zs[0] if diff == "difference" else z / zs[0] for z in zs[1:]]


def shared_scale(panels: list[np.ndarray], name: str, diff: str | None, levels: int, log: bool,
                 vmin: float | None, vmax: float | None) -> Scale:
    """One scale from all panels together; differences and ratios get a diverging map centred on 0 or 1."""
    allz = np.concatenate([p.ravel() for p in panels])
    given = vmin is not None or vmax is not None
    if diff is None or given:
        lo, hi = color_range(allz, vmin, vmax, log and diff != "difference")
        # the rule of plot_surface: losses rise steeply away from a minimum, so geometric levels
        geometric = (log and diff != "difference") or (diff is None and name.endswith("loss") and lo > 0)
    elif diff == "difference":
        m = color_range(np.abs(allz), 0.0, None, False)[1]
        lo, hi, geometric = -m, m, False
    else:
        finite = allz[np.isfinite(allz)]
        geometric = finite.size > 0 and bool((finite > 0).all())
        if geometric:
            m = color_range(np.abs(np.log(finite)), 0.0, None, False)[1]
            lo, hi = math.exp(-m), math.exp(m)
        else:
            m = color_range(np.abs(allz - 1), 0.0, None, False)[1]
            lo, hi = 1 - m, 1 + m
    finite = allz[np.isfinite(allz)]
    over, under = bool((finite > hi).any()), bool((finite < lo).any())
    extend = {(True, True): "both", (True, False): "max", (False, True): "min"}.get((over, under), "neither")
    from matplotlib.colors import LogNorm, Normalize

    norm = LogNorm(lo, hi) if geometric else Normalize(lo, hi)
    return Scale(lo, hi, contour_levels(lo, hi, int(levels), geometric), norm, "viridis" if diff is None else "RdBu_r",
                 extend)


def _layout(n: int) -> tuple[int, int]:
    """Side by side up to three panels, then a near-square grid."""
    cols = n if n <= 3 else math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def plot_comparison(surfaces: list[Surface], quantity: str = "train_loss", *, kind: str = "filled",
                    diff: str | None = None, levels: int = DEFAULT_LEVELS, log: bool = False, vmin: float | None = None,
                    vmax: float | None = None, size: tuple[float, float] | None = None) -> Figure:
    """Surfaces side by side on shared levels, colours and axes (2-D), or overlaid curves (1-D).

    ``diff="difference"`` draws each surface minus the first, ``diff="ratio"`` each divided by the
    first; both need identical grids. ``vmin``/``vmax`` fix the shared colour limits.
    """
    views = _check(surfaces, kind, diff, levels)
    names = short_names(surfaces)
    zs = [values_of(v, quantity) for v in views]
    if diff is not None:
        zs = differences(views, zs, diff)
        op = " − " if diff == "difference" else " / "
        titles = [f"{n}{op}{names[0]}" for n in names[1:]]
        shown = views[1:]
        label = f"{quantity} {'difference' if diff == 'difference' else 'ratio'}"
    else:
        titles, shown, label = names, views, quantity
    if diff == "difference" and log:
        raise UserError("`log` does not apply to `diff='difference'` (differences change sign)")
    scale = shared_scale(zs, quantity, diff, levels, log, vmin, vmax)
    if views[0].kind == CURVE:
        return _curves(shown, zs, titles, scale, label, log, diff, size)
    return _panels(shown, zs, titles, scale, kind, label, size)


def _panels(shown: list[View], zs: list[np.ndarray], titles: list[str], scale: Scale, kind: str,
            label: str, size: tuple[float, float] | None) -> Figure:
    rows, cols = _layout(len(zs))
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (4.0 * cols + 1.2, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    mappable = None
    for ax, v, z, title in zip(axes, shown, zs, titles):
        X, Y = np.meshgrid(v.x, v.y)  # z[j, i] sits at (x[i], y[j])
        masked = np.ma.masked_invalid(z if kind == "contour" else np.clip(z, scale.lo, scale.hi))
        if kind == "heatmap":
            art = ax.pcolormesh(X, Y, masked, cmap=scale.cmap, norm=scale.norm, shading="nearest")
        else:
            draw = ax.contour if kind == "contour" else ax.contourf
            art = draw(X, Y, masked, levels=scale.levels, cmap=scale.cmap, norm=scale.norm, extend=scale.extend)
        mappable = mappable or art
        draw_overlay(ax, v.surface, None)
        ax.set_title(panel_title(v.surface, title), fontsize=9)
        if comparable_axes(v.x, v.y):
            ax.set_aspect("equal", adjustable="box")
    for ax in axes[len(zs):]:
        ax.set_visible(False)
    for ax in axes[:len(zs)]:
        ax.label_outer()
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("α")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("β")
    assert mappable is not None  # at least one panel was drawn
    fig.colorbar(mappable, ax=list(axes[:len(zs)]), label=label, format="%.3g")
    return fig


def _curves(shown: list[View], zs: list[np.ndarray], titles: list[str], scale: Scale, label: str,
            log: bool, diff: str | None, size: tuple[float, float] | None) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=size or (6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for v, z, title in zip(shown, zs, titles):
        prov = provenance(v.surface)
        ax.plot(v.x, z, "-o", markersize=2.5, linewidth=1.4, label=f"{title} ({prov})" if prov else title)
    if diff is not None:
        ax.axhline(0.0 if diff == "difference" else 1.0, color="gray", linewidth=0.8)
    if log and scale.lo > 0:  # as plot_curve: curves stay linear unless asked
        ax.set_yscale("log")
        ax.set_ylim(scale.lo / 1.1, scale.hi * 1.1)
    else:
        pad = 0.05 * (scale.hi - scale.lo)
        ax.set_ylim(scale.lo - pad, scale.hi + pad)
    ax.set_xlabel("α")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    ax.set_title(label if len(shown) > 1 else panel_title(shown[0].surface, titles[0]), fontsize=10)
    return fig
