"""The distributed sampling run: tiles of the grid -> evaluator -> one shared surface file.

Every rank calls :func:`sample_surface` with the same communicator (``comm=None``: one process).
Rank 0 checks (or creates) the file, makes the run plan (or takes the one the file records) and
broadcasts both; tiles are taken from a shared queue, evaluated, and written as soon as they
finish (see lsurf.run.transport). :func:`run_surface` is the whole ``lsurf surface`` job from
:class:`Options`: inputs by name, directions, provenance, then :func:`sample_surface`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from lsurf.engine.data.batches import device_budget, in_process, keep_resident, size_text
from lsurf.engine.data.splits import AnySplit, BatchStreamSplit, max_token
from lsurf.engine.evaluation.evaluate import Evaluator, evaluator
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.evaluation.metrics import Metric, PluginMetric, metrics_for, quantity_names
from lsurf.engine.evaluation.plan import Plan, check_pinned, default_batch_size, faster_in_channels_last
from lsurf.engine.evaluation.precision import ACCOUNTING, Precision
from lsurf.engine.evaluation.probes import check_outputs_fit, plugin_metrics
from lsurf.engine.formats import surface_file
from lsurf.engine.formats.progress import RUN_STARTED, run_started
from lsurf.engine.geometry.directions import AnyDirections, save_directions, zero_directions
from lsurf.engine.geometry.grid import Grid, Tile, parse_tile
from lsurf.engine.geometry.plugin import CheckedGeometry, load_geometry, model_params
from lsurf.engine.geometry.refine import STEERING, Refiner
from lsurf.engine.model.hf import vocabulary_size
from lsurf.engine.model.sharding import is_sharded_model
from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError
from lsurf.run.curvature import fidelity_skipped, hessian_plane, plane_fidelity
from lsurf.run.options import Options
from lsurf.run.provenance import RECORDED_SINCE, Provenance
from lsurf.run.runtime import bound_device, check_device_binding, choose_device
from lsurf.run.shard import group_mesh, shard_mesh
from lsurf.run.sources import (
    check_same_inputs,
    directions_for,
    directions_path,
    grid_for,
    load_inputs,
    plane_directions,
)
from lsurf.run.transport import TileQueue, TileSink
from lsurf.run.world import Group, World, abort_on_failure

Log = Callable[[str], None]
PlaneDirections = AnyDirections | Sequence[AnyDirections]  # one plane's, or each plane's of an ensemble
Points = tuple[list[AnyDirections], CheckedGeometry | None]  # each plane's directions, and a geometry if any


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
        geometry = None
        if options.geometry:
            spec = options.geometry
            geometry = w.agree(lambda: load_geometry(spec, model_params(model)))
            grid, dirs = geometry.grid(), _held_still(model, geometry)
        if dirs is None:  # a Hessian plane: every rank takes part in computing it
            dirs = hessian_plane(options, model, data, comm)
        prov = Provenance.of(options)
        # a sharded model's directions are held by rows: its ranks draw them again from the seed
        save_to = (None if options.dir_file or options.planes > 1 or geometry or mesh is not None
                   else directions_path(options.out))
        return _sample(w, model, data, dirs, grid, Path(options.out), options, prov, save_to, log, geometry)


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
        return _sample(w, model, data, directions, grid, Path(out), opts,
                       provenance or Provenance(config=opts.as_dict()), save_directions_to, log or (lambda m: None))


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
        return _sample(w, model, data, _held_still(model, checked), checked.grid(), Path(out), opts,
                       provenance or Provenance(config=opts.as_dict()), None, log or (lambda m: None), checked)


def _held_still(model: nn.Module, geometry: CheckedGeometry) -> PlaneDirections:
    """The directions the evaluator holds on a geometry's run: zeros of its dimensions, one set per
    plane of a third axis (never moved along: the geometry gives the points)."""
    zeros = zero_directions(model, "weights", two=len(geometry.axes) > 1)
    return zeros if len(geometry.axes) < 3 else [zeros] * geometry.grid().num_planes


def _sample(w: World, model: nn.Module, data: dict[str, AnySplit], directions: PlaneDirections, grid: Grid,
            path: Path, opts: Options, prov: Provenance, save_to: str | Path | None,
            log: Log, geometry: CheckedGeometry | None = None) -> surface_file.Surface | None:
    """The run on every rank: the points of ``geometry`` where there is one (``directions``: zeros of
    its dimensions, which the evaluator holds but never moves along), else of the planes."""
    planes = w.agree(lambda: _planes(directions, grid))
    dev = w.agree(lambda: choose_device(w, opts.device))
    with bound_device(dev):
        outputs, plugins = w.agree(lambda: _check_inputs(w, model, data, planes[0], grid, opts, dev))
        w.agree(lambda: check_device_binding(w, dev))
        metrics = (*metrics_for(next(iter(data.values())).rows(0, 1)[1], opts.ignore_index), *plugins)
        group = w.groups(opts.ranks_per_point)
        try:
            mesh = group_mesh(w, group, dev) if opts.shard else None
            return _sample_in_groups(w, group, (dev, outputs, mesh), model, data, (planes, geometry), grid, path,
                                     opts, prov, save_to, metrics, log)
        finally:
            group.free()


def _planes(directions: PlaneDirections, grid: Grid) -> list[AnyDirections]:
    """The directions of each plane, as many as the grid has planes."""
    planes = list(directions) if isinstance(directions, Sequence) else [directions]
    if len(planes) != grid.num_planes:
        raise UserError(f"the grid has {grid.num_planes} planes but {len(planes)} sets of directions were given")
    return planes


def _sample_in_groups(w: World, group: Group, probe: tuple[torch.device, int, Any], model: nn.Module,
                      data: dict[str, AnySplit], points: Points, grid: Grid, path: Path, opts: Options,
                      prov: Provenance, save_to: str | Path | None, metrics: Sequence[Metric],
                      log: Log) -> surface_file.Surface | None:
    """The run once the inputs are checked: ``probe`` is this rank's device, the output values
    one sample gives (for the default batch size) and the group's mesh if the model is sharded
    (lsurf.run.shard); ``metrics``: the built-in ones for the targets and the user's own;
    ``points``: the planes' directions and the geometry, if any."""
    dev, outputs, mesh = probe
    planes, geometry = points
    directions = planes[0]
    identity = prov.identity(planes, data, opts, fingerprints=w.is_root, device=dev)
    if geometry is not None:
        identity["geometry"] = geometry.identity()
    place = group.rank if is_sharded_model(model) else 0  # ranks holding the same shards compare
    w.agree(lambda: check_same_inputs(w, model, identity["directions_sha256"], place))
    with contextlib.ExitStack() as stack:
        def prepare() -> tuple[dict | None, Plan | None]:
            if not w.is_root:
                return None, None
            stack.enter_context(surface_file.exclusive_lock(path))
            if surface_file.accept(path, grid, identity, opts.overwrite, RECORDED_SINCE):
                return _existing(path)
            attrs = _save_directions(directions, save_to, prov).attrs(planes, w.size)
            if geometry is not None:  # no directions: the geometry says what the points are
                attrs.update(geometry=json.dumps(geometry.identity()), axis_names=json.dumps(geometry.names),
                             directions=json.dumps({"geometry": geometry.name}))
            if opts.tolerance:  # what the samples a point used are a share of
                attrs["split_sizes"] = json.dumps({s: len(split) for s, split in data.items()
                                                   if not isinstance(split, BatchStreamSplit)})
            names = quantity_names(data, opts.hessian_iters > 0, metrics, ACCOUNTING if opts.tolerance else ())
            surface_file.create(path, grid, names, identity, attrs)
            return None, None

        existing, stored = w.bcast(w.agree(prepare))
        batch_size, channels_last = w.bcast(w.agree(lambda: _layout(w, model, data, (dev, outputs), opts, stored,
                                                                    log)))
        workers = _workers(opts, dev)
        streamed = w.bcast(w.agree(lambda: _streamed(w, group, data, dev, opts, batch_size, workers, log)))
        stats, plan = _evaluate_grid(w, (group, mesh), dev, model, data, points, grid, path, opts, existing, stored,
                                     (batch_size, channels_last, workers, streamed), metrics, log)
        gathered = w.gather(stats)
        # after the evaluator is gone: its device copies (splits, θ*, directions) are freed, so the
        # Hessian's products have the room the points had
        fidelity = _fidelity_attrs(w, model, data, points, grid, opts, dev, streamed, path, log)
        if w.is_root:
            assert gathered is not None  # gather returns the list on rank 0
            surface_file.set_attrs(path, {**_run_attrs(gathered, plan), "launcher": w.launcher, "world_size": w.size,
                                          "rank_layout": _layout_line(w, group, opts.shard),
                                          "streamed": ",".join(streamed), **fidelity},
                                   drop=() if opts.refines else ("refinement",))  # now a whole grid
    return surface_file.read_surface(path) if w.is_root else None


