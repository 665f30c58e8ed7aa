"""The curve jobs of mode connectivity, from :class:`Options` (``checkpoint`` is model A, ``model2``
model B) on every rank of an MPI job (``comm`` None: one process).

:func:`train_curve_job` trains the bends data-parallel (every rank takes its share of every batch;
gradients are added over the ranks) and rewrites the curve file ``options.out`` after every epoch,
so the same command run again continues from the last finished epoch. :func:`eval_curve_job`
shares the points t among the ranks, evaluates the curve and the straight line at each, and writes
a 1-D surface file (axis t) that ``lsurf plot`` and ``lsurf info`` read.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.engine.data.batches import to_device
from lsurf.engine.data.splits import AnySplit, Split
from lsurf.engine.evaluation.evaluate import Evaluator
from lsurf.engine.evaluation.labels import check_class_labels
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.formats import surface_file
from lsurf.engine.formats.curve_file import StoredCurve, curve_attrs, read_curve, save_curve
from lsurf.engine.geometry.curve import Curve, check_same_architecture, check_shape, parameters_of
from lsurf.engine.geometry.directions import AnyDirections, Directions, model_directions
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.io import file_sha256
from lsurf.engine.model.models import read_state_dict
from lsurf.engine.model.snapshot import preserved
from lsurf.engine.training.curve import Progress, Training, train_curve
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.points import PointSet
from lsurf.run.provenance import Provenance
from lsurf.run.runtime import choose_device
from lsurf.run.sampler import sample_points
from lsurf.run.sources import check_same_inputs, load_inputs
from lsurf.run.world import World, abort_on_failure

Log = Callable[[str], None]
Ends = tuple[list[str], list[torch.Tensor], list[torch.Tensor]]  # parameter names, values at A, values at B


@dataclass(frozen=True)
class CurveSpec:
    """What ``lsurf curve train`` adds to the options: the curve's shape and how it is trained."""

    bends: int = 1
    curve_type: str = "bezier"
    training: Training = field(default_factory=Training)

    def __post_init__(self) -> None:
        check_shape(self.curve_type, self.bends)


@dataclass(frozen=True)
class CurveEval:
    """What ``lsurf curve eval`` adds to the options: the curve file and the ``points`` values of t
    in [0, 1] it is evaluated at."""

    curve: str
    points: int = 21

    def __post_init__(self) -> None:
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 2:
            raise UserError(f"`points` {self.points!r}: must be a whole number, at least 2 (the two ends)")


def ends(model: nn.Module, options: Options) -> Ends:
    """The parameters' names and values at model A (the model as loaded, at ``checkpoint``) and at
    model B (``model2``), refused unless both are the same architecture."""
    if not options.checkpoint or not options.model2:
        raise UserError("a curve joins two models: give `checkpoint` (model A) and `model2` (model B)")
    state = read_state_dict(options.model2)
    check_same_architecture(model.state_dict(), state, options.model2)
    names, a = parameters_of(model)
    return names, a, [state[n].to(x) for n, x in zip(names, a)]


_INPUTS = ("model", "checkpoint", "model2", "data", "seq_len", "loss", "ignore_index", "output")


def with_curve_inputs(curve_path: str, given: Mapping[str, Any], *, plane: bool = False) -> dict[str, Any]:
    """``given`` option values over those ``lsurf curve train`` recorded for the curve's models and
    data (model, both checkpoints, data, window length, loss, output), so ``curve eval CURVE``
    needs no more. ``plane``: for sampling the curve's plane, which is centred on model A and takes
    no ``model2``. Not the subset, dtype or device: where and on how much to evaluate is the
    caller's choice. A recorded checkpoint that is not there (a relative path from another folder)
    is refused naming the option to give; hashes are checked where the checkpoints are read."""
    config = json.loads(str(curve_attrs(curve_path).get("config", "{}")))  # the bends are not needed here
    recorded = {k: config[k] for k in _INPUTS if config.get(k) is not None and k not in given
                and not (plane and k == "model2")}
    for key in ("checkpoint", "model2"):
        if key in recorded and not Path(recorded[key]).is_file():
            raise UserError(f"curve {curve_path!r} was trained from {recorded[key]!r}, which is not found from "
                            f"here: give `{key}`")
    return {**recorded, **given}


