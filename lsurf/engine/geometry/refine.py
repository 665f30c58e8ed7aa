"""Coarse-to-fine sampling of a plane: which points of the requested grid to compute, round by
round, and how the points left out are filled in.

Round 0 computes a coarse lattice of the grid (every S-th row and column, S a power of two, and
the last ones), so a partial file already shows the whole picture; round 1 splits every cell of it
once. Splitting a cell computes its edge midpoints and centre; how far they lie from what its
corners predicted (bilinearly) is the cell's *surplus*. Interpolation error of a smooth surface
shrinks fourfold per halving, so each child expects a quarter of its parent's surplus. From round
2 on, a cell is split only where that expected error matters: above ``tol``, or where a contour
level the plots draw crosses the cell and the error would move that contour by more than half a
grid cell. The most urgent cells go first until ``budget`` points are computed.

Everything here is a pure function of the grid and the values of the points chosen so far, so
every rank, a resumed run (which replays the rounds) and an uninterrupted one choose the same
points. The same lattices fill the rest (:func:`fill`), level by level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsurf.engine.geometry.levels import default_levels
from lsurf.errors import UserError

_SHIFT = 0.5  # the largest contour shift (in grid cells) left unrefined
STEERING = ("_loss",)  # the quantities whose contours refinement keeps in place (by name ending)


def coarse_stride(shape: tuple[int, int]) -> int:
    """S: the largest power of two leaving at least 5 coarse points along the longer axis."""
    s = 1
    while (max(shape) - 1) // (2 * s) >= 4:
        s *= 2
    return s


def lattice(n: int, h: int) -> np.ndarray:
    """Indices of the level-``h`` lattice of an axis of ``n`` points: every h-th, and the last."""
    return np.unique(np.r_[np.arange(0, n, h), n - 1])


@dataclass(frozen=True)
class Cell:
    """Rows ``j0..j1`` by columns ``i0..i1`` (corners computed) at level ``h``; ``err``: the
    interpolation error expected inside it, per steering quantity (inf: split it regardless)."""

    j0: int
    j1: int
    i0: int
    i1: int
    h: int
    err: tuple[float, ...]

    def mids(self) -> tuple[int | None, int | None]:
        """The row and column where the cell splits at the next level (None: that side does not)."""
        m = self.h // 2
        return (self.j0 + m if self.j0 + m < self.j1 else None, self.i0 + m if self.i0 + m < self.i1 else None)

    def children(self, err: tuple[float, ...]) -> list[Cell]:
        mj, mi = self.mids()
        rows = [(self.j0, self.j1)] if mj is None else [(self.j0, mj), (mj, self.j1)]
        cols = [(self.i0, self.i1)] if mi is None else [(self.i0, mi), (mi, self.i1)]
        return [Cell(a, b, c, d, self.h // 2, err) for a, b in rows for c, d in cols]

    def new_points(self) -> list[tuple[int, int]]:
        """The points splitting the cell computes (some may be shared with a neighbour)."""
        mj, mi = self.mids()
        pts = []
        if mi is not None:
            pts += [(self.j0, mi), (self.j1, mi)]
        if mj is not None:
            pts += [(mj, self.i0), (mj, self.i1)]
        if mi is not None and mj is not None:
            pts.append((mj, mi))
        return sorted(set(pts))

    def bilinear(self, z: np.ndarray, j: int, i: int) -> float:
        v = (j - self.j0) / (self.j1 - self.j0) if self.j1 > self.j0 else 0.0
        u = (i - self.i0) / (self.i1 - self.i0) if self.i1 > self.i0 else 0.0
        return float((1 - v) * ((1 - u) * z[self.j0, self.i0] + u * z[self.j0, self.i1])
                     + v * ((1 - u) * z[self.j1, self.i0] + u * z[self.j1, self.i1]))


class Refiner:
    """The rounds of a coarse-to-fine run over a plane of ``shape`` (rows, columns).

    ``budget``: the most points to compute (None: no limit); ``tol``: the interpolation error of a
    steering quantity (a loss) below which a cell is left alone (None: only contour placement
    counts). Call :meth:`next_round` with the values known so far until it returns None.
    """

    def __init__(self, shape: tuple[int, int], budget: int | None = None, tol: float | None = None):
        if tol is not None and not tol > 0:
            raise UserError(f"`refine_tol` {tol}: must be positive")
        self.shape, self.budget, self.tol = shape, budget, tol
        self.stride = coarse_stride(shape)
        self.selected = np.zeros(shape, dtype=bool)
        self.leaves: list[Cell] = []
        self.split: list[Cell] = []  # cells split in the last round: their surplus is measured next
        self.rounds = 0
        start = self.initial_points()
        if budget is not None and budget < start:
            raise UserError(f"`budget` {budget}: the coarse lattice and its first split alone take {start} points "
                            f"of this grid (at least that many are needed for a picture)")

    def initial_points(self) -> int:
        """Points of rounds 0 and 1 (the lattice at S/2, or the whole grid when S is 1)."""
        h = max(self.stride // 2, 1)
        return len(lattice(self.shape[0], h)) * len(lattice(self.shape[1], h))

    def next_round(self, values: dict[str, np.ndarray]) -> np.ndarray | None:
        """The points of the next round (a boolean mask of the plane), from ``values`` (an array per
        steering quantity, by name; only the points already chosen are read); None once done."""
        if self.rounds == 0:
            mask = np.zeros(self.shape, dtype=bool)
            mask[np.ix_(lattice(self.shape[0], self.stride), lattice(self.shape[1], self.stride))] = True
            self.leaves = self._coarse_cells(len(values))
            return self._take(mask)
        self._measure(list(values.values()))
        return self._choose(values)

    def _take(self, mask: np.ndarray) -> np.ndarray | None:
        mask &= ~self.selected
        self.rounds += 1
        if not mask.any():
            return None
        self.selected |= mask
        return mask

    def _coarse_cells(self, n: int) -> list[Cell]:
        rows, cols = lattice(self.shape[0], self.stride), lattice(self.shape[1], self.stride)
        rows_pairs = list(zip(rows[:-1], rows[1:])) or [(0, 0)]
        cols_pairs = list(zip(cols[:-1], cols[1:])) or [(0, 0)]
        inf = (float("inf"),) * n
        return [Cell(int(a), int(b), int(c), int(d), self.stride, inf) for a, b in rows_pairs for c, d in cols_pairs]

    def _measure(self, values: list[np.ndarray]) -> None:
        """Replace the cells split last round by their children, each expecting a quarter of its
        parent's surplus (non-finite values, e.g. overflow, teach nothing: they count as none)."""
        for cell in self.split:
            surplus = []
            for z in values:
                gaps = [abs(z[j, i] - cell.bilinear(z, j, i)) for j, i in cell.new_points()]
                finite = [g for g in gaps if np.isfinite(g)]
                surplus.append(max(finite, default=0.0) / 4)
            self.leaves += cell.children(tuple(surplus))
        self.split = []

    def _choose(self, values: dict[str, np.ndarray]) -> np.ndarray | None:
        levels = [_levels(z, self.selected, name) for name, z in values.items()]
        urgent = []
        for cell in self.leaves:
            if cell.h > 1:
                p = max(self._priority(cell, z, e, lv) for z, e, lv in zip(values.values(), cell.err, levels))
                if p > 1:
                    urgent.append((-p, cell.j0, cell.i0, cell))
        urgent.sort(key=lambda t: t[:3])
        mask = np.zeros(self.shape, dtype=bool)
        room = np.inf if self.budget is None else self.budget - int(self.selected.sum())
        chosen = []
        for *_, cell in urgent:
            new = [pt for pt in cell.new_points() if not (self.selected[pt] or mask[pt])]
            if len(new) > room:
                break
            for pt in new:
                mask[pt] = True
            room -= len(new)
            chosen.append(cell)
        if chosen:
            keep = {id(c) for c in chosen}
            self.leaves = [c for c in self.leaves if id(c) not in keep]
            self.split = chosen
        return self._take(mask)

    def _priority(self, cell: Cell, z: np.ndarray, err: float, levels: np.ndarray) -> float:
        """How urgent a split is: > 1 means split. ``err`` over ``tol``; and where a contour level
        crosses the cell, twice the contour shift the error would cause, in grid cells (the
        corners' spread over the cell's width is the change per cell)."""
        if not np.isfinite(err):
            return np.inf
        corners = z[[cell.j0, cell.j0, cell.j1, cell.j1], [cell.i0, cell.i1, cell.i0, cell.i1]]
        if not np.isfinite(corners).all():
            return 0.0
        p = err / self.tol if self.tol is not None else 0.0
        lo, hi = corners.min(), corners.max()
        if levels.size and ((levels >= lo - err) & (levels <= hi + err)).any():
            shift = err * cell.h / max(hi - lo, 1e-300)
            p = max(p, shift / _SHIFT)
        return float(p)


