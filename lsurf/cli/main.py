"""Command line: a thin layer over the public API (``python -m lsurf`` is the same program).

Bad input ends with one line ``lsurf: error: ...`` and exit status 2 (``--debug`` shows the
traceback); under MPI every rank agrees on such an error before exiting, and any other failure
aborts the whole job.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lsurf._version import __version__
from lsurf.cli.config import merge
from lsurf.engine.data import load_data
from lsurf.engine.directions import (
    DIR_TYPES,
    IGNORES,
    NORMS,
    load_directions,
    model_directions,
    random_directions,
    save_directions,
    target_tensors,
)
from lsurf.engine.grid import Grid, parse_tile
from lsurf.engine.models import file_sha256, load_checkpoint, load_model
from lsurf.errors import UserError
from lsurf.run.parallel import current_world, install_abort_hook, world

_PLUGGED_COMMANDS = [
    ("plot", "lsurf.post.plot", "plot a surface file: contours, heat map, 3-D surface, 1-D curves"),
    ("vtk", "lsurf.post.vtkfile", "write a VTK XML file of a surface for ParaView"),
    ("trajectory", "lsurf.engine.trajectory", "PCA directions of a training trajectory and its projection"),
    ("hessian", "lsurf.engine.hessian", "top Hessian eigenvalues, trace and eigenvalue density at the checkpoint"),
]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (``--help`` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"lsurf: error: {message} (see {self.prog} --help)\n")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--x -1:1:11`` -> ``--x=-1:1:11``: argparse would take a value starting with '-' for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _add_model_data(p: argparse.ArgumentParser, data_default: str | None = "digits") -> None:
    p.add_argument("--config", help="TOML job file; flags given here override its values")
    p.add_argument("--model", default="cnn", help="zoo name (mlp, cnn, resnet20, ...) or pkg.module:factory")
    p.add_argument("--checkpoint", help="weights to centre on: a state dict or {'state_dict': ...}")
    p.add_argument("--data", default=data_default,
                   help="digits | cifar10:PATH | synthetic[:shape=3x32x32,n=1000,...] | pkg.module:factory")
    p.add_argument("--subset", type=int, help="use a fixed seeded subset of N samples per split")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")


def _add_direction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--norm", default="filter", choices=NORMS)
    p.add_argument("--ignore", default="biasbn", choices=IGNORES, help="biasbn: zero biases and BN parameters")
    p.add_argument("--dir-type", default="weights", choices=DIR_TYPES)
    p.add_argument("--same-dir", action="store_true", help="y direction = x direction")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lsurf", description="Loss-surface sampling of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lsurf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("surface", help="sample loss and accuracy on a 1-D or 2-D grid (MPI-aware)")
    _add_model_data(p)
    _add_direction_options(p)
    p.add_argument("--dir-file", help="reuse the directions in this file (ours or Li et al.'s)")
    p.add_argument("--model2", help="x direction = model2 - checkpoint (alpha=1 is model 2): interpolation")
    p.add_argument("--model3", help="with --model2: y direction = model3 - checkpoint, the plane of 3 models")
    p.add_argument("--x", default="-1:1:51", help="MIN:MAX:NUM of alpha (numpy.linspace)")
    p.add_argument("--y", help="MIN:MAX:NUM of beta; absent -> a 1-D curve")
    p.add_argument("--split", default="train", help="comma-separated splits: train,test")
    p.add_argument("--loss", default="cross_entropy", help="cross_entropy | mse | pkg.module:fn (per-sample)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--batch-size", type=int, help="samples per forward (default: 128 on CPU, 1024 on GPU)")
    p.add_argument("--points-per-pass", type=int,
                   help="grid points per vmap-ed forward (1 = per point; default: calibrated at start)")
    p.add_argument("--amp", choices=["bf16"], help="bfloat16 autocast of forwards (faster on GPUs; values "
                   "change at the 1e-2 level, and the file records it)")
    p.add_argument("--layout", default="auto", choices=["auto", "contiguous", "channels-last"],
                   help="memory layout of 4-D inputs (auto: the faster of the two, measured at start)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores per rank on the node)")
    p.add_argument("--bn", default="eval", choices=["eval", "recalibrate"])
    p.add_argument("--hessian", action="store_true", help="also λ_max, λ_min of the Hessian at every point")
    p.add_argument("--hessian-iters", type=int, default=30, help="Lanczos steps per point for --hessian")
    p.add_argument("--tile", help="ROWSxCOLS of grid points per tile (default: about 4 tiles per rank)")
    p.add_argument("--schedule", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--writer", default="auto", choices=["auto", "mpio", "root"],
                   help="mpio: every rank writes via parallel HDF5; root: tiles are sent to rank 0")
    p.add_argument("--out", default="surface.h5", help="the surface file (resumed if it matches)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output made differently")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_surface)

    p = sub.add_parser("directions", help="write a direction file")
    _add_model_data(p, data_default=None)
    _add_direction_options(p)
    p.add_argument("--one", action="store_true", help="only an x direction (for 1-D curves)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_directions)

    p = sub.add_parser("train", help="train a small model with SGD, saving a checkpoint per epoch")
    _add_model_data(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_train)

    # Commands whose options live with their code: each module has add_arguments(p) and run(args).
    for name, module, text in _PLUGGED_COMMANDS:
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=text)
        mod.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
        p.set_defaults(func=mod.run)

    p = sub.add_parser("info", help="provenance and coverage of a surface file")
    p.add_argument("file")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def _splits(spec: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def _model_and_data(args, splits: tuple[str, ...]):
    data = load_data(args.data, splits, args.subset) if args.data else None
    first = next(iter(data.values())) if data else None
    model = load_model(args.model, tuple(first.x.shape[1:]) if first else None,
                       first.num_outputs if first else None, args.checkpoint,
                       DTYPES.get(getattr(args, "dtype", "float32"), torch.float32))
    return model, data


def _directions_for(args, model, want_y: bool):
    if getattr(args, "model2", None):
        return _model_directions(args, model, want_y)
    if getattr(args, "dir_file", None):
        dir_type = args.dir_type
        names, targets = target_tensors(model, dir_type)
        dirs = load_directions(args.dir_file, names, targets, want_y)
        dirs.meta.setdefault("dir_type", dir_type)
        return dirs
    return random_directions(model, seed=args.seed, norm=args.norm, ignore=args.ignore,
                             dir_type=args.dir_type, two=want_y, same_dir=args.same_dir)


def _model_directions(args, model, want_y: bool):
    """Directions towards --model2 (and --model3) from --checkpoint, checked to be the same architecture."""
    others = [args.model2] + ([args.model3] if args.model3 else [])
    if want_y != bool(args.model3):
        raise UserError("a plane through models needs both --model3 and --y; a line needs --model2 alone")
    if args.dir_file:
        raise UserError("--dir-file and --model2 both set the directions: give one")
    states = []
    for path in others:
        twin = copy.deepcopy(model)
        load_checkpoint(twin, path)
        states.append(twin.state_dict())
    return model_directions(model, states, args.dir_type, others)


def _markers(args) -> list[dict]:
    """Where the models of an interpolation or a plane lie, for plots."""
    if not getattr(args, "model2", None):
        return []
    marks = [{"label": "model 1", "x": 0.0, "y": 0.0}, {"label": "model 2", "x": 1.0, "y": 0.0}]
    return marks + ([{"label": "model 3", "x": 0.0, "y": 1.0}] if args.model3 else [])


def cmd_surface(args) -> int:
    w = world()
    install_abort_hook(w)
    say = print if w.is_root else (lambda *a, **k: None)

    def setup():
        grid = Grid.parse(args.x, args.y)
        if args.dtype not in DTYPES:  # a job file bypasses argparse's choices
            raise UserError(f"--dtype {args.dtype!r}: expected float32 or float64")
        model, data = _model_and_data(args, _splits(args.split))
        return grid, model, data, _directions_for(args, model, grid.ndim == 2), parse_tile(args.tile)

    grid, model, data, dirs, tile = w.agree(setup)
    out = Path(args.out)
    ckpt_sha = file_sha256(args.checkpoint) if args.checkpoint else ""
    from lsurf.run.sampler import sample_surface

    provenance = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "model": args.model, "data": args.data or "", "checkpoint": args.checkpoint or "",
        "checkpoint_sha256": ckpt_sha, "mpi_ranks": w.size, "markers": json.dumps(_markers(args)),
        "identity": {"model": args.model, "checkpoint_sha256": ckpt_sha, "splits": list(data),
                     "subset": args.subset},
    }
    if args.dir_file:
        provenance.update(dir_file=args.dir_file, dir_file_sha256=file_sha256(args.dir_file))
    save_dirs = None if args.dir_file else out.with_name(out.stem + ".directions.h5")
    t0 = time.time()
    surface = sample_surface(
        model, data, dirs, grid, out, loss=args.loss, dtype=DTYPES[args.dtype], device=args.device,
        threads=args.threads, batch_size=args.batch_size, points_per_pass=args.points_per_pass, bn=args.bn,
        amp=args.amp == "bf16", channels_last={"auto": None, "channels-last": True}.get(args.layout, False),
        hessian_iters=args.hessian_iters if args.hessian else 0,
        tile=tile, schedule=args.schedule,
        writer=args.writer, overwrite=args.overwrite, provenance=provenance, save_directions_to=save_dirs,
        progress=not args.no_progress,
        log=lambda m: print(f"lsurf: {m}", file=sys.stderr, flush=True),
    )
    if surface is not None:
        say(f"wrote {out} ({int(surface.done.sum())}/{surface.done.size} points done) in {time.time() - t0:.1f} s")
    return 0


def cmd_directions(args) -> int:
    model, _ = _model_and_data(args, ("train",))
    dirs = _directions_for(args, model, not args.one)
    prov = {"checkpoint": args.checkpoint or "", "model": args.model}
    if args.checkpoint:
        prov["checkpoint_sha256"] = file_sha256(args.checkpoint)
    if not Path(args.out).resolve().parent.is_dir():
        raise UserError(f"output folder {str(Path(args.out).parent)!r} does not exist")
    save_directions(dirs, args.out, prov)
    print(f"wrote {args.out}: {len(dirs.names)} tensors, {dirs.ndim} direction(s), sha256 {dirs.sha256()[:12]}")
    return 0


def cmd_train(args) -> int:
    from lsurf.engine.train import train

    torch.manual_seed(args.seed)
    model, data = _model_and_data(args, ("train", "test"))
    paths = train(model, data, args.out_dir, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  seed=args.seed, loss=args.loss)
    print(f"wrote {len(paths)} checkpoints to {args.out_dir} (last: {paths[-1]})")
    return 0


def cmd_info(args) -> int:
    from lsurf.engine.surface_file import read_surface

    s = read_surface(args.file)
    for line in describe(s):
        print(line)
    return 0


def describe(s) -> list[str]:
    """Human-readable provenance and coverage of a surface."""
    shape = f"{len(s.x)}" if s.y is None else f"{len(s.x)} x {len(s.y)}"
    ranges = f"x [{s.x.min():g}, {s.x.max():g}]" + ("" if s.y is None else f", y [{s.y.min():g}, {s.y.max():g}]")
    done = int(s.done.sum())
    lines = [
        f"{'file:':<20}{s.path}" + ("  (written by Li et al.'s loss-landscape)" if s.reference else ""),
        f"{'grid:':<20}{shape} points, {ranges}",
        f"{'coverage:':<20}{done}/{s.done.size} points done ({100 * done / s.done.size:.1f} %)",
    ]
    for name, v in sorted(s.values.items()):
        if name.endswith("_stderr"):
            continue
        ok = v[s.done]
        bad = int((~np.isfinite(ok)).sum())
        fin = ok[np.isfinite(ok)]
        rng = f"min {fin.min():.6g}, max {fin.max():.6g}" if fin.size else "no finite values"
        flag = f"  ({bad} points non-finite: overflow)" if bad else ""
        lines.append(f"{name + ':':<20}{rng}{flag}")
    for key in ("model", "data", "checkpoint", "checkpoint_sha256", "dir_file", "dir_file_sha256", "mpi_ranks",
                "created", "finished", "eval_seconds_total", "eval_seconds_per_point"):
        if key in s.attrs and s.attrs[key] != "":
            lines.append(f"{key + ':':<20}{s.attrs[key]}")
    for key in ("directions", "versions"):
        if key in s.attrs:
            lines.append(f"{key + ':':<20}{s.attrs[key]}")
    if "rank_points" in s.attrs:
        pts, secs = s.attrs["rank_points"], s.attrs["rank_seconds"]
        per_rank = (f"{r}: {p} pts {t:.1f} s" for r, (p, t) in enumerate(zip(pts, secs)))
        lines.append(f"{'ranks:':<20}" + ", ".join(per_rank))
    if "config" in s.attrs:
        lines.append(f"{'config:':<20}{json.dumps(json.loads(s.attrs['config']), sort_keys=True)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_negative_values(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    explicit = {a.dest for a in subparser._actions
                if any(arg == opt or arg.startswith(opt + "=") for arg in argv for opt in a.option_strings)}
    try:
        args = merge(subparser, args, explicit)
        return args.func(args)
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        w = current_world()
        collective = getattr(e, "collective", False)
        if w.is_root or not collective:
            where = f" (rank {w.rank})" if w.size > 1 and not collective else ""
            print(f"lsurf: error{where}: {e.as_flags()}", file=sys.stderr, flush=True)
        if w.size > 1 and not collective:
            w.abort(2)
        return 2
    except KeyboardInterrupt:
        print("lsurf: interrupted", file=sys.stderr)
        current_world().abort(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
