"""The (alpha, beta) grid, its parsing from ``MIN:MAX:NUM`` specs, and its partition into tiles."""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass, replace
from typing import Literal

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


TileOrder = Literal["coarse", "contiguous"]
# Coarse-first: the first block of a plane is every 4th row and column (every 16th point of a
# curve), 1/16 of the points spread over all of it; each block after it halves the spacing. Where
# that costs time, a coarser start (every 2nd; every 4th of a curve) is tried next.
COARSE_STRIDES = {1: [(1, 16), (1, 4)], 2: [(4, 4), (2, 2)]}  # (rows, columns) of a first block, by ndim
TAILS = (1, 2, 4)  # the last block's tiles at 1, 1/2 or 1/4 of the others' points: ranks end closer together
TAIL_GAIN = 1.01  # smaller tiles at the end only where they end the run at least 1 % sooner
COST_ALLOWED = 1.02  # at most 2 % longer than the contiguous order, in passes of the slowest rank (issue 34)


@dataclass(frozen=True)
class Tile:
    """A lattice of grid points: rows ``j0:j1:dj`` (beta) by columns ``i0:i1:di`` (alpha) of plane
    ``plane``; the steps are 1 for a rectangle. A strided tile is still one HDF5 hyperslab, so
    every writer writes it in one call."""

    index: int
    j0: int
    j1: int
    i0: int
    i1: int
    plane: int = 0
    dj: int = 1
    di: int = 1

    @property
    def rows(self) -> slice:
        return slice(self.j0, self.j1, self.dj)

    @property
    def cols(self) -> slice:
        return slice(self.i0, self.i1, self.di)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the tile's own lattice: what its values are shaped as."""
        return len(range(self.j0, self.j1, self.dj)), len(range(self.i0, self.i1, self.di))

    @property
    def size(self) -> int:
        rows, cols = self.shape
        return rows * cols

    @property
    def index_in_stack(self) -> tuple[int, slice, slice]:
        """Where the tile lies in values viewed as ``Grid.stack_shape``."""
        return self.plane, self.rows, self.cols

    def point(self, a: int, b: int) -> tuple[int, int]:
        """Grid indices ``(j, i)`` of the tile's point ``[a, b]``."""
        return self.j0 + a * self.dj, self.i0 + b * self.di


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

    def tiles(self, shape: tuple[int, int] | None = None, ranks: int = 1, min_points: int = 1,
              order: TileOrder = "coarse") -> list[Tile]:
        """Cut each plane into tiles, plane after plane; by default about 4 per rank so dynamic
        scheduling can balance, each a whole number of ``min_points`` (K: the points one stacked pass
        evaluates) where its block allows, so no pass runs at another K (a new K costs a GPU new
        plans and memory). Only tiles at a block's right or bottom edge may hold fewer: their last
        pass is a smaller one. A tile never spans two planes: their points move the weights along
        other directions.

        ``order`` coarse (the default): each plane is dealt block after block (:func:`coarse_blocks`),
        so the first 1/16 of its points already cover all of it and a running job's file holds a
        picture of the whole plane early; ``shape`` then counts rows and columns of a block's lattice.
        Each block ends in its own smaller pass, and the run ends with other tiles than the
        contiguous order's: the last block's tiles are made smaller where that ends the ranks
        closer together (:func:`_makespan`), and where the run would still take more than 2 %
        longer than in the contiguous order (K large for the plane), a coarser start is used, or
        none. ``contiguous``: one block, the plane itself, in bands of rows (the order before;
        benches compare the two)."""
        ny, nx = self.plane_shape
        target = max(1, min_points, (self.num_planes * ny * nx) // (4 * max(1, ranks)))  # points per tile

        def every_plane(plane: list[Tile]) -> list[Tile]:
            return [replace(t, index=k * len(plane) + t.index, plane=k) for k in range(self.num_planes) for t in plane]

        def cost(tiles: list[Tile]) -> float:
            return _makespan(tiles, ranks, min_points)

        contiguous = every_plane(self._cut(coarse_blocks(ny, nx, (1, 1)), shape, target, min_points))
        if order == "coarse":
            allowed = COST_ALLOWED * cost(contiguous)
            for stride in COARSE_STRIDES[self.ndim]:
                blocks = coarse_blocks(ny, nx, stride)
                options = [every_plane(self._cut(blocks, shape, target, min_points, tail)) for tail in TAILS]
                least = min(cost(tiles) for tiles in options)
                coarse = next(tiles for tiles in options if cost(tiles) <= TAIL_GAIN * least)  # the fewest tiles
                if cost(coarse) <= allowed:
                    return coarse
        return contiguous

    def _cut(self, blocks: list[tuple[int, int, int, int]], shape: tuple[int, int] | None, target: int,
             k: int, tail: int = 1) -> list[Tile]:
        """One plane's tiles: each block's lattice in tiles of ``shape`` (default: about ``target``
        points, the last block's ``target / tail``, whole passes of ``k``), in bands of the
        lattice's rows, block after block."""
        ny, nx = self.plane_shape
        tiles: list[Tile] = []
        for n, (r0, dj, c0, di) in enumerate(blocks):
            rows, cols = len(range(r0, ny, dj)), len(range(c0, nx, di))
            points = max(1, k, target // tail) if n == len(blocks) - 1 else target
            th, tw = shape if shape is not None else self._default_tile(rows, cols, points, k)
            th, tw = max(1, min(th, rows)), max(1, min(tw, cols))
            for a in range(0, rows, th):
                for b in range(0, cols, tw):
                    tiles.append(Tile(len(tiles), r0 + a * dj, r0 + (min(a + th, rows) - 1) * dj + 1,
                                      c0 + b * di, c0 + (min(b + tw, cols) - 1) * di + 1, 0, dj, di))
        return tiles

    @staticmethod
    def _default_tile(ny: int, nx: int, target: int, k: int = 1) -> tuple[int, int]:
        """(rows, columns) of an ny × nx lattice making tiles of about ``target`` points. For K > 1,
        the shape of at most twice that size whose tiles take the fewest passes over the lattice:
        ``rows`` × ``columns`` a multiple of K, so only the bottom band's tiles end in a smaller pass
        (and the right edge's, where no width gives a multiple)."""
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


def coarse_blocks(ny: int, nx: int, stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The coarse-first blocks of an ny × nx plane from a first lattice of steps ``stride`` (powers
    of 2), each ``(first row, row step, first column, column step)``: every point in exactly one,
    and the points of the first k blocks are a lattice. Halving the steps (dj, di) adds the new
    columns of the old rows, then the new rows at every new column: from (4, 4), (0::4, 0::4),
    (0::4, 2::4), (2::4, 0::2), (0::2, 1::2), (1::2, 0::1); from (1, 1), the plane. Blocks and not
    a point order because each block is a regular lattice: its tiles are strided hyperslabs, which
    HDF5 writes in one call. Blocks empty on a small plane are left out."""
    dj, di = stride
    blocks = [(0, dj, 0, di)]
    while dj > 1 or di > 1:
        hj, hi = max(1, dj // 2), max(1, di // 2)
        if hi < di:
            blocks.append((0, dj, hi, di))
        if hj < dj:
            blocks.append((hj, dj, 0, hi))
        dj, di = hj, hi
    return [(r0, sr, c0, sc) for r0, sr, c0, sc in blocks if r0 < ny and c0 < nx]


def _makespan(tiles: list[Tile], ranks: int, k: int) -> float:
    """Passes of ``k`` points the slowest of ``ranks`` equal ranks makes when each takes the next
    tile as soon as it is free (the dynamic schedule); each tile ends in its own pass. One rank:
    the passes of the whole run."""
    free = [0] * max(1, ranks)
    for t in tiles:
        heapq.heappush(free, heapq.heappop(free) + -(-t.size // k))
    return max(free)


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
