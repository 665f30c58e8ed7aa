"""``lsurf surface``: sample loss and accuracy on a 1-D or 2-D grid (MPI-aware)."""

from __future__ import annotations

import argparse
import sys
import time

from lsurf.cli import common
from lsurf.run.runtime import configure_process, install_abort_hook, launcher_comm
from lsurf.run.sampler import run_surface
from lsurf.run.world import World

HELP = "sample loss and accuracy on a 1-D or 2-D grid (MPI-aware)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p)
    common.add_directions(p)
    g = p.add_argument_group("grid")
    g.add_argument("--x", default=argparse.SUPPRESS, help="MIN:MAX:NUM of alpha (numpy.linspace; default -1:1:51)")
    g.add_argument("--y", default=argparse.SUPPRESS, help="MIN:MAX:NUM of beta; absent -> a 1-D curve")
    common.add_device(p)
    common.add_evaluation(p)
    common.add_run(p)


def run(args: argparse.Namespace) -> int:
    comm = launcher_comm()
    w = World.of(comm)
    install_abort_hook(w)
    options = w.agree(lambda: common.options_from(common.merged_values(args)))
    w.agree(lambda: configure_process(w, options.device, options.threads))
    t0 = time.time()
    surface = run_surface(options, comm, log=lambda m: print(f"lsurf: {m}", file=sys.stderr, flush=True))
    if surface is not None:
        print(f"wrote {options.out} ({int(surface.done.sum())}/{surface.done.size} points done) "
              f"in {time.time() - t0:.1f} s")
    return 0
