"""``lsurf plot``: contours, heat map, 3-D surface of a 2-D file; loss and accuracy curves of a 1-D
one; several files side by side on one scale (``--diff``: their differences); ``--html``: a
self-contained interactive page."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsurf.cli import common
from lsurf.engine.formats.progress import job_state
from lsurf.engine.formats.surface_file import read_surface
from lsurf.engine.geometry.levels import DEFAULT_LEVELS
from lsurf.engine.io import atomic_write
from lsurf.post.compare import DIFFS, plot_comparison
from lsurf.post.html import write_html
from lsurf.post.plot import KINDS, figures, parse_size, read_curve_projection, read_projection

HELP = "plot a surface file: contours, heat map, 3-D surface, 1-D curves"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="surface files (lsurf's or Li et al.'s); several: side by side on shared levels and colours")
    p.add_argument("--quantity", default="train_loss", help="train_loss, test_acc, ..., hessian_ratio")
    common.add_slice(p)
    p.add_argument("--kind", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--vmin", type=float)
    p.add_argument("--vmax", type=float, help="upper colour limit (default: robust, see lsurf.post.plot)")
    p.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="contour levels")
    p.add_argument("--log", action="store_true", help="logarithmic colour scale / height")
    p.add_argument("--format", default="png", choices=["png", "pdf", "svg"])
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--size", default="6x5", help="figure size in inches, WxH")
    p.add_argument("--out-dir", help="where to write (default: next to FILE)")
    p.add_argument("--trajectory", help="projection file of lsurf trajectory: draw the path")
    p.add_argument("--dots", action="store_true", help="a coarse-to-fine surface: mark the computed points")
    p.add_argument("--curve", help="curve file of lsurf curve train: draw it on its plane (--curve-plane)")
    p.add_argument("--diff", choices=DIFFS, help="with several files: each minus (or over) the first")
    p.add_argument("--fill", action="store_true", help="a file not done yet (a running job's): its points not done "
                   "interpolated from the done points around them, not blank")
    p.add_argument("--html", action="store_true", help="also an interactive page (FILE.html; needs plotly)")
    p.add_argument("--quantities", help="with --html: comma-separated quantities to offer (default: all)")


def run(args: argparse.Namespace) -> int:
    read = [read_surface(f) for f in args.files]
    read = [s.slice(args.slice) for s in read] if args.slice else read
    size = parse_size(args.size)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.files[0]).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in read:
        print(f"coverage: {int(s.done.sum())}/{s.done.size} points ({s.path})")
        print(f"state: {job_state(s).line()}")
        for line in s.accounting():
            print(" ".join(line.split()))
    surfaces = [s.view(fill=True).surface if args.fill else s for s in read]  # drawn whole, as filled
    kinds = tuple(k.strip() for k in args.kind.split(",") if k.strip())
    style = {"vmin": args.vmin, "vmax": args.vmax, "levels": args.levels, "log": args.log, "size": size}
    stem = Path(args.files[0]).stem if len(surfaces) == 1 else "compare"
    if len(surfaces) > 1 or args.diff:
        made = {f"compare_{args.quantity}" + (f"_{args.diff}" if args.diff else ""):
                plot_comparison(surfaces, args.quantity, kind=kinds[0] if len(kinds) == 1 else "filled",
                                diff=args.diff, **style)}
    else:
        projection = read_projection(args.trajectory) if args.trajectory else None
        curve = read_curve_projection(args.curve, surfaces[0]) if args.curve else None
        made = figures(surfaces[0], args.quantity, kinds, stem=stem, projection=projection, curve=curve, dots=args.dots,
                       **style)
    if args.html:
        wanted = [q.strip() for q in args.quantities.split(",")] if args.quantities else None
        print(f"wrote {write_html(surfaces, out_dir / f'{stem}.html', wanted)}")
    for name, fig in made.items():
        path = out_dir / f"{name}.{args.format}"
        with atomic_write(path) as tmp:  # never half an image where a viewer or a rerun looks
            fig.savefig(tmp, dpi=args.dpi, format=args.format)
        print(f"wrote {path}")
    return 0
