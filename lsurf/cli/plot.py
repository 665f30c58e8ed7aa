"""``lsurf plot``: contours, heat map, 3-D surface of a 2-D file; loss and accuracy curves of a 1-D one."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsurf.cli import common
from lsurf.engine.surface_file import read_surface
from lsurf.post.plot import KINDS, figures, parse_size, read_projection

HELP = "plot a surface file: contours, heat map, 3-D surface, 1-D curves"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file", help="a surface file (lsurf's or Li et al.'s)")
    p.add_argument("--quantity", default="train_loss", help="train_loss, test_acc, ..., hessian_ratio")
    p.add_argument("--kind", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--vmin", type=float)
    p.add_argument("--vmax", type=float, help="upper colour limit (default: robust, see lsurf.post.plot)")
    p.add_argument("--levels", type=int, default=20, help="contour levels")
    p.add_argument("--log", action="store_true", help="logarithmic colour scale / height")
    p.add_argument("--format", default="png", choices=["png", "pdf", "svg"])
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--size", default="6x5", help="figure size in inches, WxH")
    p.add_argument("--out-dir", help="where to write (default: next to FILE)")
    p.add_argument("--trajectory", help="projection file of lsurf trajectory: draw the path")


def run(args: argparse.Namespace) -> int:
    surface = read_surface(args.file)
    size = parse_size(args.size)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.file).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"coverage: {int(surface.done.sum())}/{surface.done.size} points")
    kinds = tuple(k.strip() for k in args.kind.split(",") if k.strip())
    projection = read_projection(args.trajectory) if args.trajectory else None
    made = figures(surface, args.quantity, kinds, stem=Path(args.file).stem, projection=projection,
                   vmin=args.vmin, vmax=args.vmax, levels=args.levels, log=args.log, size=size)
    for name, fig in made.items():
        path = out_dir / f"{name}.{args.format}"
        fig.savefig(path, dpi=args.dpi)
        print(f"wrote {path}")
    return 0
