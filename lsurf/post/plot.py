"""``lsurf plot``: contour lines, filled contours, heat maps and 3-D surfaces of 2-D files; loss and
accuracy curves of 1-D files. Works on ours and on Li et al.'s files, partial ones included.

Colour scales are robust by default: where a few points explode (large α, overflow), the upper
limit is the 95th percentile of the finite values instead of their maximum, so one huge value does
not crush the whole map into one colour; ``vmax`` overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np

from lsurf.engine.curvature.fidelity import title_line
from lsurf.engine.evaluation.quantities import PROBES
from lsurf.engine.formats.curve_file import read_curve, recorded_ends
from lsurf.engine.formats.progress import FINISHED, job_state
from lsurf.engine.formats.surface_file import CURVE, CURVES, ENSEMBLES, Surface, View
from lsurf.engine.geometry.curve import coordinates, curve_plane, project
from lsurf.engine.geometry.levels import DEFAULT_LEVELS, color_range, contour_levels, is_geometric
from lsurf.engine.io import file_sha256
from lsurf.errors import UserError

KINDS = ("contour", "filled", "heatmap", "surface3d")


def quantity(surface: Surface, name: str) -> np.ndarray:
    """A stored quantity, or ``hessian_ratio`` = |λ_min / λ_max| (Li et al.'s convexity map)."""
    if name == "hessian_ratio":
        hi, lo = (quantity(surface, name) for name in PROBES)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(lo / hi)
    if name not in surface.values:
        known = ", ".join(sorted(surface.values))
        raise UserError(f"{surface.path!r} has no quantity {name!r} (it has: {known})")
    return np.where(surface.done, surface.values[name], np.nan)


def values_of(view: View, name: str) -> np.ndarray:
    """A quantity as drawn (a coarse-to-fine surface filled in, as its own plots are), NaN where
    nothing stands; an unknown name is a `quantity` error."""
    try:
        return quantity(view.surface, name)
    except UserError as e:
        raise UserError(f"`quantity`: {e}") from None


def figure_title(surface: Surface, name: str) -> str:
    a = surface.attrs
    norm = surface.directions_meta.get("norm")
    parts = [p for p in (a.get("model"), a.get("data")) if p]
    text = " on ".join(parts) if parts else Path(surface.path).name
    if norm:
        text += f", {norm}-normalised directions"
    fid = surface.fidelity
    seen = f"\n{title_line(fid)}" if fid is not None else ""
    if surface.computed is not None:
        seen += f"\n{int(surface.computed.sum())} of {surface.computed.size} points computed, the rest interpolated"
    state = job_state(surface)
    if state.state != FINISHED:  # a running job's file, or one a job left: say so, and what is blank
        seen += f"\n{state.label()} (blank: not done yet)"
    return f"{name}: {text}{seen}"


def _markers(surface: Surface) -> list[dict]:
    raw = surface.attrs.get("markers")
    return json.loads(raw) if raw else []


def _axis_labels(surface: Surface, projection) -> tuple[str, str]:
    """α and β, a PCA plane's components, or the names of a geometry's axes."""
    if "axis_names" in surface.attrs:
        names = surface.axis_names
        return names[0], names[-1]
    if projection is None:
        return "α", "β"
    ev = projection["explained_variance"]
    return f"α: PC1 ({100 * ev[0]:.1f} %)", f"β: PC2 ({100 * ev[1]:.1f} %)"


def read_projection(path: str | Path) -> dict:
    """A projection file from ``lsurf trajectory``: ``proj_x``, ``proj_y``, labels, explained variance."""
    from lsurf.engine.formats.surface_file import open_h5

    with open_h5(path, "r") as f:
        if "proj_x" not in f or "proj_y" not in f:
            raise UserError(f"{str(path)!r} is not a projection file (no proj_x/proj_y)")
        labels = [s.decode() if isinstance(s, bytes) else str(s) for s in f["labels"][()]] if "labels" in f else []
        ev = np.asarray(f.attrs.get("explained_variance", [np.nan, np.nan]), dtype=float)
        return {"x": f["proj_x"][()], "y": f["proj_y"][()], "labels": labels, "explained_variance": ev}


def plot_surface(surface: Surface, name: str = "train_loss", kind: str = "filled", *, vmin=None, vmax=None,
                 levels: int = DEFAULT_LEVELS, log: bool = False, size=(6.0, 5.0), projection: dict | None = None,
                 curve: dict | None = None, dots: bool = False):
    """One figure of a 2-D surface: ``kind`` in contour, filled, heatmap, surface3d; ``projection``
    (a training path) and ``curve`` (see :func:`read_curve_projection`) are drawn over it. A
    coarse-to-fine surface is drawn filled in (:meth:`Surface.view`), its computed points as dots
    with ``dots``."""
    view = surface.view("plot_surface")
    if view.kind == CURVE:
        raise UserError(f"{surface.path!r} is 1-D: use plot_curve")
    return _plane_figure(view, name, kind, vmin=vmin, vmax=vmax, levels=levels, log=log, size=size,
                         projection=projection, curve=curve, dots=dots)


def _plane_figure(view: View, name: str, kind: str, *, vmin=None, vmax=None, levels: int = DEFAULT_LEVELS,
                  log: bool = False, size=(6.0, 5.0), projection: dict | None = None, curve: dict | None = None,
                  dots: bool = False):
    """:func:`plot_surface` of a plane's view (a figure of ``figures``, which resolved the view once)."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    if kind not in KINDS:
        raise UserError(f"`kind` {kind!r}: expected one of {', '.join(KINDS)}")
    surface = view.surface
    z = quantity(surface, name)
    lo, hi = color_range(z, vmin, vmax, log)
    geometric = is_geometric(name, lo, log)
    norm = LogNorm(lo, hi) if geometric else Normalize(lo, hi)
    x, y = view.x, view.y
    X, Y = np.meshgrid(x, y)  # Z[j, i] sits at (x[i], y[j])
    masked = np.ma.masked_invalid(np.clip(z, lo, hi) if kind != "contour" else z)
    fig = Figure(figsize=size, layout="constrained")
    xlabel, ylabel = _axis_labels(surface, projection)
    if kind == "surface3d":
        ax = fig.add_subplot(projection="3d")
        height = np.log10(masked) if log else masked
        ax.plot_surface(X, Y, height, cmap="viridis", norm=Normalize(height.min(), height.max()),
                        linewidth=0, antialiased=True)
        ax.set_zlabel(f"log10 {name}" if log else name)
    else:
        ax = fig.add_subplot()
        if kind == "contour":
            cs = ax.contour(X, Y, masked, levels=contour_levels(lo, hi, levels, geometric), cmap="viridis", norm=norm)
            ax.clabel(cs, cast(np.ndarray, cs.levels)[::2], inline=True, fontsize=7, fmt="%.3g")
        elif kind == "filled":
            clipped = bool(np.nanmax(z) > hi)  # an arrow on the colour bar only when values were cut
            cs = ax.contourf(X, Y, masked, levels=contour_levels(lo, hi, levels, geometric), cmap="viridis", norm=norm,
                             extend="max" if clipped else "neither")
            fig.colorbar(cs, ax=ax, label=name, format="%.3g")
        else:
            mesh = ax.pcolormesh(X, Y, masked, cmap="viridis", norm=norm, shading="nearest")
            fig.colorbar(mesh, ax=ax, label=name)
        draw_overlay(ax, surface, projection, curve)
        if dots and view.computed is not None:
            ax.plot(X[view.computed], Y[view.computed], ".", color="black", markersize=1.5)
        if comparable_axes(x, y):
            ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(figure_title(surface, name), fontsize=10)
    return fig


def comparable_axes(x: np.ndarray, y: np.ndarray) -> bool:
    """Axes whose ranges are within 3x of each other are drawn at equal scale."""
    rx, ry = np.ptp(x), np.ptp(y)
    return bool(rx > 0 and ry > 0 and 1 / 3 <= rx / ry <= 3)


def read_curve_projection(path: str | Path, surface: Surface, points: int = 101) -> dict:
    """A curve of ``lsurf curve train`` drawn on its own plane (``surface`` must have been sampled
    with ``--curve-plane``): (α, β) of ``points`` values of t, and of each bend."""
    meta = surface.directions_meta
    if meta.get("source") != "curve" or meta.get("curve_sha256") != file_sha256(path):
        raise UserError(f"`curve` {str(path)!r} is drawn on the plane of the curve: {surface.path!r} is not that "
                        "plane; sample it with `lsurf surface --curve-plane`")
    stored = read_curve(path)
    a, b = recorded_ends(stored)
    curve = stored.curve(stored.names, a, b)
    d1, d2 = curve_plane(curve)
    xy = project(curve, d1, d2, np.linspace(0.0, 1.0, points).tolist())
    bends = coordinates([[p - x for p, x in zip(bend, a)] for bend in curve.bends], d1, d2)
    return {"x": xy[:, 0], "y": xy[:, 1], "bends": bends}


def draw_overlay(ax, surface: Surface, projection: dict | None, curve: dict | None = None) -> None:
    """Model markers (planes through models, a curve's ends and bend), a training path (PCA
    projection) and a curve between two models (its projection and its bends)."""
    for m in _markers(surface):
        ax.plot(m["x"], m.get("y", 0.0), "o", color="white", markeredgecolor="black", markersize=7)
        ax.annotate(m["label"], (m["x"], m.get("y", 0.0)), textcoords="offset points", xytext=(6, 6), fontsize=9)
    if projection is not None:
        ax.plot(projection["x"], projection["y"], "-o", color="crimson", markersize=3, linewidth=1.5,
                label="training path")
        ax.plot(projection["x"][-1], projection["y"][-1], "*", color="crimson", markersize=12)
    if curve is not None:
        ax.plot(curve["x"], curve["y"], "-", color="crimson", linewidth=1.8, label="curve")
        ax.plot(curve["bends"][:, 0], curve["bends"][:, 1], "s", color="crimson", markersize=5)
    if projection is not None or curve is not None:
        ax.legend(loc="upper right", fontsize=8)


def plot_curve(surface: Surface, *, log: bool = False, size=(6.0, 4.0), vmax=None):
    """Loss (left axis) and accuracy (right axis) against α, every split of a 1-D file."""
    view = surface.view("plot_curve")
    if view.kind != CURVE:
        raise UserError(f"{surface.path!r} is 2-D: use plot_surface")
    return _curve_figure(view, log=log, size=size, vmax=vmax)


def _curve_figure(view: View, *, log: bool = False, size=(6.0, 4.0), vmax=None):
    """:func:`plot_curve` of a curve's view (a figure of ``figures``, which resolved the view once)."""
    from matplotlib.figure import Figure

    surface, x = view.surface, view.x
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    twin = ax.twinx()
    styles = {"train": "-", "test": "--"}
    splits = sorted({n.split("_")[0] for n in surface.values if n.endswith(("_loss", "_acc"))} - {"line"})
    # `lsurf curve eval` stores the straight line beside the curve as line_{split}_{loss,acc}: drawn in grey
    for prefix, loss_colour, acc_colour, what in (("", "tab:blue", "tab:red", ""),
                                                   ("line_", "tab:gray", "silver", " (line)")):
        for split in splits:
            style = styles.get(split, ":")
            if f"{prefix}{split}_loss" in surface.values:
                ax.plot(x, quantity(surface, f"{prefix}{split}_loss"), style, color=loss_colour,
                        label=f"{split} loss{what}")
            if f"{prefix}{split}_acc" in surface.values:
                twin.plot(x, quantity(surface, f"{prefix}{split}_acc"), style, color=acc_colour,
                          label=f"{split} accuracy{what}")
    losses = np.concatenate([quantity(surface, n).ravel() for n in surface.values if n.endswith("_loss")])
    lo, hi = color_range(losses, None, vmax, log)
    pad = 0.05 * (hi - lo)
    ax.set_ylim((lo * 0.9, hi * 1.1) if log else (lo - pad, hi + pad))
    if log:
        ax.set_yscale("log")
    for m in _markers(surface):
        ax.axvline(m["x"], color="gray", linewidth=0.8)
        ax.annotate(m["label"], (m["x"], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
    ax.set_xlabel("t (along the curve and the line)" if "barrier_curve" in surface.attrs
                  else _axis_labels(surface, None)[0])
    ax.set_ylabel("loss", color="tab:blue")
    twin.set_ylabel("accuracy (%)", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles, [str(h.get_label()) for h in handles], loc="outside lower center", ncols=4, fontsize=8)
    ax.set_title(figure_title(surface, "loss and accuracy"), fontsize=10)
    return fig


def plot_ensemble(surface: Surface, name: str = "train_loss", *, log: bool = False, levels: int = 12,
                  size=(6.0, 5.0), vmin=None, vmax=None):
    """An ensemble's picture. A curve: the median over planes with its 10–90 % band and each
    plane's curve faint. A plane: contours of the mean surface over a map of the standard
    deviation across planes (where the pictures disagree)."""
    view = surface.view()
    if view.planes is None:
        raise UserError(f"{surface.path!r} holds one plane: use plot_surface or plot_curve")
    return _ensemble_figure(view, name, log=log, levels=levels, size=size, vmin=vmin, vmax=vmax)


def _ensemble_figure(view: View, name: str, *, log: bool = False, levels: int = 12, size=(6.0, 5.0), vmin=None,
                     vmax=None):
    """:func:`plot_ensemble` of an ensemble's view: its K curves as a band, its K planes as mean over spread."""
    from matplotlib.figure import Figure

    z = quantity(view.surface, name)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    draw = _band_of_curves if view.kind == CURVES else _mean_over_spread
    draw(fig, ax, view, z, name, log, levels, vmin, vmax)
    ax.set_title(figure_title(view.surface, name) + f" ({len(z)} planes)", fontsize=10)
    return fig


def _band_of_curves(_fig, ax, view: View, z: np.ndarray, name: str, log: bool, _levels: int, vmin, vmax) -> None:
    """Each plane's curve faint, the median over planes with its 10–90 % band."""
    x = view.x
    for curve in z:
        ax.plot(x, curve, color="tab:blue", alpha=0.25, linewidth=0.8)
    lo10, med, hi90 = np.nanpercentile(z, [10, 50, 90], axis=0)
    ax.fill_between(x, lo10, hi90, color="tab:blue", alpha=0.25, label="10–90 % of planes")
    ax.plot(x, med, color="tab:blue", linewidth=2, label="median")
    lo, hi = color_range(z, vmin, vmax, log)
    ax.set_ylim(lo * 0.9 if log else lo - 0.05 * (hi - lo), hi * 1.1 if log else hi + 0.05 * (hi - lo))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel(name)
    ax.legend(fontsize=8)


def _mean_over_spread(fig, ax, view: View, z: np.ndarray, name: str, log: bool, levels: int, vmin, vmax) -> None:
    """Mean contours (labelled) over the across-plane standard deviation as a colour map."""
    from matplotlib.colors import LogNorm, Normalize

    with np.errstate(invalid="ignore"):
        mean, sd = np.nanmean(z, axis=0), np.nanstd(z, axis=0, ddof=1)
    X, Y = np.meshgrid(view.x, view.y)
    mesh = ax.pcolormesh(X, Y, np.ma.masked_invalid(sd), cmap="magma", shading="nearest")
    fig.colorbar(mesh, ax=ax, label=f"{name}: sd across planes")
    lo, hi = color_range(mean, vmin, vmax, log)
    geometric = is_geometric(name, lo, log)
    cs = ax.contour(X, Y, np.ma.masked_invalid(mean), levels=contour_levels(lo, hi, levels, geometric),
                    colors="white", linewidths=0.9, norm=LogNorm(lo, hi) if geometric else Normalize(lo, hi))
    ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
    if comparable_axes(view.x, view.y):
        ax.set_aspect("equal")
    ax.set_xlabel("α")
    ax.set_ylabel("β")


def figures(surface: Surface, quantity_name: str = "train_loss", kinds: tuple[str, ...] = KINDS, *,
            stem: str = "surface", projection: dict | None = None, curve: dict | None = None, dots: bool = False,
            **style) -> dict:
    """``{file stem: Figure}`` of what ``lsurf plot`` draws: the loss/accuracy curve of a 1-D file,
    one figure per kind of a 2-D file, the spread of an ensemble of planes. ``style``: vmin, vmax,
    levels, log, size. A three-axis grid is refused: it is drawn a slice at a time."""
    view = surface.view("a picture", ensembles=True)
    if view.kind in ENSEMBLES:
        return {f"{stem}_{quantity_name}_ensemble": _ensemble_figure(view, quantity_name, **style)}
    if view.kind == CURVE:
        keep = {k: v for k, v in style.items() if k in ("log", "size", "vmax")}
        return {f"{stem}_curve": _curve_figure(view, **keep)}
    return {f"{stem}_{quantity_name}_{k}": _plane_figure(view, quantity_name, k, projection=projection, curve=curve,
                                                         dots=dots, **style) for k in kinds}


def parse_size(spec: str) -> tuple[float, float]:
    try:
        w, h = (float(v) for v in spec.lower().split("x"))
    except ValueError:
        raise UserError(f"`size` {spec!r}: expected WxH in inches, e.g. 6x5") from None
    if w <= 0 or h <= 0:
        raise UserError(f"`size` {spec!r}: both sides must be positive")
    return w, h
