"""``lsurf hessian`` as a library call: the Hessian of the options' model and split, on the
options' device and dtype, and its spectrum — in one process or divided among the ranks of an MPI
job (each rank its share of the split's batches, one allreduce per Hessian-vector product), with
the same numbers either way."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from lsurf.engine.curvature.fidelity import LANCZOS_STEPS, TRACE_SAMPLES, measure, relative_cost
from lsurf.engine.curvature.hessian import Extreme, Hessian, Reduce, SpectrumSpec, eigen_directions, spectrum
from lsurf.engine.curvature.sharded import ShardedHessian
from lsurf.engine.data.batches import equal_batches, resident_batches, to_device
from lsurf.engine.data.splits import AnySplit, BatchStreamSplit
from lsurf.engine.evaluation.evaluate import shard_starts
from lsurf.engine.evaluation.labels import check_class_labels
from lsurf.engine.evaluation.losses import pick_output, resolve_loss
from lsurf.engine.evaluation.plan import default_batch_size
from lsurf.engine.formats.surface_file import open_h5
from lsurf.engine.geometry.directions import AnyDirections, Directions, load_directions, target_tensors
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.io import file_sha256
from lsurf.engine.model.sharding import is_sharded_model
from lsurf.engine.model.snapshot import preserved
from lsurf.engine.model.tensor_parts import local_part
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.runtime import choose_device
from lsurf.run.shard import shard_mesh
from lsurf.run.sources import check_same_inputs, directions_path, load_inputs, model_skeleton
from lsurf.run.world import World, abort_on_failure

Spectrum = tuple[dict[str, np.ndarray], Directions | None]
Log = Callable[[str], None]


def hessian_spectrum(options: Options, spec: SpectrumSpec, comm: Any = None,
                     log: Log | None = None) -> Spectrum | None:
    """Top eigenvalues, trace (with its standard error) and (optionally) density of the mean loss
    over ``options.split`` (one split) at the checkpoint, and with ``spec.directions`` the top two
    eigenvectors (one if ``top_k`` is 1) as directions for ``lsurf surface``.

    Call it on every rank with the same ``comm`` (None: one process): each rank loads the inputs
    and takes its share of the split. Returns (results, directions or None) on rank 0, None
    elsewhere. The seed of the Lanczos and Hutchinson vectors is ``options.seed``."""
    w = World.of(comm)
    with abort_on_failure(w):
        _check_directions(options, spec)
        device = w.agree(lambda: choose_device(w, options.device))
        mesh = w.agree(lambda: _one_group_mesh(w, options, device)) if options.shard else None
        model, split, skeleton = w.agree(lambda: _inputs(options, mesh))
        if log is not None and w.is_root:
            log(_plan_line(spec, w.size, options))
        return model_spectrum(model, split, options, spec, device, comm, skeleton=skeleton)


def _plan_line(spec: SpectrumSpec, ranks: int, options: Options) -> str:
    trace = f", trace from {spec.trace_samples} samples" if spec.trace_samples else ""
    sharded = f", the model sharded {ranks} ways" if options.shard else ""
    return (f"hessian: {spec.top_k} eigenvalue{'s' * (spec.top_k > 1)} by {spec.iters} Lanczos steps{trace}"
            f"{', density' if spec.density else ''} on {ranks} rank{'s' * (ranks > 1)}{sharded}")


def _check_directions(options: Options, spec: SpectrumSpec) -> None:
    if spec.directions and options.shard:
        raise UserError("the eigenvectors of a sharded Hessian are held by rows: they are not saved as directions "
                        f"with `shard` {options.shard}")


def _inputs(options: Options, mesh: Any) -> tuple[nn.Module, AnySplit, nn.Module]:
    """The model (sharded over ``mesh`` if its weights are on disk), the split, and the model's
    skeleton (lsurf.run.sources.model_skeleton)."""
    if len(options.split) != 1:
        raise UserError(f"`split` {','.join(options.split)!r}: the Hessian is of one split, train or test")
    model, data = load_inputs(options, mesh=mesh)
    if data is None:
        raise UserError("`data` is needed for the Hessian")
    return model, data[options.split[0]], model_skeleton(options, data, model)


def model_spectrum(model: nn.Module, split: AnySplit, options: Options, spec: SpectrumSpec, device: torch.device,
                   comm: Any = None, *, skeleton: nn.Module | None = None) -> Spectrum | None:
    """:func:`hessian_spectrum` of a model the caller holds, over ``split``, on every rank of
    ``comm``; the model comes back exactly as it was (device, dtype, mode, weights), also on failure.
    ``skeleton``: of a sharded model, its modules and buffers (see :func:`operator_at`)."""
    w = World.of(comm)
    _check_directions(options, spec)
    with operator_at(w, model, (options.split[0], split), options, device, skeleton) as h:
        keep = min(spec.top_k, 2) if spec.directions else 0
        results, vectors = spectrum(h, spec, options.seed, keep)
        dirs = eigen_directions(model, h, results["eigenvalues"], vectors, _meta(options)) if vectors else None
    return (results, dirs) if w.is_root else None


def hessian_directions(model: nn.Module, split: AnySplit, options: Options, device: torch.device, comm: Any,
                       which: Sequence[Extreme], iters: int = 100, skeleton: nn.Module | None = None) -> Directions:
    """The eigenvectors ``which`` names (``max``, ``max2``, ``min``) of the Hessian at the model's
    weights, as directions (unit norm, ``norm`` none), on every rank of ``comm``: a Hessian plane
    (``max``, ``max2``: the two sharpest directions; ``max``, ``min``: the plane that shows a
    saddle if there is one). The eigenvalues go into the directions' metadata. With ``shard``,
    each rank's rows of them (see :func:`operator_at` for ``skeleton``)."""
    w = World.of(comm)
    with operator_at(w, model, (options.split[0], split), options, device, skeleton=skeleton) as h:
        values, vectors = h.eigenpairs(which, iters, seed=options.seed)
        meta = {**_meta(options), "which": list(which)}
        if isinstance(h, ShardedHessian):
            return h.directions(model, values, vectors, meta)
        return eigen_directions(model, h, values, vectors, meta)


