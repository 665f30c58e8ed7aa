"""``lsurf curve``: mode connectivity. ``train`` fits a curve of low loss between two models (MPI
data-parallel, resumable); ``eval`` compares it with the straight line between them."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.geometry.curve import CURVE_TYPES
from lsurf.engine.training.curve import Training
from lsurf.errors import UserError
from lsurf.run.curve import CurveEval, CurveSpec, eval_curve_job, train_curve_job, with_curve_inputs
from lsurf.run.runtime import configure_job, start_job

HELP = "mode connectivity: train a low-loss curve between two models (train), compare it with the line (eval)"
SUPPRESS = argparse.SUPPRESS  # as for the options: a job file's value is not overridden by a default
_TRAIN = ("bends", "curve_type", "epochs", "lr", "weight_decay")
_POINTS = common.keyword_defaults(CurveEval, ("points",))["points"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="curve_command", required=True, parser_class=common.Parser)
    t = sub.add_parser("train", help="train the bends of a curve from --checkpoint (A) to --model2 (B)",
                       description="Train the bends of a curve from --checkpoint (A) to --model2 (B) on the "
                       "train split; the curve file is rewritten after every epoch and the same command "
                       "continues it.")
    _add_inputs(t)
    t.add_argument("--out", required=True, help="the curve file to write (continued if it was made the same way)")
    t.add_argument("--overwrite", action="store_true", default=SUPPRESS,
                   help="replace an existing output made differently")
    g = t.add_argument_group("curve")
    g.add_argument("--bends", type=int, default=SUPPRESS,
                   help=f"K bends: a Bezier of degree K+1, or a chain of K+1 segments (default {CurveSpec.bends})")
    g.add_argument("--curve-type", default=SUPPRESS, choices=CURVE_TYPES, help=f"(default {CurveSpec.curve_type})")
    g.add_argument("--epochs", type=int, default=SUPPRESS, help=f"(default {Training.epochs})")
    g.add_argument("--lr", type=float, default=SUPPRESS,
                   help=f"first learning rate, cosine to 0 (default {Training.lr})")
    g.add_argument("--weight-decay", type=float, default=SUPPRESS,
                   help=f"on the bends (default {Training.weight_decay})")
    g.add_argument("--seed", type=int, default=SUPPRESS, help="seed of the batches and of t (default 0)")
    e = sub.add_parser("eval", help="loss and accuracy along a curve and along the straight line",
                       description="Loss and accuracy on train and test at --points values of t along the curve "
                       "and the straight line, into a 1-D surface file; prints both barriers. The models and "
                       "data are the curve's (as `curve train` recorded them) unless given.")
    e.add_argument("curve_file", metavar="CURVE", help="a file of `lsurf curve train`")
    _add_inputs(e)
    e.add_argument("--points", type=int, default=SUPPRESS, help=f"values of t in [0, 1] (default {_POINTS})")
    common.add_data_feed(e)
    g = e.add_argument_group("evaluation")
    g.add_argument("--points-per-pass", type=int, default=SUPPRESS,
                   help="values of t per vmap-ed forward (1 = per point; default: calibrated at start)")
    g.add_argument("--metric", action="append", default=SUPPRESS, metavar="PKG.MODULE:FACTORY",
                   help="also your own additive metric, along the curve and the line (repeatable; see README)")
    common.add_run(e, out_help="the 1-D surface file to write (axis t; resumed if it was made the same way)")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    p.add_argument("--model2", default=SUPPRESS, help="model B: the other end of the curve")
    common.add_data(p)
    common.add_device(p)


def run(args: argparse.Namespace) -> int:
    command = vars(args).pop("curve_command")
    w = start_job()
    log = common.stderr_log if w.is_root else None
    if command == "train":
        values = w.agree(lambda: common.merged_values(args, extra=_TRAIN))
        extra = {k: values.pop(k) for k in _TRAIN if k in values}
        shape = {k: extra.pop(k) for k in ("bends", "curve_type") if k in extra}
        options = w.agree(lambda: common.options_from(_train_split(values), split=("train",)))
        spec = w.agree(lambda: CurveSpec(**shape, training=Training(
            **extra, batch_size=options.batch_size or Training.batch_size, seed=options.seed)))
        configure_job(w, options.device, options.threads, options.tf32)
        stored = train_curve_job(options, spec, w.comm, log)
        if stored is not None:
            done = stored.progress
            print(f"wrote {options.out}: {len(stored.bends)}-bend {stored.kind}, {_epochs(done.epochs_done)}, "
                  f"last train loss {done.train_loss[-1]:.4f}")
        return 0
    values = w.agree(lambda: common.merged_values(args, extra=("curve_file", "points")))
    spec = w.agree(lambda: CurveEval(values.pop("curve_file"), values.pop("points", _POINTS)))
    values = w.agree(lambda: with_curve_inputs(spec.curve, values))  # the curve's models and data unless told so
    options = w.agree(lambda: common.options_from({"split": ("train", "test"), **values}))
    configure_job(w, options.device, options.threads, options.tf32)
    surface = eval_curve_job(options, spec, w.comm, log)
    if surface is not None:
        line, curve = float(surface.attrs["barrier_line"]), float(surface.attrs["barrier_curve"])
        print(f"barrier ({surface.attrs['barrier_split']} loss): line {line:.4g}, curve {curve:.4g}"
              + (f", curve/line {curve / line:.3g}" if line > 0 else ""))
        print(f"wrote {options.out} ({spec.points} points)")
    return 0


def _train_split(values: dict) -> dict:
    """The values of ``curve train``, which learns on the train split: another split is refused, not ignored."""
    split = values.get("split") or ("train",)
    names = tuple(s.strip() for s in split.split(",")) if isinstance(split, str) else tuple(split)
    if names != ("train",):
        raise UserError(f"`split` {split!r}: a curve is trained on the train split (`lsurf curve eval` takes "
                        "`split`)")
    return values


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"
