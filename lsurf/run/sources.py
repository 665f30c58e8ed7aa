"""Where a run's model, data and directions come from, decided from :class:`Options` — the same
decisions ``lsurf surface`` makes, as library calls a notebook can make too."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lsurf.engine.data.splits import AnySplit, load_data
from lsurf.engine.formats.curve_file import read_curve, recorded_ends
from lsurf.engine.geometry.curve import bend_coordinates, curve_plane
from lsurf.engine.geometry.directions import (
    AnyDirections,
    Directions,
    load_directions,
    model_directions,
    random_directions,
    save_directions,
    target_tensors,
)
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.io import file_sha256
from lsurf.engine.model.models import build_for, is_zoo, load_checkpoint, load_model, weights_fingerprint
from lsurf.engine.model.sharding import is_sharded_model, load_sharded, meta_skeleton, read_rows
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.world import World


def load_inputs(options: Options, seed: int | None = None,
                mesh: Any = None) -> tuple[nn.Module, dict[str, AnySplit] | None]:
    """The model (at its checkpoint, in the run's dtype) and the data splits the options name.
    Without data, zoo models take the input shape they were designed for. A model's initial
    weights (all it has without a checkpoint) are drawn from ``seed`` (default: the options'
    ``seed``), never from torch's global generator: every rank of a job, and every rerun or
    resume, must evaluate the same model. ``mesh`` (with ``shard``: the rank group's, see
    :func:`lsurf.run.shard.shard_mesh`): a model with weights on disk comes sharded over it, each
    rank having read its own rows alone (:func:`lsurf.engine.model.sharding.load_sharded`)."""
    data = load_data(options.data, options.split, options.subset, options.seq_len) if options.data else None
    seed = options.seed if seed is None else seed
    weights = options.weights_on_disk
    if mesh is not None and weights is not None:
        return load_sharded(_builder(options, data, seed), weights, mesh, options.torch_dtype), data
    shape, outputs = _sized(options, data)
    return load_model(options.model, shape, outputs, options.checkpoint, options.torch_dtype, seed=seed), data


def _sized(options: Options, data: dict[str, AnySplit] | None) -> tuple[tuple[int, ...] | None, int | None]:
    """The input shape and output count a zoo model is built for (plug-ins and HF models size
    themselves; without data, a zoo model takes the shape it was designed for)."""
    first = next(iter(data.values())) if data else None
    sized = first is not None and is_zoo(options.model)
    return (first.sample_shape if first else None), (first.num_outputs if first and sized else None)


def _builder(options: Options, data: dict[str, AnySplit] | None, seed: int) -> Callable[[], nn.Module]:
    """What builds the options' model (at its initial weights, drawn from ``seed``), sized for ``data``."""
    shape, outputs = _sized(options, data)
    return lambda: build_for(options.model, shape, outputs, options.torch_dtype, seed)


def model_skeleton(options: Options, data: dict[str, AnySplit] | None, model: nn.Module) -> nn.Module:
    """The modules and buffers of ``model`` without its parameters: ``model`` itself when it is
    whole, the options' model built with its parameters on the meta device and ``model``'s buffers
    when it is sharded (what the sharded Hessian runs its gathered weights through)."""
    if not is_sharded_model(model):
        return model
    return meta_skeleton(_builder(options, data, options.seed), model)


def check_same_inputs(w: World, model: nn.Module, directions_sha256: str | list[str] = "", place: int = 0) -> None:
    """Refuse a job whose ranks hold different models or directions (a plug-in that draws its
    weights unseeded, a checkpoint rewritten while the job started): each rank's tiles would be
    points of another surface, all in one file, and each rank's share of a Hessian product or of
    the sharpness draws another model's. Compared by a cheap fingerprint of the weights and the
    directions' hashes (a surface file's identity holds them anyway; "" for a job without); of a
    sharded model, among the ranks at the same ``place`` in their groups (holding the same shards)."""
    seen = w.allgather((place, weights_fingerprint(model), directions_sha256))
    first: dict[int, int] = {}  # each place's first rank, whose weights the others there must hold
    for r, s in enumerate(seen):
        first.setdefault(s[0], r)
    for what, k in (("model weights", 1), ("directions", 2)):
        other = next((r for r, s in enumerate(seen) if s[k] != seen[first[s[0]] if k == 1 else 0][k]), None)
        if other is not None:
            raise UserError(f"rank {other}'s {what} differ from rank {first[seen[other][0]] if k == 1 else 0}'s: "
                            "every rank must load the same model and directions (lsurf draws a model without "
                            "`checkpoint` from `seed`; a plug-in that draws its own weights must seed them)")


def directions_for(options: Options, model: nn.Module, two: bool | None = None) -> AnyDirections:
    """The directions the options ask for, around the model's current weights: towards ``model2``
    (and ``model3``: the plane through three models), from ``dir_file``, or random (seeded,
    normalised). ``two`` (default: whether the grid has a y axis) asks for a second direction."""
    two = (options.y is not None) if two is None else two
    if options.directions != "random":
        raise UserError(f"`directions` {options.directions}: Hessian directions are computed from the data, by "
                        "lsurf.run.curvature.hessian_plane (or `lsurf hessian --save-directions`)")
    if options.model2:
        return _towards_models(options, model, two)
    if options.curve_plane:
        return _curve_plane(options, model, two)
    if options.dir_file:
        names, targets = target_tensors(model, options.dir_type)
        dirs = load_directions(options.dir_file, names, targets, two)
        dirs.meta.setdefault("dir_type", options.dir_type)
        return dirs
    return random_directions(model, seed=options.seed, norm=options.norm, ignore=options.ignore,
                             dir_type=options.dir_type, two=two, same_dir=options.same_dir,
                             regenerate=options.regenerate)


def plane_directions(options: Options, model: nn.Module, two: bool | None = None) -> list[AnyDirections]:
    """The directions of each plane of an ensemble of ``planes`` K: plane k's are those a
    single-plane run with seed ``seed`` + k draws, so any plane can be redone alone."""
    return [directions_for(options.replace(seed=options.seed + k, planes=1), model, two)
            for k in range(options.planes)]


def _towards_models(options: Options, model: nn.Module, two: bool) -> Directions:
    """Directions towards ``model2`` (and ``model3``), checked to be the same architecture."""
    assert options.model2 is not None  # the caller comes here only with model2 set
    others = [options.model2] + ([options.model3] if options.model3 else [])
    if two != bool(options.model3):
        raise UserError("a plane through models needs both `model3` and `y`; a line needs `model2` alone")
    if options.dir_file:
        raise UserError("`dir_file` and `model2` both set the directions: give one")
    states = []
    for path in others:
        if is_sharded_model(model):  # read by rows, as the model was
            states.append(read_rows(model, path))
            continue
        twin = copy.deepcopy(model)
        load_checkpoint(twin, path)
        states.append(twin.state_dict())
    return model_directions(model, states, options.dir_type, [str(p) for p in others])


def _curve_plane(options: Options, model: nn.Module, two: bool) -> Directions:
    """The plane of a curve of ``lsurf curve train``, centred on its model A (which must be the
    checkpoint loaded): d₁ = B − A, d₂ towards the bend (see lsurf.engine.geometry.curve.curve_plane), with
    A, B and the bend as markers."""
    assert options.curve_plane is not None  # the caller comes here only with curve_plane set
    if not two:
        raise UserError("`curve_plane` is a plane: give `y` too")
    stored = read_curve(options.curve_plane)
    if not options.checkpoint or file_sha256(options.checkpoint) != stored.attrs.get("checkpoint_sha256"):
        raise UserError(f"`checkpoint` {options.checkpoint!r} is not model A of curve {options.curve_plane!r} "
                        f"(that was {stored.attrs.get('checkpoint')!r}): the plane is centred on it")
    _, b = recorded_ends(stored)
    names, targets = target_tensors(model, "weights")
    curve = stored.curve(names, [t.detach().cpu() for t in targets], [x.to(t) for x, t in zip(b, targets)])
    d1, d2 = curve_plane(curve)
    xb, yb = bend_coordinates(curve, d1, d2)
    label = "bend" if curve.num_bends == 1 else "curve at t=1/2"
    marks = [{"label": "model A", "x": 0.0, "y": 0.0}, {"label": "model B", "x": 1.0, "y": 0.0},
             {"label": label, "x": float(xb), "y": float(yb)}]
    meta = {"source": "curve", "dir_type": "weights", "curve": options.curve_plane,
            "curve_sha256": file_sha256(options.curve_plane),
            "models": [stored.attrs.get("checkpoint"), stored.attrs.get("model2")], "markers": marks}
    return Directions(names, d1, d2, meta)


def save_direction_file(dirs: AnyDirections, options: Options) -> None:
    """Write ``dirs`` to ``options.out`` with the checkpoint they were made around."""
    if not Path(options.out).resolve().parent.is_dir():
        raise UserError(f"output folder {str(Path(options.out).parent)!r} does not exist")
    prov = {"checkpoint": options.checkpoint or "", "model": options.model}
    if options.checkpoint:
        prov["checkpoint_sha256"] = file_sha256(options.checkpoint)
    save_directions(dirs, options.out, prov)


def grid_for(options: Options) -> Grid:
    """The options' grid; ``planes`` K > 1 gives it a plane axis."""
    return Grid.parse(options.x, options.y, options.planes if options.planes > 1 else None)


def directions_path(out: str | Path) -> Path:
    """Where a run that made its own directions keeps them: beside the surface, ``NAME.directions.h5``."""
    out = Path(out)
    return out.with_name(out.stem + ".directions.h5")
