"""A surface run's inputs checked and its plan made, before the surface file exists.

Checks run on every rank (each proves its own device takes the model, data and loss); the plan is
made once, on rank 0, where a choice is timed or sized (the faster layout, what fits the device),
and every automatic choice is in it (lsurf.engine.evaluation.plan). Anything refused here is
refused before a file is created or changed; nothing is decided twice.
"""

from __future__ import annotations

from collections.abc import Callable

import h5py
import torch
from torch import nn

from lsurf.engine.data.batches import device_budget, in_process, keep_resident, size_text
from lsurf.engine.data.splits import AnySplit, BatchStreamSplit, max_token
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.evaluation.metrics import PluginMetric
from lsurf.engine.evaluation.plan import Plan, check_pinned, default_batch_size, faster_in_channels_last
from lsurf.engine.evaluation.precision import Precision
from lsurf.engine.evaluation.probes import check_outputs_fit, plugin_metrics
from lsurf.engine.geometry.directions import AnyDirections
from lsurf.engine.geometry.grid import Grid, parse_tile
from lsurf.engine.geometry.refine import Refiner
from lsurf.engine.model.hf import vocabulary_size
from lsurf.engine.model.sharding import is_sharded_model
from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError
from lsurf.run.curvature import fidelity_skipped
from lsurf.run.options import Options
from lsurf.run.world import Group, World

Log = Callable[[str], None]


def check_inputs(w: World, model: nn.Module, data: dict[str, AnySplit], directions: AnyDirections, grid: Grid,
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
    if opts.refines and grid.num_planes > 1:
        raise UserError("`budget`/`refine_tol` refine one plane: not with a geometry of three axes")
    if w.is_root:
        check_vocabulary(model, data)
    loss_fn = resolve_loss(opts.loss, opts.ignore_index)
    parse_tile(opts.tile)
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


def make_plan(w: World, group: Group, model: nn.Module, data: dict[str, AnySplit], grid: Grid,
              probe: tuple[torch.device, int], opts: Options, stored: Plan | None, log: Log) -> Plan:
    """Rank 0's plan: batch size and layout (the stored plan's on resume, where pinned values must
    agree with it; else the pinned values, the device's default batch size and the faster layout
    measured on one batch), then what the machine decides — the splits streamed, loader workers,
    the writer, plane fidelity. Points per pass: the stored or pinned number, else 0 (calibrated
    once the evaluator holds the data)."""
    dev, outputs = probe
    said: list[str] = []  # logged once the plan is whole: a refusal is the only line
    pinned_layout = {"auto": None, "channels-last": True, "contiguous": False}[opts.layout]
    if opts.shard:  # FSDP2 keeps each shard contiguous
        pinned_layout = False
    if stored is not None:
        check_pinned(stored, {"device": dev.type, "batch_size": opts.batch_size, "channels_last": pinned_layout,
                              "points_per_pass": opts.points_per_pass})
    batch_size = stored.batch_size if stored else opts.batch_size or default_batch_size(dev, outputs)
    if stored is None and pinned_layout is None:
        x = next(iter(data.values())).rows(0, batch_size)[0].to(dev, opts.torch_dtype)
        pinned_layout = faster_in_channels_last(model, x, said.append, amp=opts.amp == "bf16")
    workers = opts.workers if opts.workers is not None else (2 if dev.type == "cuda" else 1)  # a GPU eats faster
    streamed = _streamed(w, group, data, dev, opts, batch_size, workers, said.append)
    fresh = Plan(dev.type, batch_size, bool(pinned_layout), opts.points_per_pass or 0, torch.get_num_threads(),
                 tuple(streamed), workers, "mpio" if use_parallel_hdf5(w, opts.writer) else "root",
                 fidelity_skipped(opts, data, grid, grid.num_planes, streamed, group.count))
    for line in said:
        log(line)
    return stored.resumed(fresh) if stored is not None else fresh


def refiner_for(grid: Grid, opts: Options) -> Refiner | None:
    """The coarse-to-fine rounds' chooser, made (and its budget checked) before the file exists."""
    return Refiner(grid.plane_shape, opts.budget, opts.refine_tol) if opts.refines else None


def _streamed(w: World, group: Group, data: dict[str, AnySplit], dev: torch.device, opts: Options,
              batch_size: int, workers: int, log: Log) -> list[str]:
    """The splits streamed at every point rather than held on the device, for rank 0's share of
    each split (the ranks of a job hold equal shares)."""
    budget = opts.budget_bytes or device_budget(dev, w.local_size)
    shard = (group.rank, group.size)
    streamed = [name for name, split in data.items()
                if not keep_resident(split, name, opts.resident, budget, batch_size, workers, opts.torch_dtype, shard)]
    held = [name for name in data if name not in streamed]
    log(f"data: {', '.join(held) or 'none'} resident, {', '.join(streamed) or 'none'} streamed "
        f"(`resident` {opts.resident}, budget {size_text(budget)} per rank"
        + (f", {_readers(data, streamed, workers)})" if streamed else ")"))
    return streamed


def _readers(data: dict[str, AnySplit], streamed: list[str], workers: int) -> str:
    """Who reads the streamed splits: this process (host tensors, stores, token files) or workers."""
    loaded = [name for name in streamed if not in_process(data[name])]
    return f"{', '.join(loaded)} by {workers} loader workers" if loaded else "read in-process"


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


def precision_of(opts: Options) -> Precision | None:
    """The early stop of a point's passes (``tolerance``), if any."""
    return None if opts.tolerance is None else Precision(opts.tolerance, opts.min_samples, opts.seed)
