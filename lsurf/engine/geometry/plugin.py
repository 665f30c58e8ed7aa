"""A geometry: the set of points in weight space a run samples — a grid of named axes and the
weight offset at each grid index.

The built-in planes move the weights along held directions with fused in-place updates (the
evaluator's ``set_point``). A user's own geometry (``geometry`` ``pkg.module:factory``, or the object
itself through :func:`lsurf.run.sampler.sample_geometry`) keeps a small contract and gives offsets,
which the evaluator applies the same way (θ* + δ, :meth:`Evaluator.evaluate_offsets`)::

    def factory(params):          # list[torch.Tensor]: θ*, detached copies, in model.parameters() order
        return geometry
    geometry.axes                 # dict[str, numpy.ndarray], ordered, 1 to 3 increasing axes
    geometry.offset(index)        # tuple[int, ...] -> list[torch.Tensor]: Δθ at that point, shaped like params
    geometry.identity()           # JSON-able dict, recorded; a resume with another one is refused

Points are the product grid of the axes: the first axis is the file's ``x`` (columns ``i``), the
second its ``y`` (rows ``j``), the third its planes (``k``), so the value at index (i, j, k) is
stored at ``[k, j, i]`` as in every surface. :class:`CheckedGeometry` holds the user's object and
checks every answer it gives, so a wrong one is one line naming the geometry, before any file
where it can be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lsurf.engine.geometry.grid import Grid, check_points_fit
from lsurf.engine.io import call_plugin, make_plugin
from lsurf.errors import UserError

MAX_AXES = 3


class Geometry(Protocol):
    """What a user's geometry object provides (see the module's docstring)."""

    axes: Any  # Mapping[str, array-like], ordered

    def offset(self, index: tuple[int, ...]) -> Sequence[torch.Tensor]: ...

    def identity(self) -> dict[str, Any]: ...


def model_params(model: nn.Module) -> list[torch.Tensor]:
    """θ* as a geometry's factory receives it: detached copies, so a geometry that keeps them reads
    θ* at every point, never the weights the evaluator is moving (and cannot move the model)."""
    return [p.detach().clone() for p in model.parameters()]


def load_geometry(spec: str, params: list[torch.Tensor]) -> CheckedGeometry:
    """The geometry ``pkg.module:factory`` makes from ``params`` (:func:`model_params`), checked."""
    return CheckedGeometry.of(make_plugin(spec, "geometry", params), params, spec)


class CheckedGeometry:
    """A user's geometry, checked once (axes, identity, the offset at the first index) and at every
    offset it gives (count, shapes); ``name`` says which geometry in every message."""

    def __init__(self, geometry: Geometry, name: str, axes: dict[str, np.ndarray], identity: dict[str, Any],
                 shapes: list[torch.Size]):
        self.geometry, self.name, self.axes, self._identity, self.shapes = geometry, name, axes, identity, shapes

    @classmethod
    def of(cls, geometry: Any, params: Sequence[torch.Tensor], name: str = "the geometry") -> CheckedGeometry:
        for attr in ("axes", "offset", "identity"):
            if not hasattr(geometry, attr):
                raise UserError(f"geometry {name!r}: its {type(geometry).__name__} has no {attr!r} (expected axes, "
                                "offset(index) and identity())")
        axes = _checked_axes(name, geometry.axes)
        identity = call_plugin(f"geometry {name!r}", "identity", geometry.identity)
        try:
            identity = json.loads(json.dumps(identity))
        except (TypeError, ValueError) as e:
            raise UserError(f"geometry {name!r}: identity() must return a JSON-able dict ({e})") from None
        if not isinstance(identity, dict):
            raise UserError(f"geometry {name!r}: identity() must return a dict, not {type(identity).__name__}")
        checked = cls(geometry, name, axes, identity, [p.shape for p in params])
        checked.offset((0,) * len(axes))  # a wrong count or shape fails here, before any file
        return checked

    @property
    def names(self) -> list[str]:
        return list(self.axes)

    def grid(self) -> Grid:
        """The run's grid: the first axis as x, the second (if any) as y, the third as its planes."""
        values = list(self.axes.values())
        return Grid(values[0], values[1] if len(values) > 1 else None, z=values[2] if len(values) > 2 else None)

    def identity(self) -> dict[str, Any]:
        """What a resumed file must have been made with: the geometry's name, axes and own identity."""
        return {"name": self.name, "axes": self.names, "identity": self._identity}

    def offset(self, index: tuple[int, ...]) -> list[torch.Tensor]:
        """Δθ at ``index`` (one int per axis), checked against θ*'s tensors."""
        delta = call_plugin(f"geometry {self.name!r}", "offset", lambda: self.geometry.offset(index))
        if not isinstance(delta, (list, tuple)) or len(delta) != len(self.shapes):
            count = len(delta) if isinstance(delta, (list, tuple)) else type(delta).__name__
            raise UserError(f"geometry {self.name!r}: offset{index} gave {count} tensors; the model has "
                            f"{len(self.shapes)} parameters (one tensor each, in model.parameters() order)")
        for k, (d, shape) in enumerate(zip(delta, self.shapes)):
            if not isinstance(d, torch.Tensor) or d.shape != shape or not d.is_floating_point():
                got = f"{tuple(d.shape)} {d.dtype}" if isinstance(d, torch.Tensor) else type(d).__name__
                raise UserError(f"geometry {self.name!r}: offset{index} tensor {k} is {got}; parameter {k} is "
                                f"{tuple(shape)} floating point")
        return list(delta)

    def offsets(self, plane: int, cells: Sequence[tuple[int, int]]) -> Iterator[list[torch.Tensor]]:
        """The offsets at grid cells (j, i) of ``plane``, one at a time (the evaluator takes a pass's worth)."""
        ndim = len(self.axes)
        return (self.offset((i, j, plane)[:ndim]) for j, i in cells)


def _checked_axes(name: str, axes: Any) -> dict[str, np.ndarray]:
    """The axes as {name: float64 array}, refused in one line unless 1 to MAX_AXES named, non-empty,
    finite, increasing 1-D sequences."""
    if not hasattr(axes, "items") or not 1 <= len(axes) <= MAX_AXES:
        size = len(axes) if hasattr(axes, "__len__") else type(axes).__name__
        raise UserError(f"geometry {name!r}: axes must be a dict of 1 to {MAX_AXES} named axes; it has {size}")
    out: dict[str, np.ndarray] = {}
    for axis, values in axes.items():
        if not isinstance(axis, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", axis):
            raise UserError(f"geometry {name!r}: axis name {axis!r} must be a word of letters, digits and _")
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"geometry {name!r}: axis {axis!r} is not a sequence of numbers") from None
        if v.ndim != 1 or not len(v) or not np.isfinite(v).all() or (np.diff(v) <= 0).any():
            raise UserError(f"geometry {name!r}: axis {axis!r} must be a non-empty, finite, increasing 1-D "
                            f"sequence (got shape {v.shape})")
        out[axis] = v
    check_points_fit(int(np.prod([len(v) for v in out.values()])))
    return out