def train_curve_job(options: Options, spec: CurveSpec, comm: Any = None, log: Log | None = None) -> StoredCurve | None:
    """Train the curve between ``checkpoint`` and ``model2`` into ``options.out``; returns the file
    read back on rank 0 (None elsewhere). An existing file made the same way is continued (to
    ``spec.training.epochs``); one made otherwise is refused unless ``overwrite``."""
    w = World.of(comm)
    log = log or (lambda m: None)
    with abort_on_failure(w):
        model, split, (names, a, b) = w.agree(lambda: _train_inputs(options))
        w.agree(lambda: check_same_inputs(w, model))  # every rank's gradient share is of model A
        dev = w.agree(lambda: choose_device(w, options.device))
        w.agree(lambda: _check_train_labels(model, split, options, dev))
        attrs = _curve_attrs(options, spec) if w.is_root else {}
        with contextlib.ExitStack() as stack:
            def prepare() -> bool:
                if not w.is_root:
                    return False
                stack.enter_context(surface_file.exclusive_lock(options.out))
                return _resumable(Path(options.out), json.loads(attrs["identity"]), options.overwrite)

            resume = w.bcast(w.agree(prepare))
            curve, progress = _start(options.out if resume else None, spec, names, a, b)
            if w.is_root:
                log(_plan_line(options.out, spec, progress, w.size))

            started, first = time.perf_counter(), progress.epochs_done

            def saved(c: Curve, p: Progress) -> None:
                if w.is_root:
                    save_curve(options.out, c, p, attrs)
                    log(f"epoch {p.epochs_done}/{spec.training.epochs}: train loss {p.train_loss[-1]:.4f}, "
                        f"lr {p.lr[-1]:.4g}; " + _eta(time.perf_counter() - started, p.epochs_done - first,
                                                     spec.training.epochs - p.epochs_done))
            group = w.groups(w.size)  # all ranks: its allreduce adds the gradients
            try:
                train_curve(model, curve, split, spec.training, progress, loss_fn=resolve_loss(options.loss,
                            options.ignore_index), output=options.output, shard=(w.rank, w.size),
                            reduce=group.add_sums(), device=dev, on_epoch=saved)
            finally:
                group.free()
        return read_curve(options.out) if w.is_root else None


def _eta(elapsed: float, done: int, left: int) -> str:
    """Time spent on this run's epochs and the time the rest will take at the same pace."""
    return _duration(elapsed) + ("" if left == 0 else f", about {_duration(elapsed / done * left)} left")


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _plan_line(out: str, spec: CurveSpec, progress: Progress, ranks: int) -> str:
    done, epochs = progress.epochs_done, spec.training.epochs
    if done >= epochs:
        return f"curve: {out} has {done} epochs already: nothing to do"
    bends = f"{spec.bends} bend{'s' * (spec.bends > 1)}"
    return f"curve: {spec.curve_type}, {bends}, epochs {done + 1} to {epochs} on {ranks} rank{'s' * (ranks > 1)}"


def _train_inputs(options: Options) -> tuple[nn.Module, Split, Ends]:
    model, data = load_inputs(options)
    if data is None or "train" not in data:
        raise UserError("`data` with a train split is needed to train a curve")
    return model, data["train"].materialise(), ends(model, options)


def _check_train_labels(model: nn.Module, split: Split, options: Options, dev: torch.device) -> None:
    """The train split's class labels against the model's outputs, before any step (each step's
    loss indexes the outputs with its labels), counted on the host where the split is."""
    with preserved(model):
        model.to(device=dev, dtype=options.torch_dtype).eval()
        x, _ = to_device(split.x[:1], split.y[:1], dev, options.torch_dtype)
        check_class_labels(model, x, [split.y], resolve_loss(options.loss, options.ignore_index), "train",
                           output=options.output)


def _curve_attrs(options: Options, spec: CurveSpec) -> dict[str, Any]:
    """The curve file's provenance, and the identity a resumed run must match."""
    assert options.checkpoint and options.model2  # checked by ends()
    hashes = {"checkpoint_sha256": file_sha256(options.checkpoint), "model2_sha256": file_sha256(options.model2)}
    identity = {"model": options.model, **hashes, "curve_type": spec.curve_type, "bends": spec.bends,
                "data": options.data, "subset": options.subset, "seq_len": options.seq_len, "dtype": options.dtype,
                "loss": options.loss, "ignore_index": options.ignore_index, "output": options.output,
                **spec.training.identity()}
    config = {**options.as_dict(), "bends": spec.bends, "curve_type": spec.curve_type,
              **{k: getattr(spec.training, k) for k in ("epochs", *spec.training.identity())}}
    return {"identity": json.dumps(identity), "config": json.dumps(config, default=str), "model": options.model,
            "data": options.data or "", "checkpoint": options.checkpoint, "model2": options.model2, **hashes,
            "lsurf_version": __version__}


def _resumable(path: Path, identity: dict, overwrite: bool) -> bool:
    """Whether ``path`` holds a curve this run continues; one made otherwise is refused, untouched."""
    if overwrite or not path.exists():
        return False
    old = json.loads(read_curve(path).attrs.get("identity", "{}"))
    for key, value in identity.items():
        if old.get(key) != value:
            raise UserError(f"{str(path)!r} exists but was made with another {key.replace('_', ' ')} "
                            f"({old.get(key)!r}, now {value!r}): use `overwrite` to start again")
    return True


def _start(path: str | None, spec: CurveSpec, names: list[str], a: list[torch.Tensor],
           b: list[torch.Tensor]) -> tuple[Curve, Progress]:
    """The curve and progress to train from: the file's (``path``), or bends on the straight line."""
    if path is None:
        return Curve.straight(spec.curve_type, names, a, b, spec.bends), Progress()
    stored = read_curve(path)
    return stored.curve(names, a, b), stored.progress