def _meta(options: Options) -> dict:
    """What the eigenvectors depend on besides the weights, recorded with them (and compared
    before a saved Hessian plane is reused)."""
    return {"split": options.split[0], "loss": options.loss, "seed": options.seed, "dtype": options.dtype,
            "data": options.data, "subset": options.subset, "checkpoint": options.checkpoint or ""}


def hessian_plane(options: Options, model: nn.Module, data: dict[str, AnySplit], comm: Any = None) -> Directions:
    """The directions ``options.directions`` names (e.g. ``hessian:max,min``) at the model's
    weights, over the first of ``options.split``, on every rank of ``comm``. A direction file
    beside the output (``NAME.directions.h5``) made the same way from the same checkpoint is
    reused (a resumed run then walks exactly the stored plane); ``overwrite`` recomputes. A sharded
    run computes its rows of the plane again (the same numbers: the same products, in order)."""
    w = World.of(comm)
    which = cast(list[Extreme], options.directions.removeprefix("hessian:").split(","))
    path = directions_path(options.out)
    names, targets = target_tensors(model, "weights")
    want = {**_meta(options), "which": which, "source": "hessian",
            "checkpoint_sha256": file_sha256(options.checkpoint) if options.checkpoint else ""}
    if not options.shard and not options.overwrite and w.agree(lambda: _same_plane(path, want)):
        return w.agree(lambda: load_directions(path, names, targets, len(which) == 2))
    device = w.agree(lambda: choose_device(w, options.device))
    split = data[options.split[0]]
    skeleton = w.agree(lambda: model_skeleton(options, data, model))
    return hessian_directions(model, split, options, device, comm, which, skeleton=skeleton)


def _same_plane(path: Path, want: dict) -> bool:
    """Whether the direction file at ``path`` holds the Hessian plane ``want`` describes."""
    if not path.is_file():
        return False
    with open_h5(path) as f:
        meta = json.loads(f.attrs.get("meta", "{}"))
    return all(meta.get(k) == v for k, v in want.items())


@contextlib.contextmanager
def operator_at(w: World, model: nn.Module, split: tuple[str, AnySplit], options: Options, device: torch.device,
                skeleton: nn.Module | None = None) -> Iterator[Hessian]:
    """The Hessian of the loss over ``split`` (its name and rows) at the model's weights, the split
    shared by every rank of ``w`` (one allreduce per product), in the options' dtype on ``device``;
    the model is handed back exactly as it was afterwards, also on failure. With ``shard`` the ranks form
    one group holding the model by rows (``skeleton``: its modules and buffers, if ``model`` is
    sharded: lsurf.run.sources.model_skeleton)."""
    with abort_on_failure(w):
        group = w.groups(w.size)  # all ranks share the one split: its reduction is the allreduce
        shard = (group.rank, group.size)
        try:
            with preserved(model):
                if not is_sharded_model(model):
                    model.to(device=device, dtype=options.torch_dtype).eval()
                    w.agree(lambda: check_same_inputs(w, model))  # each rank's share of a product is of this model
                if options.shard:
                    mesh = w.agree(lambda: _one_group_mesh(w, options, device))
                    yield w.agree(lambda: _sharded_operator(model, skeleton or model, split, options, shard,
                                                            mesh.get_group()))
                    return
                batches = resident_batches(split[1], _batch_size(options, device), device,
                                           options.torch_dtype, shard=shard)
                reduce = group.add_sums()
                local = np.array([sum(len(x) for x, _ in batches)], dtype=np.float64)
                n = int((reduce(local) if reduce else local)[0])
                first = shard_starts({split[0]: split[1]}, shard).get(split[0], 0)
                yield w.agree(lambda: _operator(model, batches, options, n, reduce, (split[0], first)))
        finally:
            group.free()


def _batch_size(options: Options, device: torch.device) -> int:
    """Samples per Hessian-vector product's batch: the options', else the device's default."""
    return options.batch_size or default_batch_size(device)