def _evaluate_grid(w: World, groups: tuple[Group, Any], dev: torch.device, model: nn.Module, data: dict[str, AnySplit],
                   points: Points, grid: Grid, path: Path, opts: Options, existing: dict | None,
                   stored: Plan | None, layout: tuple[int, bool, int, list[str]], metrics: Sequence[Metric],
                   log: Log) -> tuple[dict, Plan]:
    """Every point of the grid this rank takes part in, and the run plan. The evaluator lives only
    in here: once this returns, nothing holds its copies on the device any more. ``layout``: batch
    size, channels-last, loader workers and the streamed splits. ``groups``: this rank's group and,
    if the model is sharded over it, its mesh."""
    group, mesh = groups
    batch_size, channels_last, workers, streamed = layout
    planes, geometry = points
    with evaluator(model, data, planes[0], device=dev, dtype=opts.torch_dtype, batch_size=batch_size,
                   channels_last=channels_last, loss=opts.loss, bn=opts.bn,
                   points_per_pass=opts.points_per_pass or (stored.points_per_pass if stored else 1),
                   amp=opts.amp == "bf16", hessian_iters=opts.hessian_iters, metrics=metrics, output=opts.output,
                   ignore_index=opts.ignore_index, streamed=streamed, precision=_precision(opts),
                   workers=workers, shard=(group.rank, group.size), reduce=group.add_sums(), mesh=mesh) as ev:
        plan = stored or Plan(dev.type, batch_size, channels_last, ev.points_per_pass, torch.get_num_threads())
        if stored is None and opts.points_per_pass is None and mesh is None:
            # Rank 0 calibrates and decides, so every rank takes the same path. The others wait
            # meanwhile, so calibration is weighed against one rank's share of the points.
            todo = min(grid.num_points - (int(existing["done"].sum()) if existing else 0),
                       opts.budget or grid.num_points)
            k = w.bcast(ev.calibrate(points=-(-todo // group.count), log=log) if w.is_root else None)
            ev.points_per_pass = k
            plan = replace(plan, points_per_pass=k)
        if w.is_root:  # readers tell a running job, its rate and ETA by these (lsurf.engine.formats.progress)
            started = {RUN_STARTED: run_started(int(existing["done"].sum()) if existing else 0)}
            surface_file.set_attrs(path, {**started, **({"plan": plan.to_json()} if stored is None else {})},
                                   drop=("finished",))
        w.barrier()  # rank 0 has closed the file again before the writers open it
        log(f"rank {w.rank}/{w.size} (local {w.local_rank}/{w.local_size}, group {group.index}/{group.count}) "
            f"on {dev}, {torch.get_num_threads()} threads")
        at: PointSet = _GeometryPoints(ev, geometry) if geometry is not None else _PlanePoints(ev, planes, grid)
        return {**_run_rounds(w, group, at, grid, path, existing, opts, log), "weights": ev.held_weights}, plan


def _check_inputs(w: World, model: nn.Module, data: dict[str, AnySplit], directions: AnyDirections, grid: Grid,
                  opts: Options, dev: torch.device) -> tuple[int, tuple[PluginMetric, ...]]:
    """How many output values one sample gives, after one tiny forward on this rank's device
    proves model, data and loss fit, and the user's metrics, bound on a probe batch."""
    if grid.ndim != directions.ndim:
        raise UserError(f"the grid is {grid.ndim}-D but the directions are {directions.ndim}-D")
    g = opts.ranks_per_point
    if w.size % g:
        raise UserError(f"`ranks_per_point` {g} does not divide the {w.size} ranks of this job")
    for name, split in data.items():
        if not isinstance(split, BatchStreamSplit) and len(split) < g:
            raise UserError(f"the {name} split has {len(split)} samples, fewer than `ranks_per_point` {g}")
    if w.is_root:
        check_vocabulary(model, data)
    loss_fn = resolve_loss(opts.loss, opts.ignore_index)
    parse_tile(opts.tile)
    use_parallel_hdf5(w, opts.writer)  # a writer this job cannot have: refused before any file is touched
    came_sharded = is_sharded_model(model)  # then its probe forward is collective, on the device
    probe = torch.device("cpu") if opts.shard and not came_sharded else dev  # the whole model never goes there
    with preserved(model):
        if not came_sharded:
            model.to(device=probe, dtype=opts.torch_dtype)
        model.eval()  # before any forward: BN statistics stay
        # class labels checked on rank 0 for the built-in loss (a plug-in may use integer targets otherwise)
        outputs = check_outputs_fit(model, next(iter(data.values())), loss_fn, probe, opts.torch_dtype, opts.output,
                                    labels=data if w.is_root and opts.loss == "cross_entropy" else None)
        plugins = plugin_metrics(opts.metric, model, next(iter(data.values())), probe, opts.torch_dtype, opts.output)
    _streamed(w, w.groups(1), data, dev, opts, opts.batch_size or default_batch_size(dev, outputs),
              _workers(opts, dev), log=None)  # a budget too small for the stream: refused before any file is touched
    fidelity_skipped(opts, data, grid, grid.num_planes, [])  # `fidelity` on where it cannot be: refused now
    if opts.refines and grid.num_planes > 1:
        raise UserError("`budget`/`refine_tol` refine one plane: not with a geometry of three axes")
    if opts.refines:
        Refiner(grid.plane_shape, opts.budget, opts.refine_tol)  # a budget too small for a picture: refused now
    return outputs, plugins


def check_vocabulary(model: nn.Module, data: dict[str, AnySplit]) -> None:
    """Refuse token data with ids the model's input embedding does not have (it would fail, or on a
    GPU read past the table, at the first batch that holds one)."""
    vocabulary = vocabulary_size(model)
    if vocabulary is None:
        return
    for name, split in data.items():
        top = max_token(split)
        if top is not None and top >= vocabulary:
            raise UserError(f"the {name} split holds token id {top}, but the model's vocabulary has {vocabulary} "
                            "tokens: wrong tokenizer or model?")


def _layout(w: World, model: nn.Module, data: dict[str, AnySplit], probe: tuple[torch.device, int], opts: Options,
            stored: Plan | None, log: Log) -> tuple[int, bool] | None:
    """(batch size, channels-last), decided on rank 0: the stored plan's on resume (pinned values
    must agree with it), else the pinned values, the device's default batch size and the faster
    layout measured on one batch."""
    dev, outputs = probe
    pinned_layout = {"auto": None, "channels-last": True, "contiguous": False}[opts.layout]
    if opts.shard:  # FSDP2 keeps each shard contiguous
        pinned_layout = False
    if stored is not None:
        check_pinned(stored, {"device": dev.type, "batch_size": opts.batch_size, "channels_last": pinned_layout,
                              "points_per_pass": opts.points_per_pass})
        return stored.batch_size, stored.channels_last
    if not w.is_root:
        return None
    batch_size = opts.batch_size or default_batch_size(dev, outputs)
    if pinned_layout is None:
        x = next(iter(data.values())).rows(0, batch_size)[0].to(dev, opts.torch_dtype)
        pinned_layout = faster_in_channels_last(model, x, log, amp=opts.amp == "bf16")
    return batch_size, pinned_layout


def _workers(opts: Options, dev: torch.device) -> int:
    """Loader processes per rank when streaming: a GPU eats batches faster than one process reads."""
    return opts.workers if opts.workers is not None else (2 if dev.type == "cuda" else 1)


def _streamed(w: World, group: Group, data: dict[str, AnySplit], dev: torch.device, opts: Options,
              batch_size: int, workers: int, log: Log | None) -> list[str] | None:
    """The splits streamed at every point rather than held on the device, decided on rank 0 for
    its share of each split (the ranks of a job hold equal shares); ``log`` None: only check."""
    if not w.is_root:
        return None
    budget = opts.budget_bytes or device_budget(dev, w.local_size)
    shard = (group.rank, group.size)
    streamed = [name for name, split in data.items()
                if not keep_resident(split, name, opts.resident, budget, batch_size, workers, opts.torch_dtype, shard)]
    held = [name for name in data if name not in streamed]
    if log is None:
        return streamed
    log(f"data: {', '.join(held) or 'none'} resident, {', '.join(streamed) or 'none'} streamed "
        f"(`resident` {opts.resident}, budget {size_text(budget)} per rank"
        + (f", {_readers(data, streamed, workers)})" if streamed else ")"))
    return streamed


def _readers(data: dict[str, AnySplit], streamed: list[str], workers: int) -> str:
    """Who reads the streamed splits: this process (host tensors, stores, token files) or workers."""
    loaded = [name for name in streamed if not in_process(data[name])]
    return f"{', '.join(loaded)} by {workers} loader workers" if loaded else "read in-process"


def _layout_line(w: World, group: Group, shard: str | None) -> str:
    if group.size == 1:
        return f"{w.size} rank{'s' * (w.size > 1)}, one per point"
    sharded = f" and of the model (sharded {group.size} ways, {shard})" if shard else ""
    return (f"{w.size} ranks in {group.count} groups of {group.size}: each rank holds 1/{group.size} of every split"
            + sharded)


def _save_directions(directions: AnyDirections, path: str | Path | None, prov: Provenance) -> Provenance:
    """Write the directions (only once the output is accepted: nothing else is touched before)."""
    if path is None:
        return prov
    try:
        save_directions(directions, path, {"checkpoint_sha256": prov.checkpoint_sha256})
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return prov.with_dir_file(path)


def _existing(path: Path) -> tuple[dict | None, Plan | None]:
    """The done mask, values and finish times (None in a file from before them) of a resumed file
    (None for a fresh one), and its run plan."""
    surface = surface_file.read_surface(path)
    plan = Plan.from_json(surface.attrs["plan"]) if "plan" in surface.attrs else None
    if not surface.done.any():
        return None, plan
    return {"done": surface.done, "values": surface.values, "finished_at": surface.finished_at}, plan


def use_parallel_hdf5(w: World, writer: str) -> bool:
    """``writer``: ``auto`` (mpio where h5py has MPI and the job is an MPI one), ``mpio`` or
    ``root`` (gather to rank 0, which writes)."""
    if w.size == 1 or writer == "root":
        return False
    if w.launcher == "torchrun":  # parallel HDF5 opens the file over an MPI communicator
        if writer == "mpio":
            raise UserError("`writer` mpio needs an MPI launcher (mpirun, srun): under torchrun rank 0 writes "
                            "(`writer` auto or root)")
        return False
    has_mpi = h5py.get_config().mpi
    if writer == "mpio" and not has_mpi:
        raise UserError("`writer` mpio: this h5py is not built with MPI")
    return has_mpi


def _fidelity_attrs(w: World, model: nn.Module, data: dict[str, AnySplit], points: Points, grid: Grid,
                    opts: Options, dev: torch.device, streamed: list[str], path: Path, log: Log) -> dict[str, str]:
    """The planes' projection fidelity (``fidelity``) or why it was not measured (``fidelity_note``),
    measured by every rank once the points are done; a resumed file that has it keeps it."""
    planes, geometry = points
    if geometry is not None:
        return {"fidelity_note": "not measured: a plug-in geometry has no plane directions"}
    def measured() -> bool:
        with surface_file.open_h5(path) as f:
            return "fidelity" in f.attrs
    if w.bcast(measured() if w.is_root else None):
        return {}
    skipped = fidelity_skipped(opts, data, grid, len(planes), streamed)
    if w.is_root:  # one line for the job, not one per rank
        log(f"fidelity: {skipped or 'the curvature each plane sees vs the Hessian extremes at the centre'}")
    if skipped is not None:
        return {"fidelity_note": skipped}
    return {"fidelity": plane_fidelity(w, model, data, planes, opts, dev)}


class _PlanePoints:
    """The points of the built-in planes: grid coordinates (α, β) along each plane's directions,
    the run's own evaluator for plane 0, a twin moving along plane k's directions otherwise. Tiles
    come plane after plane, so only the current twin is kept (its directions on the device)."""

    def __init__(self, ev: Evaluator, planes: list[AnyDirections], grid: Grid):
        self.first, self.planes, self.grid = ev, planes, grid
        self.current: tuple[int, Evaluator] = (0, ev)

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        """Results at grid cells (j, i) of ``plane``."""
        if self.current[0] != plane:
            self.current = (plane, self.first if plane == 0 else self.first.with_directions(self.planes[plane]))
        return self.current[1].evaluate_many([self.grid.coords(j, i) for j, i in cells])


class _GeometryPoints:
    """The points of a user's geometry: its offset at each cell, applied by the evaluator (θ* + δ)."""

    def __init__(self, ev: Evaluator, geometry: CheckedGeometry):
        self.first, self.geometry = ev, geometry

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        return self.first.evaluate_offsets(self.geometry.offsets(plane, cells))


PointSet = _PlanePoints | _GeometryPoints  # what the tile loop evaluates: cells of a plane -> results

def _precision(opts: Options) -> Precision | None:
    return None if opts.tolerance is None else Precision(opts.tolerance, opts.min_samples, opts.seed)


def _run_rounds(w: World, group: Group, points: PointSet, grid: Grid, path: Path,
                existing: dict | None, opts: Options, log: Log) -> dict:
    """Every point in one round, or coarse-to-fine rounds (lsurf.engine.geometry.refine) chosen on rank 0
    from what the file holds after each. A resumed run replays the rounds from the start: the
    refiner reads only the points it chose, so it chooses as an uninterrupted run did."""
    if not opts.refines:
        return _run(w, group, points, grid, path, existing, opts, log)
    refiner = Refiner(grid.plane_shape, opts.budget, opts.refine_tol)
    steer = [n for n in points.first.quantities if n.endswith(STEERING)]
    stats: dict = {}
    while True:
        step = w.bcast(_next_round(refiner, steer, grid, path, opts, stats) if w.is_root else None)
        if step is None:
            return stats
        wanted, existing = step
        if w.is_root:
            cap = "" if refiner.budget is None else f" of the budget's {refiner.budget}"
            log(f"round {refiner.rounds}: {int(wanted.sum())} points, {int(refiner.selected.sum())}{cap} chosen so far")
        done = _run(w, group, points, grid, path, existing, opts, log, wanted=wanted.reshape(grid.shape))
        stats = {k: v + stats.get(k, 0) if k != "rank" else v for k, v in done.items()}


def _next_round(refiner: Refiner, steer: list[str], grid: Grid, path: Path, opts: Options,
                stats: dict) -> tuple[np.ndarray, dict | None] | None:
    """Rank 0: the next round's points and the file's values now (None: refinement is over), with
    the refinement's state recorded in the file (plots fill a file that is ``refined``)."""
    existing, _ = _existing(path)
    values = existing["values"] if existing else {}
    nan = np.full(grid.plane_shape, np.nan)
    wanted = refiner.next_round({n: grid.as_plane(values[n]) if n in values else nan for n in steer})
    state = {"budget": opts.budget, "refine_tol": opts.refine_tol, "steering": steer,
             "coarse_stride": refiner.stride, "rounds": refiner.rounds, "chosen": int(refiner.selected.sum()),
             "finished": wanted is None}
    surface_file.set_attrs(path, {"refinement": json.dumps(state)})
    return None if wanted is None else (wanted, existing)


def _run(w: World, group: Group, at: PointSet, grid: Grid, path: Path,
         existing: dict | None, opts: Options, log: Log, wanted: np.ndarray | None = None) -> dict:
    """Take tiles until the queue is empty. In a group only the leader takes tiles (and tells the
    others which) and only it writes; every rank of the group evaluates every point on its share.
    ``wanted``: the only points to compute (a coarse-to-fine round), else all not done."""
    done = grid.as_stack(existing["done"]) if existing else np.zeros(grid.stack_shape, dtype=bool)
    if wanted is not None:
        done = done | ~grid.as_stack(wanted)  # what is not wanted counts as done here, and is not marked so
    tiles = [t for t in grid.tiles(parse_tile(opts.tile), group.count, at.first.points_per_pass,
                                   opts.tile_order) if not done[t.index_in_stack].all()]
    todo_points = int((~done).sum())
    parallel_io = use_parallel_hdf5(w, opts.writer)
    if w.is_root:
        log(f"{len(tiles)} tiles, {todo_points} of {grid.num_points} points to do; "
            f"writer: {'parallel HDF5 (mpio)' if parallel_io else 'rank 0'}; {_layout_line(w, group, opts.shard)}")
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
    ev, at = points.first, t.index_in_stack
    vals = {n: np.full(t.shape, np.nan) for n in ev.quantities}
    held = np.zeros(t.shape, dtype=bool)
    if existing is not None:
        for n in ev.quantities:
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
