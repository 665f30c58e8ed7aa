"""``lsurf info``: provenance and coverage of a surface file."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.surface_file import read_surface

HELP = "provenance and coverage of a surface file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file")


def run(args: argparse.Namespace) -> int:
    for line in read_surface(args.file).describe():
        print(line)
    return 0
