"""The distributed sampling run: tiles of the grid -> evaluator -> one shared surface file.

:func:`sample_points` is the one runner every job's points go through (lsurf.run.points: a
surface's planes or geometry, a curve and its line, sharpness's draws). Every rank calls it with
the same world. Rank 0 checks (or creates) the file, makes the run plan (or takes the one the file
records) and broadcasts both; tiles are taken from a shared queue, evaluated, and written as soon
as they finish (see lsurf.run.transport). :func:`sample_surface` and :func:`sample_geometry` are its
library calls on a model the caller holds; :func:`run_surface` is the whole ``lsurf surface`` job
from :class:`Options`: inputs by name, directions, provenance, then the runner.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsurf.engine.data.splits import AnySplit, BatchStreamSplit
from lsurf.engine.evaluation.evaluate import evaluator
from lsurf.engine.evaluation.metrics import Metric, metrics_for
from lsurf.engine.evaluation.plan import Plan
from lsurf.engine.evaluation.quantities import Quantities
from lsurf.engine.formats import surface_file
from lsurf.engine.formats.progress import RUN_STARTED, run_started
from lsurf.engine.geometry.directions import AnyDirections, save_directions
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.geometry.plugin import CheckedGeometry, load_geometry, model_params
from lsurf.engine.geometry.refine import Refiner
from lsurf.engine.model.sharding import is_sharded_model
from lsurf.errors import UserError
from lsurf.run.curvature import hessian_plane, plane_fidelity
from lsurf.run.options import Options
from lsurf.run.planning import check_inputs, make_plan, precision_of, refiner_for
from lsurf.run.points import GeometrySet, Planes, Sampled
from lsurf.run.provenance import RECORDED_SINCE, Provenance
from lsurf.run.runtime import bound_device, check_device_binding, choose_device
from lsurf.run.shard import group_mesh, shard_mesh
from lsurf.run.sources import (
    check_same_inputs,
    directions_for,
    directions_path,
    grid_for,
    load_inputs,
    model_skeleton,
    plane_directions,
)
from lsurf.run.tiles import existing_points, layout_line, run_rounds
from lsurf.run.world import Group, World, abort_on_failure

Log = Callable[[str], None]
PlaneDirections = AnyDirections | Sequence[AnyDirections]  # one plane's, or each plane's of an ensemble


def run_surface(options: Options, comm: Any = None, log: Log | None = None) -> surface_file.Surface | None:
    """What ``lsurf surface`` does, from options: load model and data, make or read the directions,
    sample, and return the surface on rank 0 (None elsewhere). Directions made here are saved
    beside the output (``NAME.directions.h5``) and named in its provenance; an ensemble's are
    not saved: plane k's are those of seed ``seed`` + k."""
    w = World.of(comm)
    log = log or (lambda m: None)
    with abort_on_failure(w):
        dev = w.agree(lambda: choose_device(w, options.device))
        with bound_device(dev):
            mesh = w.agree(lambda: shard_mesh(w, options, dev))
            grid, model, data, dirs = w.agree(lambda: _inputs(options, mesh))
        if options.shard and w.is_root:
            log(_sharded_line(options))
        sampled: Sampled
        if options.geometry:
            spec = options.geometry
            sampled = GeometrySet.of(model, w.agree(lambda: load_geometry(spec, model_params(model))))
        else:
            if dirs is None:  # a Hessian plane: every rank takes part in computing it
                dirs = hessian_plane(options, model, data, comm)
            sampled = w.agree(lambda: Planes(_planes(dirs, grid), grid))
        prov = Provenance.of(options)
        # a sharded model's directions are held by rows: its ranks draw them again from the seed
        save_to = (None if options.dir_file or options.planes > 1 or options.geometry or mesh is not None
                   else directions_path(options.out))
        return sample_points(w, model, data, sampled, Path(options.out), options, prov, save_to, log)


def _sharded_line(options: Options) -> str:
    """How a sharded run's model came to its ranks, for the log."""
    g = options.ranks_per_point
    if options.weights_on_disk:
        return f"model: built sharded {g} ways, each rank reading its 1/{g} of {options.weights_on_disk}"
    return f"model: drawn whole on every rank (no checkpoint), then sharded {g} ways"


