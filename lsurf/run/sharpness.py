"""``lsurf sharpness`` as a library call: average- or worst-case sharpness of the options' model on
one split, the draws (average) or restarts (worst) spread over the MPI ranks (``World.spread``).

Draw or restart i depends on (``options.seed``, i) alone, so the values are the same on any number
of ranks; rank 0 gathers them in order. Every rank holds the whole split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lsurf.engine.data.splits import AnySplit
from lsurf.engine.evaluation.evaluate import evaluator
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.evaluation.plan import default_batch_size
from lsurf.engine.evaluation.probes import check_outputs_fit
from lsurf.engine.evaluation.sharpness import Probe, SharpnessSpec, summarise
from lsurf.engine.geometry.directions import zero_directions
from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.runtime import choose_device
from lsurf.run.sources import check_same_inputs, load_inputs
from lsurf.run.world import World, abort_on_failure

Log = Callable[[str], None]


def sharpness(options: Options, spec: SharpnessSpec, comm: Any = None,
              log: Log | None = None) -> dict[str, np.ndarray] | None:
    """Sharpness of the mean loss over ``options.split`` (one split) within radius ``spec.radius`` of
    the checkpoint, as ``spec`` says (lsurf.engine.evaluation.sharpness.SharpnessSpec).

    Call it on every rank with the same ``comm`` (None: one process). Rank 0 gets ``sharpness``,
    ``sharpness_stderr`` (sd/√N for average; 0 for worst, whose per-restart values show the spread),
    ``values`` (L(θ* + δ) − L(θ*) per draw or restart, in index order) and ``centre_loss``; other ranks
    get None. The model is loaded here and handed back by the evaluator as it came.
    """
    w = World.of(comm)
    with abort_on_failure(w):
        split, model, data = w.agree(lambda: _inputs(options))
        w.agree(lambda: check_same_inputs(w, model))  # each rank's draws must be of the one model
        if log is not None and w.is_root:
            log(f"sharpness: {spec.kind}, {spec.settings} on {w.size} rank{'s' * (w.size > 1)}")
        centre, values = _values(w, options, model, data, split, spec)
    if values is None:
        return None
    value, stderr = summarise(values, spec.kind)
    return {"sharpness": np.array(value), "sharpness_stderr": np.array(stderr),
            "values": np.array(values, dtype=np.float64), "centre_loss": np.array(centre)}


def _inputs(options: Options) -> tuple[str, nn.Module, dict[str, AnySplit]]:
    """The split, the model at its checkpoint and that split's data (refusing more than one split).
    A model without a checkpoint starts from ``options.seed`` (as ``lsurf train`` does): every rank,
    and every rerun, must measure the same centre."""
    if len(options.split) != 1:
        raise UserError(f"`split` {','.join(options.split)!r}: sharpness is of one split, train or test")
    model, data = load_inputs(options, seed=options.seed)
    if data is None:
        raise UserError("`data` is needed for sharpness")
    split = options.split[0]
    return split, model, {split: data[split]}


def _values(w: World, options: Options, model: nn.Module, data: dict[str, AnySplit], split: str,
            spec: SharpnessSpec) -> tuple[float, list | None]:
    """(centre loss, the rise of each draw or restart on rank 0, None elsewhere), spread over the
    ranks; the model handed back after."""
    device, outputs = w.agree(lambda: _check_fit(w, options, model, data))
    batch_size = options.batch_size or default_batch_size(device, outputs)
    with evaluator(model, data, zero_directions(model, options.dir_type), device=device, dtype=options.torch_dtype,
                   batch_size=batch_size, loss=options.loss, output=options.output,
                   ignore_index=options.ignore_index) as ev:
        probe = Probe(ev, split, float(spec.radius), spec.adaptive, options.seed)
        worst = spec.kind == "worst"
        rises = w.spread(range(spec.count), lambda i: probe.worst(i, spec.steps) if worst else probe.average(i))
        return probe.centre, rises


def _check_fit(w: World, options: Options, model: nn.Module, data: dict[str, AnySplit]) -> tuple[torch.device, int]:
    """This rank's device and the outputs per sample (which size a batch), after one tiny forward
    proves model, data and loss fit (class labels checked on rank 0 for the built-in loss)."""
    device = choose_device(w, options.device)
    loss_fn = resolve_loss(options.loss, options.ignore_index)
    labels = data if w.is_root and options.loss == "cross_entropy" else None
    with preserved(model):
        model.to(device=device, dtype=options.torch_dtype).eval()  # eval first: BatchNorm statistics stay
        outputs = check_outputs_fit(model, next(iter(data.values())), loss_fn, device, options.torch_dtype,
                                    options.output, labels)
    return device, outputs