def _levels(z: np.ndarray, known: np.ndarray, name: str) -> np.ndarray:
    """The levels a plot of the known values of ``name`` draws (none while nothing finite is known)."""
    seen = z[known]
    seen = seen[np.isfinite(seen)]
    return default_levels(seen, name) if seen.size else np.empty(0)


def fill(z: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``z`` with the points not ``known`` interpolated from the coarse lattice down, level by
    level. A point on a lattice line is interpolated along it: by the four-point rule (weights
    −1, 9, 9, −1 over 16: exact for cubics, and smooth in the limit, so contours do not kink at
    cell edges) where the lattice is even around it, linearly elsewhere. A point between lines
    takes the mean of the two directions, so edge points a finer neighbour computed count. Points
    whose neighbours are unknown stay NaN."""
    out = np.where(known, z, np.nan).astype(np.float64)
    rows, cols = out.shape
    h = coarse_stride((rows, cols))
    while h > 1:
        r_old, c_old = lattice(rows, h), lattice(cols, h)
        r_new, r_rule = _stencil(lattice(rows, h // 2), r_old)
        c_new, c_rule = _stencil(lattice(cols, h // 2), c_old)
        _fill_at(out, known, r_old, c_new, _apply(out[r_old], c_rule, axis=1))
        _fill_at(out, known, r_new, c_old, _apply(out[:, c_old], r_rule, axis=0))
        if len(r_new) and len(c_new):
            both = 0.5 * (_apply(out[:, c_new], r_rule, axis=0) + _apply(out[r_new], c_rule, axis=1))
            _fill_at(out, known, r_new, c_new, both)
        h //= 2
    return out


Rule = tuple[np.ndarray, np.ndarray]  # (indices (n, 4), weights (n, 4)) of each new point's neighbours


def _stencil(fine: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, Rule]:
    """The indices of ``fine`` not in ``coarse``, and the rule that interpolates each from ``coarse``."""
    new = np.setdiff1d(fine, coarse)
    pos = np.searchsorted(coarse, new)
    lo, hi = coarse[pos - 1], coarse[pos]
    w = (new - lo) / np.maximum(hi - lo, 1)
    before, after = coarse[np.maximum(pos - 2, 0)], coarse[np.minimum(pos + 1, len(coarse) - 1)]
    even = (pos >= 2) & (pos + 1 < len(coarse)) & (lo - before == hi - lo) & (after - hi == hi - lo) & (w == 0.5)
    idx = np.where(even[:, None], np.stack([before, lo, hi, after], 1), np.stack([lo, lo, hi, hi], 1))
    four = np.array([-1.0, 9.0, 9.0, -1.0]) / 16
    wts = np.where(even[:, None], four, np.stack([np.zeros_like(w), 1 - w, w, np.zeros_like(w)], 1))
    return new, (idx, wts)


def _apply(z: np.ndarray, rule: Rule, axis: int) -> np.ndarray:
    """The rule's new points from ``z``'s values along ``axis`` (the other axis is kept)."""
    idx, wts = rule
    if axis == 1:
        return sum(wts[:, k][None, :] * z[:, idx[:, k]] for k in range(4))
    return sum(wts[:, k][:, None] * z[idx[:, k], :] for k in range(4))


def _fill_at(out: np.ndarray, known: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    block = np.ix_(rows, cols)
    out[block] = np.where(known[block], out[block], values)