def _inputs(options: Options, mesh: Any) -> tuple[Grid, nn.Module, dict[str, AnySplit], PlaneDirections | None]:
    """Grid, model, data and the directions (None: a Hessian plane, computed collectively after);
    ``mesh``: the one a sharded run's model is loaded onto."""
    grid = grid_for(options)
    model, data = load_inputs(options, mesh=mesh)
    if data is None:
        raise UserError("`data` is needed to sample a surface")
    if options.geometry:  # its points come from the geometry, made once the model is here
        return grid, model, data, None
    if options.directions != "random":
        return grid, model, data, None
    if options.planes > 1:
        return grid, model, data, plane_directions(options, model, grid.ndim == 2)
    return grid, model, data, directions_for(options, model, grid.ndim == 2)


def sample_surface(
    model: nn.Module,
    data: dict[str, AnySplit],
    directions: PlaneDirections,
    grid: Grid,
    out: str | Path,
    options: Options | None = None,
    *,
    comm: Any = None,
    provenance: Provenance | None = None,
    save_directions_to: str | Path | None = None,
    log: Log | None = None,
    **overrides: Any,
) -> surface_file.Surface | None:
    """Sample loss and accuracy over ``grid`` around the model's current weights into ``out``.

    Call it on every rank of an MPI job with the same ``comm`` (None: a single process). Returns
    the finished surface on rank 0 and None elsewhere; the model comes back exactly as it was,
    also when the call fails. A grid of K ``planes`` takes K directions, one per plane.
    ``options`` (or keyword ``overrides`` of them, e.g. ``loss="mse"``) say how to evaluate and
    write; choices left to the run plan (batch size, layout, points per pass) are made on rank 0,
    recorded in the file and reused when it is resumed. Process-wide settings (threads, malloc,
    float32 precision) are the caller's: see :func:`lsurf.run.runtime.configure_process`, which
    pins IEEE float32 unless ``tf32``. The call never changes them: it records the float32
    precision in force (and a GPU's model, CUDA and cuDNN versions), and a resume must match them.
    The run's GPU is the calling thread's current device for the call (restored after).
    ``provenance`` names the inputs (stored; its identity must match to resume);
    ``save_directions_to`` writes the directions there when a new file is started.
    """
    opts = (options or Options()).replace(**overrides)
    w = World.of(comm)
    with abort_on_failure(w):
        sampled = w.agree(lambda: Planes(_planes(directions, grid), grid))
        return sample_points(w, model, data, sampled, Path(out), opts, provenance or Provenance(config=opts.as_dict()),
                             save_directions_to, log or (lambda m: None))


def sample_geometry(
    model: nn.Module,
    data: dict[str, AnySplit],
    geometry: Any,
    out: str | Path,
    options: Options | None = None,
    *,
    comm: Any = None,
    provenance: Provenance | None = None,
    log: Log | None = None,
    **overrides: Any,
) -> surface_file.Surface | None:
    """Sample loss and accuracy at the points of ``geometry`` — a user's object with ``axes``,
    ``offset(index)`` and ``identity()`` (lsurf.engine.geometry.plugin), typically made from
    :func:`lsurf.engine.geometry.plugin.model_params` of this model — into ``out``, exactly as
    :func:`sample_surface` samples a plane: the same runner, options, resume and file; the grid is
    the geometry's axes. Every rank passes its own geometry object, answering alike."""
    opts = (options or Options()).replace(**overrides)
    w = World.of(comm)
    name = f"{type(geometry).__module__}.{type(geometry).__qualname__}"
    with abort_on_failure(w):
        checked = w.agree(lambda: CheckedGeometry.of(geometry, list(model.parameters()), name))
        return sample_points(w, model, data, GeometrySet.of(model, checked), Path(out), opts,
                             provenance or Provenance(config=opts.as_dict()), None, log or (lambda m: None))


def sample_points(w: World, model: nn.Module, data: dict[str, AnySplit], sampled: Sampled, path: Path,
                  opts: Options, prov: Provenance, save_to: str | Path | None, log: Log) -> surface_file.Surface | None:
    """The one runner, on every rank of ``w``, for any kind of points (lsurf.run.points): inputs
    checked, the file accepted or created, the plan made, the tiles evaluated and written. Returns
    the surface on rank 0 (None elsewhere); the caller handles failures (:func:`abort_on_failure`)."""
    grid = sampled.grid
    dev = w.agree(lambda: choose_device(w, opts.device))
    with bound_device(dev):
        outputs, plugins = w.agree(lambda: check_inputs(w, model, data, sampled.planes[0], grid, opts, dev))
        w.agree(lambda: check_device_binding(w, dev))
        metrics = (*metrics_for(next(iter(data.values())).rows(0, 1)[1], opts.ignore_index), *plugins)
        group = w.groups(opts.ranks_per_point)
        try:
            mesh = group_mesh(w, group, dev) if opts.shard else None
            return _sample_in_groups(w, group, (dev, outputs, mesh), model, data, sampled, path, opts, prov,
                                     save_to, metrics, log)
        finally:
            group.free()


