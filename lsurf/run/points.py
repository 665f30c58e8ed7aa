"""What a run samples, as the one runner (lsurf.run.sampler, lsurf.run.tiles) needs it.

A :class:`Sampled` says, before any evaluator exists, what the grid is, which directions the
evaluator holds, what the file records of the points (identity, attributes, quantity names) and
why no plane fidelity is measured where none is; :meth:`Sampled.points` then binds it to the
evaluator as a :class:`PointSet`: cells of a plane in, one result per cell out. The built-in planes
(:class:`Planes`), a user's geometry (:class:`GeometrySet`) and a curve between two models with its
straight line (lsurf.run.curve) are the kinds there are; a new kind is one more pair of classes
here or beside its job, and the runner, file, resume and progress take it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from lsurf.engine.evaluation.evaluate import Evaluator
from lsurf.engine.geometry.directions import AnyDirections, zero_directions
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.geometry.plugin import CheckedGeometry


class PointSet(Protocol):
    """What the tile loop evaluates: ``first`` is the run's evaluator (its points per pass, its
    calibration); ``quantities`` the names of each result's values."""

    first: Evaluator

    @property
    def quantities(self) -> list[str]: ...

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]: ...


class Sampled(Protocol):
    """What a run samples (see the module's docstring): ``planes`` are the directions the evaluator
    holds, one set per plane of ``grid``; ``fidelity_note`` says why plane fidelity is not measured
    (None: it is where the plan allows)."""

    @property
    def grid(self) -> Grid: ...

    @property
    def planes(self) -> list[AnyDirections]: ...

    @property
    def fidelity_note(self) -> str | None: ...

    def identity(self) -> dict[str, Any]:
        """Recorded beside the inputs' identity: a resume with another one is refused."""
        ...

    def attrs(self) -> dict[str, Any]:
        """Provenance a fresh file records of the points."""
        ...

    def quantities(self, names: list[str]) -> list[str]:
        """The file's quantities, given the evaluator's ``names``."""
        ...

    def points(self, ev: Evaluator) -> PointSet: ...


class PlanePoints:
    """The points of the built-in planes: grid coordinates (α, β) along each plane's directions,
    the run's own evaluator for plane 0, a twin moving along plane k's directions otherwise. Tiles
    come plane after plane, so only the current twin is kept (its directions on the device)."""

    def __init__(self, ev: Evaluator, planes: list[AnyDirections], grid: Grid):
        self.first, self.planes, self.grid = ev, planes, grid
        self.current: tuple[int, Evaluator] = (0, ev)

    @property
    def quantities(self) -> list[str]:
        return self.first.quantities

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        """Results at grid cells (j, i) of ``plane``."""
        if self.current[0] != plane:
            self.current = (plane, self.first if plane == 0 else self.first.with_directions(self.planes[plane]))
        return self.current[1].evaluate_many([self.grid.coords(j, i) for j, i in cells])


@dataclass(frozen=True)
class Planes:
    """The built-in planes: one set of directions per plane of the grid, moved along in place."""

    planes: list[AnyDirections]
    grid: Grid
    fidelity_note: str | None = None

    def identity(self) -> dict[str, Any]:
        return {}

    def attrs(self) -> dict[str, Any]:
        return {}

    def quantities(self, names: list[str]) -> list[str]:
        return names

    def points(self, ev: Evaluator) -> PointSet:
        return PlanePoints(ev, self.planes, self.grid)


class GeometryPoints:
    """The points of a user's geometry: its offset at each cell, applied by the evaluator (θ* + δ)."""

    def __init__(self, ev: Evaluator, geometry: CheckedGeometry):
        self.first, self.geometry = ev, geometry

    @property
    def quantities(self) -> list[str]:
        return self.first.quantities

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        return self.first.evaluate_offsets(self.geometry.offsets(plane, cells))


@dataclass(frozen=True)
class GeometrySet:
    """A user's geometry (lsurf.engine.geometry.plugin), checked; its evaluator holds zero
    directions of the geometry's dimensions (:meth:`of`), never moved along."""

    geometry: CheckedGeometry
    planes: list[AnyDirections]
    fidelity_note: str | None = "not measured: a plug-in geometry has no plane directions"

    @classmethod
    def of(cls, model: nn.Module, geometry: CheckedGeometry) -> GeometrySet:
        zeros = zero_directions(model, "weights", two=len(geometry.axes) > 1)
        return cls(geometry, [zeros] * geometry.grid().num_planes)

    @property
    def grid(self) -> Grid:
        return self.geometry.grid()

    def identity(self) -> dict[str, Any]:
        return {"geometry": self.geometry.identity()}

    def attrs(self) -> dict[str, Any]:
        """No directions: the geometry says what the points are."""
        g = self.geometry
        return {"geometry": json.dumps(g.identity()), "axis_names": json.dumps(g.names),
                "directions": json.dumps({"geometry": g.name})}

    def quantities(self, names: list[str]) -> list[str]:
        return names

    def points(self, ev: Evaluator) -> PointSet:
        return GeometryPoints(ev, self.geometry)
