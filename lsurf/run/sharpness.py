"""``lsurf sharpness`` as a library call: average- or worst-case sharpness of the options' model on
one split, its draws (average) or restarts (worst) the points of a 1-D file sampled by the one
runner (lsurf.run.sampler): tiles over the ranks, progress, the file's lock, identity and resume.

Draw or restart i depends on (``options.seed``, i) alone, so the values are the same on any number
of ranks. In rank groups (``ranks_per_point``) a group shares each draw or restart, its ranks
holding 1/G of the split (and with ``shard`` of the model): sums and gradients are the group's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lsurf.engine.data.splits import AnySplit
from lsurf.engine.evaluation.evaluate import Evaluator
from lsurf.engine.evaluation.sharpness import Probe, SharpnessSpec, summarise
from lsurf.engine.formats import surface_file
from lsurf.engine.geometry.directions import AnyDirections, zero_directions
from lsurf.engine.geometry.grid import Grid
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.points import PointSet
from lsurf.run.provenance import Provenance
from lsurf.run.runtime import bound_device, choose_device
from lsurf.run.sampler import sample_points
from lsurf.run.shard import shard_mesh
from lsurf.run.sources import load_inputs
from lsurf.run.world import World, abort_on_failure

Log = Callable[[str], None]
RISE = "rise"  # L(θ* + δ) − L(θ*) at a draw or restart: the file's quantity beside the loss there


def sharpness(options: Options, spec: SharpnessSpec, comm: Any = None,
              log: Log | None = None) -> dict[str, np.ndarray] | None:
    """Sharpness of the mean loss over ``options.split`` (one split) within radius ``spec.radius`` of
    the checkpoint, as ``spec`` says (lsurf.engine.evaluation.sharpness.SharpnessSpec), into the
    1-D file ``options.out`` (axis ``draw`` or ``restart``: ``rise`` and the split's loss at each,
    the summary as attributes); a file made the same way is resumed, one made otherwise refused
    unless ``overwrite``.

    Call it on every rank with the same ``comm`` (None: one process). Rank 0 gets ``sharpness``,
    ``sharpness_stderr`` (sd/√N for average; 0 for worst, whose per-restart values show the spread),
    ``values`` (the rise per draw or restart, in index order) and ``centre_loss``; other ranks get
    None. The model is loaded here and handed back by the evaluator as it came.
    """
    w = World.of(comm)
    with abort_on_failure(w):
        dev = w.agree(lambda: choose_device(w, options.device))
        with bound_device(dev):
            mesh = w.agree(lambda: shard_mesh(w, options, dev))
            split, model, data = w.agree(lambda: _inputs(options, mesh))
        if log is not None and w.is_root:
            log(f"sharpness: {spec.kind}, {spec.settings} on {w.size} rank{'s' * (w.size > 1)}")
        draws = SharpnessDraws(spec, split, options.seed, [zero_directions(model, options.dir_type, two=False)])
        # a draw is a pass, a restart an ascent: never stacked; contiguous, as the ascent's gradients
        # are, and as on any number of ranks (a rise is a small difference of two losses)
        opts = options.replace(points_per_pass=1, layout="contiguous")
        surface = sample_points(w, model, data, draws, Path(opts.out), opts, Provenance.of(opts), None,
                                log or (lambda m: None))
        if surface is None:
            return None
        results = _results(surface.values, split, spec)
        surface_file.set_attrs(opts.out, {k: float(results[k]) for k in ("sharpness", "sharpness_stderr",
                                                                         "centre_loss")})
        return results


def _inputs(options: Options, mesh: Any) -> tuple[str, nn.Module, dict[str, AnySplit]]:
    """The split, the model at its checkpoint (sharded over ``mesh`` as it is read, with ``shard``)
    and that split's data (refusing more than one split). A model without a checkpoint starts from
    ``options.seed`` (as ``lsurf train`` does): every rank, and every rerun, must measure the same
    centre."""
    if len(options.split) != 1:
        raise UserError(f"`split` {','.join(options.split)!r}: sharpness is of one split, train or test")
    model, data = load_inputs(options, seed=options.seed, mesh=mesh)
    if data is None:
        raise UserError("`data` is needed for sharpness")
    split = options.split[0]
    return split, model, {split: data[split]}


def _results(values: dict[str, np.ndarray], split: str, spec: SharpnessSpec) -> dict[str, np.ndarray]:
    """What :func:`sharpness` returns, from the file's values: the rise per draw, its summary, and
    the centre's loss (each point's loss less its rise)."""
    rises = values[RISE]
    value, stderr = summarise(rises.tolist(), spec.kind)
    centre = float(np.mean(values[f"{split}_loss"] - rises))
    return {"sharpness": np.array(value), "sharpness_stderr": np.array(stderr),
            "values": np.asarray(rises, dtype=np.float64), "centre_loss": np.array(centre)}


class SharpnessPoints:
    """Draw or restart i at cell (0, i): its rise over the centre, and the split's loss there."""

    def __init__(self, ev: Evaluator, split: str, spec: SharpnessSpec, seed: int):
        self.first, self.split, self.spec = ev, split, spec
        self.probe = Probe(ev, split, float(spec.radius), spec.adaptive, seed)  # the centre's loss, once

    @property
    def quantities(self) -> list[str]:
        return [RISE, f"{self.split}_loss"]

    def evaluate(self, plane: int, cells: list[tuple[int, int]]) -> list[dict[str, float]]:
        out = []
        for _, i in cells:
            rise = self.probe.worst(i, self.spec.steps) if self.spec.kind == "worst" else self.probe.average(i)
            out.append({RISE: rise, f"{self.split}_loss": self.probe.centre + rise})
        return out


@dataclass(frozen=True)
class SharpnessDraws:
    """The draws (average) or restarts (worst) of a sharpness measurement as points of a 1-D file
    (lsurf.run.points); the evaluator holds zero directions, never moved along."""

    spec: SharpnessSpec
    split: str
    seed: int
    planes: list[AnyDirections]
    fidelity_note: str | None = "not measured: sharpness draws lie on no plane"

    @property
    def grid(self) -> Grid:
        return Grid(np.arange(self.spec.count, dtype=np.float64))

    def identity(self) -> dict[str, Any]:
        return {"sharpness": dataclasses.asdict(self.spec)}

    def attrs(self) -> dict[str, Any]:
        axis = "draw" if self.spec.kind == "average" else "restart"
        return {"sharpness_spec": json.dumps(dataclasses.asdict(self.spec)), "axis_names": json.dumps([axis])}

    def quantities(self, names: list[str]) -> list[str]:
        return [RISE, f"{self.split}_loss"]

    def points(self, ev: Evaluator) -> PointSet:
        return SharpnessPoints(ev, self.split, self.spec, self.seed)
