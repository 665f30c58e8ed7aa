"""``lsurf trajectory``: PCA directions of a training trajectory and its projection."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsurf.cli import common
from lsurf.engine.data.splits import load_data
from lsurf.engine.geometry.directions import DIR_TYPES, IGNORES
from lsurf.engine.geometry.trajectory import checkpoint_paths, covering_grid, save_trajectory, trajectory_directions

HELP = "PCA directions of a training trajectory and its projection"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("checkpoints", nargs="+", help="checkpoint files in training order, or one folder")
    p.add_argument("--pattern", default="model_*.t7", help="with a folder: which files (natural order)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--data", help="only to size zoo models that need it (mlp, linear)")
    p.add_argument("--checkpoint", help="the centre θ_final (default: the last checkpoint)")
    p.add_argument("--dir-type", default="weights", choices=DIR_TYPES)
    p.add_argument("--ignore", default="biasbn", choices=IGNORES)
    p.add_argument("--dir-out", default="pca_directions.h5", help="direction file for lsurf surface --dir-file")
    p.add_argument("--proj-out", default="pca_projection.h5", help="projection file for lsurf plot --trajectory")


def run(args: argparse.Namespace) -> int:
    paths = checkpoint_paths(args.checkpoints, args.pattern)
    shape = None
    if args.data:
        split = load_data(args.data, ("train",))["train"]
        shape = (split.sample_shape, split.num_outputs)
    centre = Path(args.checkpoint) if args.checkpoint else None
    dirs, proj, centre = trajectory_directions(args.model, paths, centre, shape, args.dir_type, args.ignore)
    save_trajectory(dirs, proj, centre, args.dir_out, args.proj_out)
    ev = proj.explained_variance
    print(f"{len(paths)} checkpoints; explained variance PC1 {100 * ev[0]:.1f} %, PC2 {100 * ev[1]:.1f} %; "
          f"largest distance off the plane {proj.distance.max():.4g}")
    print(f"wrote {args.dir_out} (directions, centre {centre}) and {args.proj_out} (projection)")
    print(f"next: lsurf surface --model {args.model} --checkpoint {centre} --dir-file {args.dir_out} "
          f"{covering_grid(proj)} ...; lsurf plot SURFACE --trajectory {args.proj_out}")
    return 0
