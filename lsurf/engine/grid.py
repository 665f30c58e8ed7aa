"""The (alpha, beta) grid, its parsing from ``MIN:MAX:NUM`` specs, and its partition into tiles."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from lsurf.errors import UserError

# Bytes the surface file and the in-memory bookkeeping need per grid point: 4 splits' worth of
# float64 values and standard errors plus the done mask, with headroom.
_BYTES_PER_POINT = 96


def parse_axis(spec: str, name: str) -> np.ndarray:
    """``"-1:1:51"`` -> ``numpy.linspace(-1, 1, 51)``; every malformed spec is a :class:`UserError`."""
    parts = str(spec).split(":")
    if len(parts) != 3:
        raise UserError(f"`{name}` {spec!r}: expected MIN:MAX:NUM, e.g. -1:1:51")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"`{name}` {spec!r}: MIN and MAX must be numbers") from None
    try:
        num = int(parts[2])
    except ValueError:
        raise UserError(f"`{name}` {spec!r}: NUM must be a whole number") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"`{name}` {spec!r}: MIN and MAX must be finite")
    if num < 1:
        raise UserError(f"`{name}` {spec!r}: NUM must be at least 1")
    if hi < lo or (hi == lo and num > 1):
        raise UserError(f"`{name}` {spec!r}: MAX must be greater than MIN")
    check_points_fit(num)  # before numpy is asked for the coordinates themselves
    return np.linspace(lo, hi, num)


def check_points_fit(num_points: int) -> None:
    """Refuse a grid whose values would take more than half of this machine's memory."""
    need = num_points * _BYTES_PER_POINT
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise UserError(f"grid of {num_points:,} points needs about {need / 2**30:.1f} GiB, "
                        f"more than half of this machine's {have / 2**30:.1f} GiB: use fewer points")


@dataclass(frozen=True)
class Tile:
    """A rectangle of grid points: rows ``j0:j1`` (beta) by columns ``i0:i1`` (alpha) of plane ``plane``."""

    index: int
    j0: int
    j1: int
    i0: int
    i1: int
    plane: int = 0

    @property
    def size(self) -> int:
        return (self.j1 - self.j0) * (self.i1 - self.i0)


