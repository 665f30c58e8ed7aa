"""``lsurf export``: a surface in another format — Li et al.'s layout (``ll``), a triangle mesh
(``obj``) for Blender/MeshLab, or a spreadsheet (``csv``)."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.formats.progress import job_state
from lsurf.engine.formats.surface_file import read_surface
from lsurf.post.export import FORMATS, default_export_path, export_surface

HELP = "write a surface in Li et al.'s layout (ll), as a mesh (obj) or as csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file", help="a surface file (lsurf's or Li et al.'s)")
    common.add_slice(p)
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    p.add_argument("--out", help="output file (default: beside FILE, NAME_ll.h5, NAME.obj or NAME.csv)")
    p.add_argument("--quantity", default="train_loss", help="obj: the height of the mesh")
    p.add_argument("--log", action="store_true", help="obj: height = log10(quantity)")


def run(args: argparse.Namespace) -> int:
    surface = read_surface(args.file)
    surface = surface.slice(args.slice) if args.slice else surface
    out = args.out or default_export_path(args.file, args.fmt)
    path = export_surface(surface, out, args.fmt, quantity=args.quantity, log=args.log)
    print(f"wrote {path} ({args.fmt}, {int(surface.done.sum())}/{surface.done.size} points computed)")
    print(f"state: {job_state(surface).line()}")
    return 0