def _one_group_mesh(w: World, options: Options, device: torch.device) -> Any:
    """The mesh of a sharded Hessian: one group of every rank (each holds its share of the split)."""
    if options.ranks_per_point != w.size:
        raise UserError(f"the Hessian of a model sharded {options.ranks_per_point} ways needs one group of all "
                        f"ranks: run {options.ranks_per_point} ranks, not {w.size}")
    return shard_mesh(w, options, device)


def _sharded_operator(model: nn.Module, skeleton: nn.Module, split: tuple[str, AnySplit], options: Options,
                      shard: tuple[int, int], group: Any) -> ShardedHessian:
    """The Hessian of a model held by rows over ``group`` (lsurf.engine.curvature.sharded): this
    rank's rows of every parameter, and its share of the split's batches, as many as any rank's."""
    dtype = options.torch_dtype
    device = local_part(next(model.parameters())).device
    size = _batch_size(options, device)
    mine = resident_batches(split[1], size, device, dtype, shard=shard)
    batches = equal_batches(mine, split[1], size, shard, device, dtype)
    assert not isinstance(split[1], BatchStreamSplit)  # equal_batches refuses a stream
    loss = resolve_loss(options.loss, options.ignore_index)
    filler = to_device(*split[1].rows(0, 1), device, dtype)
    h = ShardedHessian.of(model, skeleton, batches, lambda out, y: loss(pick_output(out, options.output), y),
                          n=len(split[1]), group=group, filler=filler)
    with torch.no_grad():
        probe = h.forward(filler[0])  # collective: every rank, also one without batches
    first = shard_starts({split[0]: split[1]}, shard).get(split[0], 0)
    check_class_labels(lambda _: probe, filler[0], (y for _, y in mine), loss, split[0], first, output=options.output)
    return h


def _operator(model: nn.Module, batches: list, options: Options, n: int, reduce: Reduce | None,
              rows: tuple[str, int]) -> Hessian:
    """The Hessian, once its inputs are known good (asked on every rank, before any product): the
    labels of this rank's ``rows`` (the split's name, the row its share starts at) among them, since
    every product's loss indexes the outputs with each one."""
    loss = resolve_loss(options.loss, options.ignore_index)
    if batches:
        check_class_labels(model, batches[0][0], (y for _, y in batches), loss, *rows, output=options.output)
    return Hessian(model, batches, lambda out, y: loss(pick_output(out, options.output), y), n=n, reduce=reduce)


# A fidelity check is made unasked only where it costs less than this share of the run.
AUTO_FIDELITY_SHARE = 0.05


def fidelity_skipped(options: Options, data: dict[str, AnySplit], grid: Grid, planes: int,
                     streamed: Sequence[str], groups: int = 1) -> str | None:
    """Why the planes' fidelity is not measured (None: it is): ``fidelity`` off, a model sharded
    over more than one of the run's ``groups`` (its Hessian takes one group of every rank), or,
    where it is auto, a streamed or low-precision Hessian split or a cost of 5 % of the run or more."""
    if options.fidelity == "off":
        return "not measured (`fidelity` off)"
    if options.shard and groups > 1:
        why = (f"the Hessian of a sharded model takes one group of every rank; this run has {groups} groups "
               f"(`ranks_per_point` {options.ranks_per_point})")
        if options.fidelity == "on":
            raise UserError(f"`fidelity` on: {why}")
        return f"not measured: {why}"
    split = next(iter(data))
    targets = data[split].rows(0, 1)[1]
    if targets.dim() > 1 and not targets.is_floating_point():
        if options.fidelity == "on":
            raise UserError("`fidelity` on: the Hessian here is of one loss per sample, not of token targets; "
                            "leave `fidelity` auto or off for sequence data")
        return "not measured: the Hessian here is of one loss per sample, not of token targets"
    if options.fidelity == "on":
        return None
    if split in streamed:
        return f"not measured: the {split} split is streamed (`fidelity` on measures it anyway)"
    if options.dtype == "bfloat16" or options.amp != "none":
        return "not measured at low precision (`fidelity` on measures it anyway)"
    sizes = [len(s) for s in data.values() if not isinstance(s, BatchStreamSplit)]
    if len(sizes) < len(data):
        return "not measured: a split is a stream of unknown length (`fidelity` on measures it anyway)"
    points = min(grid.num_points, options.budget or grid.num_points)  # coarse to fine: at most its budget
    cost = relative_cost(LANCZOS_STEPS + TRACE_SAMPLES + 2 * planes, sizes[0], points, sum(sizes))
    if cost >= AUTO_FIDELITY_SHARE:
        return f"not measured: it would cost {100 * cost:.0f} % of the run (`fidelity` on measures it anyway)"
    return None


def plane_fidelity(w: World, model: nn.Module, data: dict[str, AnySplit], planes: Sequence[AnyDirections],
                   options: Options, device: torch.device) -> str:
    """The fidelity of ``planes`` at the model's weights over the first split, on every rank of
    ``w`` (the split shared as for the spectrum), as the JSON of the file's ``fidelity`` attribute."""
    split = next(iter(data))
    skeleton = w.agree(lambda: model_skeleton(options, data, model))
    with operator_at(w, model, (split, data[split]), options, device, skeleton) as h:
        return measure(h, model, planes, split, options.seed).to_json()
