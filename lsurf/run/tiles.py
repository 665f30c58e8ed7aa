"""A surface run's points, tile by tile: the tile loop (queue, evaluation, writes, progress) and
the coarse-to-fine rounds over it, for any kind of points (lsurf.run.points).

In a rank group only the leader takes tiles and writes; every rank of the group evaluates every
point on its share of the data. What the loop evaluates is a :class:`lsurf.run.points.PointSet`:
cells of a plane in, one result per cell out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lsurf.engine.evaluation.plan import Plan
from lsurf.engine.formats import surface_file
from lsurf.engine.geometry.grid import Grid, Tile, parse_tile
from lsurf.engine.geometry.refine import STEERING, Refiner
from lsurf.run.options import Options
from lsurf.run.points import PointSet
from lsurf.run.transport import TileQueue, TileSink
from lsurf.run.world import Group, World

Log = Callable[[str], None]


def run_rounds(w: World, group: Group, points: PointSet, grid: Grid, path: Path, existing: dict | None,
               opts: Options, plan: Plan, refiner: Refiner | None, log: Log) -> dict:
    """Every point in one round, or coarse-to-fine rounds (lsurf.engine.geometry.refine) chosen by
    rank 0's ``refiner`` from what the file holds after each. A resumed run replays the rounds from
    the start: the refiner reads only the points it chose, so it chooses as an uninterrupted run did."""
    if not opts.refines:
        return run_tiles(w, group, points, grid, path, existing, opts, plan, log)
    steer = [n for n in points.first.quantities if n.endswith(STEERING)]
    stats: dict = {}
    while True:
        step = w.bcast(_next_round(refiner, steer, grid, path, opts) if refiner is not None else None)
        if step is None:
            return stats
        wanted, existing = step
        if refiner is not None:
            cap = "" if refiner.budget is None else f" of the budget's {refiner.budget}"
            log(f"round {refiner.rounds}: {int(wanted.sum())} points, {int(refiner.selected.sum())}{cap} chosen so far")
        done = run_tiles(w, group, points, grid, path, existing, opts, plan, log, wanted=wanted.reshape(grid.shape))
        stats = {k: v + stats.get(k, 0) if k != "rank" else v for k, v in done.items()}


def _next_round(refiner: Refiner, steer: list[str], grid: Grid, path: Path,
                opts: Options) -> tuple[np.ndarray, dict | None] | None:
    """Rank 0: the next round's points and the file's values now (None: refinement is over), with
    the refinement's state recorded in the file (plots fill a file that is ``refined``)."""
    existing, _ = existing_points(path)
    values = existing["values"] if existing else {}
    nan = np.full(grid.plane_shape, np.nan)
    wanted = refiner.next_round({n: grid.as_plane(values[n]) if n in values else nan for n in steer})
    state = {"budget": opts.budget, "refine_tol": opts.refine_tol, "steering": steer,
             "coarse_stride": refiner.stride, "rounds": refiner.rounds, "chosen": int(refiner.selected.sum()),
             "finished": wanted is None}
    surface_file.set_attrs(path, {"refinement": json.dumps(state)})
    return None if wanted is None else (wanted, existing)


