"""``lsurf vtk``: a surface as a VTK XML structured grid for ParaView."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.formats.surface_file import read_surface
from lsurf.post.vtkfile import write_vtk

HELP = "write a VTK XML file of a surface for ParaView"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file", help="a surface file (lsurf's or Li et al.'s)")
    common.add_slice(p)
    p.add_argument("--quantity", default="train_loss", help="the height of the surface")
    p.add_argument("--log", action="store_true", help="height = log10(quantity)")
    p.add_argument("--zmax", type=float, help="clip the height here")
    p.add_argument("--interp", type=int, default=1, help="refine each axis K-fold (linear)")
    p.add_argument("--out", help="output .vts (default: FILE with .vts)")


def run(args: argparse.Namespace) -> int:
    surface = read_surface(args.file)
    surface = surface.slice(args.slice) if args.slice else surface
    path = write_vtk(surface, args.out, args.quantity, log=args.log, zmax=args.zmax, interp=args.interp)
    print(f"wrote {path} ({int(surface.done.sum())}/{surface.done.size} points computed)")
    return 0
