"""``lsurf info``: provenance and coverage of a surface file; for an ensemble of planes, each
plane's summary and their spread; the shape, progress and ends of a curve file."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.formats.curve_file import is_curve_file, read_curve
from lsurf.engine.formats.surface_file import ENSEMBLES, read_surface
from lsurf.post.ensemble import summarise
from lsurf.post.info import describe

HELP = "provenance and coverage of a surface file (an ensemble: per-plane summaries and their spread; a curve file)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file")
    p.add_argument("--quantity", default="train_loss", help="the quantity an ensemble is summarised by")
    p.add_argument("--basin-threshold", type=float,
                   help="an ensemble's basin radius: where the quantity first exceeds this (default: twice "
                   "each plane's centre value)")


def run(args: argparse.Namespace) -> int:
    if is_curve_file(args.file):
        print("\n".join(read_curve(args.file).describe()))
        return 0
    surface = read_surface(args.file)
    for line in describe(surface):
        print(line)
    if surface.view().kind in ENSEMBLES:  # an ensemble, not a geometry's third axis
        for line in summarise(surface, args.quantity, args.basin_threshold).describe():
            print(line)
    return 0