def _planes(directions: PlaneDirections, grid: Grid) -> list[AnyDirections]:
    """The directions of each plane, as many as the grid has planes."""
    planes = list(directions) if isinstance(directions, Sequence) else [directions]
    if len(planes) != grid.num_planes:
        raise UserError(f"the grid has {grid.num_planes} planes but {len(planes)} sets of directions were given")
    return planes


def _sample_in_groups(w: World, group: Group, probe: tuple[torch.device, int, Any], model: nn.Module,
                      data: dict[str, AnySplit], sampled: Sampled, path: Path, opts: Options,
                      prov: Provenance, save_to: str | Path | None, metrics: Sequence[Metric],
                      log: Log) -> surface_file.Surface | None:
    """The run once the inputs are checked: ``probe`` is this rank's device, the output values
    one sample gives (for the default batch size) and the group's mesh if the model is sharded
    (lsurf.run.shard); ``metrics``: the built-in ones for the targets and the user's own;
    ``sampled``: what the points are."""
    dev, outputs, mesh = probe
    planes, grid = sampled.planes, sampled.grid
    identity = {**prov.identity(planes, data, opts, fingerprints=w.is_root, device=dev), **sampled.identity()}
    place = group.rank if is_sharded_model(model) else 0  # ranks holding the same shards compare
    w.agree(lambda: check_same_inputs(w, model, identity["directions_sha256"], place))
    with contextlib.ExitStack() as stack:
        def prepare() -> tuple[dict | None, Plan, Refiner | None] | None:
            """Rank 0: the file accepted (or refused), the plan made, then the file created."""
            if not w.is_root:
                return None
            stack.enter_context(surface_file.exclusive_lock(path))
            resuming = surface_file.accept(path, grid, identity, opts.overwrite, RECORDED_SINCE)
            existing, stored = existing_points(path) if resuming else (None, None)
            refiner = refiner_for(grid, opts)
            plan = make_plan(w, group, model, data, grid, (dev, outputs), opts, stored, log)
            if not resuming:
                attrs = _save_directions(planes[0], save_to, prov).attrs(planes, w.size)
                _create(path, grid, identity, sampled, data, metrics, opts, attrs)
            return existing, plan, refiner

        existing, plan, refiner = w.bcast(w.agree(prepare))
        stats, plan = _evaluate_grid(w, (group, mesh), dev, model, data, sampled, path, opts, existing, plan,
                                     refiner if w.is_root else None, metrics, log)
        gathered = w.gather(stats)
        # after the evaluator is gone: its device copies (splits, θ*, directions) are freed, so the
        # Hessian's products have the room the points had
        fidelity = _fidelity_attrs(w, model, data, sampled, opts, dev, plan, path, log)
        if w.is_root:
            assert gathered is not None  # gather returns the list on rank 0
            surface_file.set_attrs(path, {**_run_attrs(gathered, plan), "launcher": w.launcher, "world_size": w.size,
                                          "rank_layout": layout_line(w, group, opts.shard),
                                          "streamed": ",".join(plan.streamed), **fidelity},
                                   drop=() if opts.refines else ("refinement",))  # now a whole grid
    return surface_file.read_surface(path) if w.is_root else None


def _create(path: Path, grid: Grid, identity: dict, sampled: Sampled, data: dict[str, AnySplit],
            metrics: Sequence[Metric], opts: Options, attrs: dict) -> None:
    """A fresh surface file: every quantity allocated, identity and ``attrs`` (provenance) recorded."""
    attrs.update(sampled.attrs())
    if opts.tolerance:  # what the samples a point used are a share of
        attrs["split_sizes"] = json.dumps({s: len(split) for s, split in data.items()
                                           if not isinstance(split, BatchStreamSplit)})
    names = sampled.quantities(Quantities.of(data, metrics, opts.hessian_iters > 0, bool(opts.tolerance)).names)
    surface_file.create(path, grid, names, identity, attrs)


