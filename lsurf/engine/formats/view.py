"""A surface file resolved once for whoever draws or converts it: which kind of grid it holds,
its axes by name with their coordinates, its values filled in where a coarse-to-fine run trusted
interpolation, which points were measured, and the one refusal of a file that is not one plane.

Every reader in ``lsurf.post`` used to ask these questions itself (``y is None``, ``planes is
None``, a third axis, filling a coarse-to-fine file) and gave its own answers; here they are answered once,
so a plot, a comparison, a page, an export and a VTK file cannot disagree about what a file is.

It lives beside the file format, not in ``lsurf.post``: what the ``y`` and ``plane`` datasets and
the ``axis_names`` and ``refinement`` attributes mean is the format's knowledge, the engine may
not import post (so ``Surface.view`` could not exist there), and the job's progress
(``progress.job_state``) reads the measured points of a view's surface too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from lsurf.engine.geometry.refine import fill as _fill
from lsurf.errors import UserError

if TYPE_CHECKING:  # surface_file imports this module: the class is only named here
    from lsurf.engine.formats.surface_file import Surface

CURVE = "curve"    # one axis
PLANE = "plane"    # two axes
CURVES = "curves"  # an ensemble: K curves, each along its own random direction
PLANES = "planes"  # an ensemble: K planes, each of its own pair of directions
GRID = "grid"      # a geometry of three axes: planes along its third axis (or one of them, Surface.plane)
ONE_PLANE = (CURVE, PLANE)
ENSEMBLES = (CURVES, PLANES)


@dataclass(frozen=True)
class Axis:
    """One axis of a view: its name (a geometry's own, else ``x``/``y``) and its coordinates."""

    name: str
    coords: np.ndarray


@dataclass(frozen=True)
class View:
    """A surface as it is drawn, with what kind of grid it is.

    ``surface``: the file's surface with the points a coarse-to-fine run (or ``fill``) left out
    filled in, ``done`` where a value stands and ``computed`` the points measured; the surface
    itself where nothing is filled. ``source``: the surface as it was given (what an export of
    the file's own points writes). ``axes``: those of one plane (x, and y for a plane), a
    three-axis grid's third last; an ensemble's K draws share the axes of one plane."""

    surface: Surface
    kind: str
    axes: tuple[Axis, ...]
    source: Surface

    @property
    def path(self) -> str:
        return self.surface.path

    @property
    def values(self) -> dict[str, np.ndarray]:
        return self.surface.values

    @property
    def done(self) -> np.ndarray:
        return self.surface.done

    @property
    def computed(self) -> np.ndarray | None:
        """The points measured, where some were filled in (None: every done point was measured)."""
        return self.surface.computed

    @property
    def planes(self) -> int | None:
        """K: an ensemble's draws or a grid's planes held; None: one plane (or curve)."""
        return self.surface.planes

    @property
    def plane_axes(self) -> tuple[Axis, ...]:
        """The axes of one plane (or curve): a three-axis grid's first two, every other view's all."""
        return self.axes[:2]

    @property
    def x(self) -> np.ndarray:
        return self.axes[0].coords

    @property
    def y(self) -> np.ndarray:
        """The second axis's coordinates; a curve has none (IndexError: a caller that asks for
        them has not dispatched on ``kind``)."""
        return self.axes[1].coords

    def refusal(self, use: str) -> UserError:
        """Why ``use`` (e.g. ``export``), which takes one plane, cannot take this view."""
        path, names = self.surface.path, self.surface.axis_names
        if self.kind == GRID:
            return UserError(f"{path!r} holds a grid of three axes ({', '.join(names)}); {use} takes one plane: "
                             f"pick one with `slice` {names[2]}=VALUE")
        return UserError(f"{path!r} holds an ensemble of {self.planes} planes; {use} takes one plane: "
                         "`lsurf plot` draws the ensemble, Surface.plane(k) picks one")

    def taking(self, use: str, kinds: Collection[str] = ONE_PLANE) -> View:
        """This view, if ``use`` takes its kind; else the refusal."""
        if self.kind not in kinds:
            raise self.refusal(use)
        return self


def resolve(surface: Surface, fill: bool = False) -> View:
    """The view of ``surface`` (see :meth:`Surface.view`): its kind and axes, its values filled."""
    coords = [surface.x] if surface.y is None else [surface.x, surface.y]
    if surface.third_axis is not None and surface.z is not None:  # Surface.plane(k) of the grid has no z
        coords.append(surface.z)
    axes = tuple(Axis(name, c) for name, c in zip(surface.axis_names, coords))
    if surface.third_axis is not None:  # its axis names say so: one plane taken out with plane(k) is refused too
        kind = GRID
    elif surface.planes is not None:
        kind = CURVES if surface.y is None else PLANES
    else:
        kind = CURVE if surface.y is None else PLANE
    return View(filled(surface, fill), kind, axes, surface)


def filled(surface: Surface, unfinished: bool = False) -> Surface:
    """A coarse-to-fine surface with the points it left out filled in by the interpolation its
    refinement trusted; ``computed`` keeps which points were measured. With ``unfinished``, a
    whole grid not done yet too (a running job's file drawn whole: its points not done are
    interpolated from the done ones around them where there are, else stay NaN). Any other
    surface (an ensemble, one filled already) comes back as it is."""
    fills = surface.refinement is not None or (unfinished and not surface.done.all())
    if not fills or surface.planes is not None or surface.computed is not None:
        return surface
    plane = surface.grid.plane_shape
    known = surface.done.reshape(plane)
    values = {n: _fill(v.reshape(plane), known).reshape(v.shape) for n, v in surface.values.items()}
    reached = np.isfinite(_fill(np.ones(plane), known)).reshape(surface.done.shape)
    return replace(surface, values=values, done=reached, computed=surface.done)
