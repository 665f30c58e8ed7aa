"""``lsurf directions``: write a direction file."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.run.sources import directions_for, load_inputs, save_direction_file

HELP = "write a direction file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p)
    common.add_directions(p)
    p.add_argument("--one", action="store_true", default=argparse.SUPPRESS,
                   help="only an x direction (for 1-D curves)")
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    values = common.merged_values(args, extra=("one",))
    one = values.pop("one", False)
    options = common.options_from(values, data=values.get("data"), split=("train",))
    model, _ = load_inputs(options)
    dirs = directions_for(options, model, two=not one)
    save_direction_file(dirs, options)
    print(f"wrote {options.out}: {len(dirs.names)} tensors, {dirs.ndim} direction(s), sha256 {dirs.sha256()[:12]}")
    return 0