def run_tiles(w: World, group: Group, at: PointSet, grid: Grid, path: Path, existing: dict | None,
              opts: Options, plan: Plan, log: Log, wanted: np.ndarray | None = None) -> dict:
    """Take tiles until the queue is empty. In a group only the leader takes tiles (and tells the
    others which) and only it writes (every rank its own tiles where the ``plan``'s writer is mpio);
    every rank of the group evaluates every point on its share. ``wanted``: the only points to
    compute (a coarse-to-fine round), else all not done."""
    done = grid.as_stack(existing["done"]) if existing else np.zeros(grid.stack_shape, dtype=bool)
    if wanted is not None:
        done = done | ~grid.as_stack(wanted)  # what is not wanted counts as done here, and is not marked so
    tiles = [t for t in grid.tiles(parse_tile(opts.tile), group.count, at.first.points_per_pass,
                                   opts.tile_order) if not done[t.index_in_stack].all()]
    todo_points = int((~done).sum())
    parallel_io = plan.writer == "mpio"
    if w.is_root:
        log(f"{len(tiles)} tiles, {todo_points} of {grid.num_points} points to do; "
            f"writer: {'parallel HDF5 (mpio)' if parallel_io else 'rank 0'}; {layout_line(w, group, opts.shard)}")
    sink = TileSink(w, path, grid, tiles, parallel_io, senders=group.count, puts=group.is_leader)
    queue = TileQueue(w, len(tiles), opts.schedule, slot=group.index, slots=group.count)
    if queue.progress_note:
        log(queue.progress_note)
    bar = _progress_bar(todo_points) if (opts.progress and w.is_root) else None
    points, seconds = 0, 0.0
    wall = time.perf_counter()
    try:
        while (k := group.bcast(queue.next() if group.is_leader else None)) is not None:
            t0 = time.perf_counter()
            values, held = _evaluate_tile(at, grid, tiles[k], done, existing)
            seconds += time.perf_counter() - t0
            if group.is_leader:
                n = int(held.sum()) - _held_before(grid, tiles[k], existing)
                points += n
                queue.add_done(n)
                sink.put(k, values, held)
            if bar is not None:
                bar.update(queue.points_done() - bar.n)
        write_seconds = sink.finish()
        w.barrier()
        if bar is not None:
            bar.update(queue.points_done() - bar.n)
    except BaseException:
        queue.stop_progress()
        sink.abandon()
        raise
    finally:
        if bar is not None:
            bar.close()
    queue.close()
    return {"rank": w.rank, "points": points, "seconds": seconds, "write_seconds": write_seconds,
            "wall_seconds": time.perf_counter() - wall}


def _evaluate_tile(points: PointSet, grid: Grid, t: Tile, done: np.ndarray,
                   existing: dict | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Values of every quantity over the tile (shaped as its lattice, ``Tile.shape``), and which
    points hold one: points already done keep their stored values (and finish times, under
    ``finished_at``), those ``done`` marks but the file does not (left out of a round) stay NaN."""
    at, names = t.index_in_stack, points.quantities
    vals = {n: np.full(t.shape, np.nan) for n in names}
    held = np.zeros(t.shape, dtype=bool)
    if existing is not None:
        for n in names:
            vals[n][:] = grid.as_stack(existing["values"][n])[at]
        held[:] = grid.as_stack(existing["done"])[at]
        if existing["finished_at"] is not None:
            vals[surface_file.FINISHED_AT] = np.where(held, grid.as_stack(existing["finished_at"])[at], np.nan)
    before = done[at]
    todo = [(a, b) for a, b in np.ndindex(*t.shape) if not before[a, b]]
    for (a, b), result in zip(todo, points.evaluate(t.plane, [t.point(a, b) for a, b in todo])):
        held[a, b] = True
        for n, v in result.items():
            vals[n][a, b] = v
    return vals, held


def _held_before(grid: Grid, t: Tile, existing: dict | None) -> int:
    return int(grid.as_stack(existing["done"])[t.index_in_stack].sum()) if existing else 0


def _progress_bar(total: int):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit="pt", desc="lsurf", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30, smoothing=0.1)


def layout_line(w: World, group: Group, shard: str | None) -> str:
    if group.size == 1:
        return f"{w.size} rank{'s' * (w.size > 1)}, one per point"
    sharded = f" and of the model (sharded {group.size} ways, {shard})" if shard else ""
    return (f"{w.size} ranks in {group.count} groups of {group.size}: each rank holds 1/{group.size} of every split"
            + sharded)


def existing_points(path: Path) -> tuple[dict | None, Plan | None]:
    """The done mask, values and finish times (None in a file from before them) of a resumed file
    (None for a fresh one), and its run plan."""
    surface = surface_file.read_surface(path)
    plan = Plan.from_json(surface.attrs["plan"]) if "plan" in surface.attrs else None
    if not surface.done.any():
        return None, plan
    return {"done": surface.done, "values": surface.values, "finished_at": surface.finished_at}, plan