def _evaluate_grid(w: World, groups: tuple[Group, Any], dev: torch.device, model: nn.Module, data: dict[str, AnySplit],
                   sampled: Sampled, path: Path, opts: Options, existing: dict | None, plan: Plan,
                   refiner: Refiner | None, metrics: Sequence[Metric], log: Log) -> tuple[dict, Plan]:
    """Every point of the grid this rank takes part in, and the run plan with its points per pass.
    The evaluator lives only in here: once this returns, nothing holds its copies on the device
    any more. ``groups``: this rank's group and, if the model is sharded over it, its mesh."""
    group, mesh = groups
    grid = sampled.grid
    # the Hessian at each point of a model that came sharded runs its gathered weights through this
    skeleton = model_skeleton(opts, data, model) if is_sharded_model(model) else None  # gradients, Hessians
    with evaluator(model, data, sampled.planes[0], device=dev, dtype=opts.torch_dtype, batch_size=plan.batch_size,
                   channels_last=plan.channels_last, loss=opts.loss, bn=opts.bn,
                   points_per_pass=plan.points_per_pass or 1, amp=opts.amp == "bf16",
                   hessian_iters=opts.hessian_iters, metrics=metrics, output=opts.output,
                   ignore_index=opts.ignore_index, streamed=plan.streamed, precision=precision_of(opts),
                   workers=plan.workers, shard=(group.rank, group.size), reduce=group.add_sums(), mesh=mesh,
                   skeleton=skeleton) as ev:
        if not plan.points_per_pass:
            if mesh is None:  # Rank 0 calibrates and decides, so every rank takes the same path. The others
                # wait meanwhile, so calibration is weighed against one rank's share of the points.
                todo = min(grid.num_points - (int(existing["done"].sum()) if existing else 0),
                           opts.budget or grid.num_points)
                ev.points_per_pass = w.bcast(ev.calibrate(points=-(-todo // group.count), log=log)
                                             if w.is_root else None)
            plan = replace(plan, points_per_pass=ev.points_per_pass)
        if w.is_root:  # readers tell a running job, its rate and ETA by these (lsurf.engine.formats.progress)
            started = {RUN_STARTED: run_started(int(existing["done"].sum()) if existing else 0)}
            surface_file.set_attrs(path, {**started, "plan": plan.to_json()}, drop=("finished",))
        w.barrier()  # rank 0 has closed the file again before the writers open it
        log(f"rank {w.rank}/{w.size} (local {w.local_rank}/{w.local_size}, group {group.index}/{group.count}) "
            f"on {dev}, {torch.get_num_threads()} threads")
        stats = run_rounds(w, group, sampled.points(ev), grid, path, existing, opts, plan, refiner, log)
        return {**stats, "weights": ev.held_weights}, plan


def _save_directions(directions: AnyDirections, path: str | Path | None, prov: Provenance) -> Provenance:
    """Write the directions (only once the output is accepted: nothing else is touched before)."""
    if path is None:
        return prov
    try:
        save_directions(directions, path, {"checkpoint_sha256": prov.checkpoint_sha256})
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return prov.with_dir_file(path)


def _fidelity_attrs(w: World, model: nn.Module, data: dict[str, AnySplit], sampled: Sampled, opts: Options,
                    dev: torch.device, plan: Plan, path: Path, log: Log) -> dict[str, str]:
    """The planes' projection fidelity (``fidelity``) or why it was not measured (``fidelity_note``,
    the plan's), measured by every rank once the points are done; a resumed file that has it keeps it."""
    if sampled.fidelity_note is not None:
        return {"fidelity_note": sampled.fidelity_note}

    def measured() -> bool:
        with surface_file.open_h5(path) as f:
            return "fidelity" in f.attrs
    if w.bcast(measured() if w.is_root else None):
        return {}
    if w.is_root:  # one line for the job, not one per rank
        log(f"fidelity: {plan.fidelity or 'the curvature each plane sees vs the Hessian extremes at the centre'}")
    if plan.fidelity is not None:
        return {"fidelity_note": plan.fidelity}
    return {"fidelity": plane_fidelity(w, model, data, sampled.planes, opts, dev)}


def _run_attrs(gathered: list[dict], plan: Plan) -> dict:
    points = np.array([g["points"] for g in gathered])
    seconds = np.array([g["seconds"] for g in gathered])
    total = int(points.sum())
    return {
        "rank_points": points, "rank_seconds": seconds,
        "rank_weights": np.array([g["weights"] for g in gathered]),  # the moved numbers each held: 1/G sharded
        "rank_write_seconds": np.array([g["write_seconds"] for g in gathered]),
        "wall_seconds": float(max(g["wall_seconds"] for g in gathered)),
        "eval_seconds_total": float(seconds.sum()),
        "eval_seconds_per_point": float(seconds.sum() / total) if total else float("nan"),
        "points_per_pass": plan.points_per_pass,
        "channels_last": int(plan.channels_last),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
