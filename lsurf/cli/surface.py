"""``lsurf surface``: sample loss and accuracy on a 1-D or 2-D grid (MPI-aware)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lsurf.cli import common
from lsurf.engine.formats.surface_file import completion
from lsurf.run.curve import with_curve_inputs
from lsurf.run.runtime import configure_job, start_job
from lsurf.run.sampler import run_surface

HELP = "sample loss and accuracy on a 1-D or 2-D grid (MPI-aware)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p)
    common.add_data_feed(p)
    common.add_directions(p)
    g = p.add_argument_group("grid")
    g.add_argument("--x", default=argparse.SUPPRESS, help="MIN:MAX:NUM of alpha (numpy.linspace; default -1:1:51)")
    g.add_argument("--y", default=argparse.SUPPRESS, help="MIN:MAX:NUM of beta; absent -> a 1-D curve")
    g.add_argument("--planes", type=int, default=argparse.SUPPRESS,
                   help="K random planes in one run (seeds SEED to SEED+K-1): an ensemble with a plane axis")
    common.add_device(p)
    common.add_evaluation(p)
    common.add_fewer_passes(p)
    common.add_run(p)
    p.add_argument("--verify", action="store_true", default=argparse.SUPPRESS,
                   help="sample nothing: exit 0 if --out holds every point, else 1 with one line (for job "
                   "scripts: Slurm 22.05's srun can exit 0 when a step failed to launch)")


def run(args: argparse.Namespace) -> int:
    if vars(args).pop("verify", False):
        return verify(common.options_from(common.merged_values(args)).out)
    w = start_job()
    options = w.agree(lambda: common.options_from(_with_curve_inputs(common.merged_values(args))))
    configure_job(w, options.device, options.threads, options.tf32, keep_freed=not options.shard)
    t0 = time.time()
    surface = run_surface(options, w.comm, log=common.stderr_log)
    if surface is not None:
        print(f"wrote {options.out} ({int(surface.done.sum())}/{surface.done.size} points done) "
              f"in {time.time() - t0:.1f} s")
    return 0


def _with_curve_inputs(values: dict) -> dict:
    """The plane of a curve is sampled around the curve's model A, on its data, unless told otherwise."""
    return with_curve_inputs(values["curve_plane"], values, plane=True) if values.get("curve_plane") else values


def verify(out: str) -> int:
    """Whether the surface a run with these options writes is complete, in one line: 0 if it is.

    A job script runs it after ``srun``, whose exit status alone cannot be trusted: Slurm 22.05's
    srun can exit 0 when the step failed to launch. Options resolve as for a run (job file, then
    flags), so the same arguments name the same file. The file is only read, never opened for
    writing, and no MPI is started.
    """
    if not Path(out).exists():
        print(f"lsurf: {out} does not exist: the run wrote nothing; resubmit the same command", file=sys.stderr)
        return 1
    done, total = completion(out)
    if done < total:
        print(f"lsurf: {out} is incomplete: {done} of {total} points done; resubmit the same command to finish it",
              file=sys.stderr)
        return 1
    print(f"{out}: complete ({total} points)")
    return 0