@dataclass(frozen=True)
class Grid:
    """Coordinates of a 1-D (``y is None``) or 2-D surface; values are stored as ``[j, i]`` at ``(x[i], y[j])``.

    Inside lsurf every grid is a plane: a curve is one row, ``plane_shape`` (1, nx), with β = 0.
    Only the file and the plots see its own ``shape`` (nx,) (:meth:`as_plane` converts).
    ``planes`` K: an ensemble of K planes (each its own directions) over the same coordinates; the
    file then has a leading plane axis, ``shape`` (K, ny, nx) or (K, nx). Inside, values of any grid
    are viewed as ``stack_shape`` (K or 1, rows, columns) (:meth:`as_stack`). A geometry of three
    axes is such a stack too, its third axis's coordinates ``z`` the planes'.
    """

    x: np.ndarray
    y: np.ndarray | None = None
    planes: int | None = None
    z: np.ndarray | None = None  # a geometry's third axis: plane k lies at z[k] (an ensemble's: 0..K-1)

    def __post_init__(self) -> None:
        if self.z is not None:
            object.__setattr__(self, "planes", len(self.z))
        if self.planes is not None and self.planes < 1:
            raise UserError(f"`planes` {self.planes}: must be at least 1")

    @classmethod
    def parse(cls, x: str, y: str | None = None, planes: int | None = None) -> Grid:
        grid = cls(parse_axis(x, "x"), None if y is None else parse_axis(y, "y"), planes)
        grid.check_fits_in_memory()
        return grid

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        own = (len(self.x),) if self.y is None else (len(self.y), len(self.x))
        return own if self.planes is None else (self.planes, *own)

    @property
    def num_planes(self) -> int:
        return self.planes or 1

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        """(planes, rows, columns): every grid's values as a stack of planes (one, unless an ensemble)."""
        return (self.num_planes, *self.plane_shape)

    def as_stack(self, values: np.ndarray) -> np.ndarray:
        """Values of ``shape`` viewed as ``stack_shape``."""
        return values.reshape(self.stack_shape)

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(rows, columns): (ny, nx), or (1, nx) for a curve."""
        return (1 if self.y is None else len(self.y), len(self.x))

    def as_plane(self, values: np.ndarray) -> np.ndarray:
        """Values of ``shape`` viewed as ``plane_shape``."""
        return values.reshape(self.plane_shape)

    @property
    def num_points(self) -> int:
        return int(np.prod(self.shape))

    def check_fits_in_memory(self) -> None:
        check_points_fit(self.num_points)

    def coords(self, j: int, i: int) -> tuple[float, float]:
        """(alpha, beta) of point ``[j, i]``; beta is 0 on a 1-D grid."""
        return float(self.x[i]), (0.0 if self.y is None else float(self.y[j]))

    def tiles(self, shape: tuple[int, int] | None = None, ranks: int = 1, min_points: int = 1) -> list[Tile]:
        """Cut each plane into rectangles, plane after plane; by default about 4 per rank so dynamic
        scheduling can balance, each a whole number of ``min_points`` (K: the points one stacked pass
        evaluates) where the plane allows, so no pass runs at another K (a new K costs a GPU new
        plans and memory). Only tiles at a plane's right or bottom edge may hold fewer: their last
        pass is a smaller one. A tile never spans two planes: their points move the weights along
        other directions."""
        ny, nx = self.plane_shape
        th, tw = shape if shape is not None else self._default_tile(ny, nx, ranks, min_points, self.num_planes)
        th, tw = max(1, min(th, ny)), max(1, min(tw, nx))
        tiles: list[Tile] = []
        for k in range(self.num_planes):
            for j0 in range(0, ny, th):
                for i0 in range(0, nx, tw):
                    tiles.append(Tile(len(tiles), j0, min(j0 + th, ny), i0, min(i0 + tw, nx), k))
        return tiles

    @staticmethod
    def _default_tile(ny: int, nx: int, ranks: int, k: int = 1, planes: int = 1) -> tuple[int, int]:
        """(rows, columns) of about a quarter of a rank's share (``target`` points) and at least
        ``k``. For K > 1, the shape of at most twice that size whose tiles take the fewest passes
        over the plane: ``rows`` × ``columns`` a multiple of K, so only the bottom band's tiles end
        in a smaller pass (and the right edge's, where no width gives a multiple)."""
        target = max(1, k, (planes * ny * nx) // (4 * max(1, ranks)))  # points per tile
        whole_rows = (max(1, min(ny, -(-target // nx))), nx) if target >= nx else (1, target)
        if k == 1:
            return whole_rows
        shapes = [whole_rows]
        for width in range(1, nx + 1):
            step = k // math.gcd(k, width)  # rows of this width make a multiple of k in multiples of step
            need = -(-target // width)
            rows = min(ny, -(-need // step) * step)
            if rows * width <= 2 * target:
                shapes.append((rows, width))
        return min(shapes, key=lambda s: (_passes(ny, nx, s[0], s[1], k), abs(s[0] * s[1] - target), -s[1]))


def _passes(ny: int, nx: int, rows: int, width: int, k: int) -> int:
    """Passes of ``k`` points that tiles of ``rows`` × ``width`` take over an ny × nx plane."""
    bands = [(ny // rows, rows), (1, ny % rows)]
    columns = [(nx // width, width), (1, nx % width)]
    return sum(nb * nc * -(-(h * w) // k) for nb, h in bands for nc, w in columns)


def parse_tile(spec: str | None) -> tuple[int, int] | None:
    """``"4x8"`` -> (4 rows of beta, 8 columns of alpha); ``None`` keeps the automatic choice."""
    if spec is None:
        return None
    try:
        a, b = (int(v) for v in str(spec).lower().split("x"))
    except ValueError:
        raise UserError(f"`tile` {spec!r}: expected ROWSxCOLS, e.g. 4x8") from None
    if a < 1 or b < 1:
        raise UserError(f"`tile` {spec!r}: both sides must be at least 1")
    return a, b