def eval_curve_job(options: Options, spec: CurveEval, comm: Any = None,
                   log: Log | None = None) -> surface_file.Surface | None:
    """Loss and accuracy at ``spec.points`` values of t in [0, 1] along the curve (quantities
    ``train_loss``, ...) and along the straight line (``line_train_loss``, ...) into the 1-D surface
    file ``options.out``, with the barriers (highest train loss along the path minus the mean of
    the ends') as attributes ``barrier_curve`` and ``barrier_line``. Returns the surface on rank 0.
    The points are sampled by the surfaces' runner (lsurf.run.sampler): tiles over the ranks, the
    file's lock, identity and resume; one made otherwise is refused unless ``overwrite``."""
    w = World.of(comm)
    log = log or (lambda m: None)
    with abort_on_failure(w):
        model, data, path = w.agree(lambda: _eval_inputs(options, spec))
        opts = options.replace(bn="recalibrate" if _has_batchnorm(model) else options.bn)
        surface = sample_points(w, model, data, path, Path(opts.out), opts, Provenance.of(opts), None, log)
        if surface is None:
            return None
        barriers = _barriers(opts, surface.values)
        surface_file.set_attrs(opts.out, barriers)
        b = barriers
        log(f"barrier ({b['barrier_split']} loss): line {b['barrier_line']:.4g}, curve {b['barrier_curve']:.4g}")
        return surface_file.read_surface(opts.out)


class CurvePoints:
    """The points t of a curve and of the straight line between its ends, evaluated alike: the
    curve's by its offsets (θ(t) − A), the line's along its direction B − A (its ``line_`` values)."""

    def __init__(self, ev: Evaluator, curve: Curve, grid: Grid):
        self.first, self.curve, self.grid = ev, curve, grid

    @property
    def quantities(self) -> list[str]:
        return self.first.quantities + [f"line_{n}" for n in self.first.quantities]

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        bent = self.first.evaluate_offsets(self.curve.offset(float(self.grid.x[i])) for _, i in cells)
        line = self.first.evaluate_many([self.grid.coords(j, i) for j, i in cells])
        return [{**b, **{f"line_{k}": v for k, v in s.items()}} for b, s in zip(bent, line)]


@dataclass(frozen=True)
class CurvePath:
    """A curve between two models and the straight line between them, at ``grid``'s values of t
    (lsurf.run.points): the evaluator holds the line's direction, the curve gives offsets."""

    curve: Curve
    line: Directions
    grid: Grid
    stored: StoredCurve
    model2: str
    fidelity_note: str | None = "not measured: a curve's points lie on no plane"

    @property
    def planes(self) -> list[AnyDirections]:
        return [self.line]

    def identity(self) -> dict[str, Any]:
        return {"curve_sha256": file_sha256(self.stored.path)}

    def attrs(self) -> dict[str, Any]:
        return {"curve": self.stored.path, "curve_sha256": file_sha256(self.stored.path),
                "curve_type": self.stored.kind, "bends": len(self.stored.bends), "model2": self.model2,
                "model2_sha256": file_sha256(self.model2),
                "markers": json.dumps([{"label": "model A", "x": 0.0, "y": 0.0},
                                       {"label": "model B", "x": 1.0, "y": 0.0}])}

    def quantities(self, names: list[str]) -> list[str]:
        return names + [f"line_{n}" for n in names]

    def points(self, ev: Evaluator) -> PointSet:
        return CurvePoints(ev, self.curve, self.grid)


def _eval_inputs(options: Options, spec: CurveEval) -> tuple[nn.Module, dict[str, AnySplit], CurvePath]:
    """Model A, the data and the path: the curve read from ``spec.curve`` and the line's direction
    B − A at its values of t; the curve must have been trained between these very checkpoints."""
    curve_path = spec.curve
    stored = read_curve(curve_path)
    model, data = load_inputs(options)
    if data is None:
        raise UserError("`data` is needed to evaluate a curve")
    names, a, b = ends(model, options)
    for key, path in (("checkpoint", options.checkpoint), ("model2", options.model2)):
        assert path is not None  # ends() checked
        if file_sha256(path) != stored.attrs.get(f"{key}_sha256"):
            raise UserError(f"`{key}` {path!r} is not the model curve {curve_path!r} was trained from "
                            f"(that was {stored.attrs.get(key)!r}; the sha256 differs)")
    line = model_directions(model, [dict(zip(names, b))], "weights", [str(options.model2)])
    grid = Grid(np.linspace(0.0, 1.0, spec.points))
    return model, data, CurvePath(stored.curve(names, a, b), line, grid, stored, str(options.model2))


def _has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm statistics at a point between two models are neither model's: such models are
    evaluated with statistics recalibrated on the train split at every point."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def barrier(losses: np.ndarray) -> float:
    """The highest loss along a path minus the mean of its two ends' (Garipov et al.'s barrier)."""
    return float(np.max(losses) - (losses[0] + losses[-1]) / 2)


def _barriers(opts: Options, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """The curve's and the line's barriers on the train split's loss (else the first split's)."""
    split = "train" if "train" in opts.split else opts.split[0]
    return {"barrier_split": split, "barrier_curve": barrier(values[f"{split}_loss"]),
            "barrier_line": barrier(values[f"line_{split}_loss"])}
