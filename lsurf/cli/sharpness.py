"""``lsurf sharpness``: average- or worst-case loss rise within radius ρ of the checkpoint (MPI-aware).

The file is a 1-D surface file (axis ``draw`` or ``restart``): ``rise`` (L(θ* + δ) − L(θ*)) and the
split's loss at each draw or restart, with ``sharpness``, ``sharpness_stderr`` (sd/√N for average;
0 for worst, a maximum: the restarts' spread is in ``rise``) and ``centre_loss`` as attributes;
the same command run again resumes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lsurf.cli import common
from lsurf.engine.evaluation.sharpness import KINDS, SharpnessSpec
from lsurf.engine.geometry.directions import DIR_TYPES
from lsurf.errors import UserError
from lsurf.run.options import Options
from lsurf.run.runtime import configure_job, start_job
from lsurf.run.sharpness import sharpness

HELP = "average- or worst-case sharpness: the loss rise within radius rho of the checkpoint (MPI-aware)"
_SPEC = common.keyword_defaults(SharpnessSpec, ("kind", "adaptive", "samples", "steps", "restarts"))
_EXTRA = {"radius": None, **_SPEC}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p, split_help="the split whose loss is perturbed: train or test")
    common.add_device(p)
    g = p.add_argument_group("sharpness")
    g.add_argument("--radius", type=float, default=argparse.SUPPRESS, help="rho, the radius of the ball (required)")
    g.add_argument("--kind", choices=KINDS, default=argparse.SUPPRESS,
                   help="average: mean rise over random points of the sphere; worst: largest rise in the ball, "
                   f"by projected gradient ascent (default {_EXTRA['kind']})")
    g.add_argument("--adaptive", action="store_true", default=argparse.SUPPRESS,
                   help="scale-invariant: the ball in coordinates u of delta = |theta*| * u (ASAM)")
    g.add_argument("--samples", type=int, default=argparse.SUPPRESS,
                   help=f"average: random points (default {_EXTRA['samples']})")
    g.add_argument("--steps", type=int, default=argparse.SUPPRESS,
                   help=f"worst: ascent steps per restart ({_EXTRA['steps']})")
    g.add_argument("--restarts", type=int, default=argparse.SUPPRESS,
                   help=f"worst: random starts, best kept ({_EXTRA['restarts']})")
    g.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the random points (default 0)")
    g.add_argument("--dir-type", default=argparse.SUPPRESS, choices=DIR_TYPES,
                   help="tensors perturbed: parameters (weights, the default) or the whole state dict")
    g.add_argument("--out", default=argparse.SUPPRESS,
                   help="the file of the draws and the result (required; resumed if it was made the same way)")
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace an existing output made differently")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS)
    common.add_sharding(p.add_argument_group("rank groups and a model larger than one device"),
                        "every draw or restart")


def run(args: argparse.Namespace) -> int:
    w = start_job()
    options, spec = w.agree(lambda: _settings(args))
    configure_job(w, options.device, options.threads, options.tf32, keep_freed=not options.shard)
    results = sharpness(options, spec, w.comm, common.stderr_log if w.is_root else None)
    if results is not None:
        print(f"{_summary(results, spec)}; wrote {options.out}", flush=True)
    return 0


def _settings(args: argparse.Namespace) -> tuple[Options, SharpnessSpec]:
    """The options and the spec (flags over the job file), ``radius`` and ``out`` required and the
    output folder checked before any work."""
    values = common.merged_values(args, extra=tuple(_EXTRA))
    extra = {k: values.pop(k) for k in _EXTRA if k in values}
    for name, given in (("radius", extra.get("radius")), ("out", values.get("out"))):
        if given is None:
            raise UserError(f"`{name}` is required")
    if not Path(values["out"]).resolve().parent.is_dir():
        raise UserError(f"`out` {values['out']!r}: the folder {str(Path(values['out']).parent)!r} does not exist")
    return common.options_from(values), SharpnessSpec(**extra)


def _summary(results: dict[str, np.ndarray], spec: SharpnessSpec) -> str:
    """One line: the kind and its settings, the value (± its standard error) and the centre loss."""
    kind = ("adaptive " if spec.adaptive else "") + spec.kind
    error = f" ± {float(results['sharpness_stderr']):.4g}" if spec.kind == "average" else ""
    return (f"sharpness ({kind}, rho {spec.radius:g}, {spec.settings}): {float(results['sharpness']):.6g}{error} "
            f"(centre loss {float(results['centre_loss']):.6g})")
