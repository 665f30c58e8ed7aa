"""What every command shares: the one-line-error parser, the option groups, and the merge of flags
over a ``--config`` job file into :class:`~lsurf.run.options.Options`.

Options that map onto ``Options`` have no argparse default (``SUPPRESS``): the parsed namespace
holds exactly the flags the user typed, those win over the job file, and the dataclass holds the
one set of defaults. argparse runs with ``allow_abbrev=False``, so ``--batch 64`` is refused rather
than silently taken for ``--batch-size``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from lsurf.engine.data.batches import Residency
from lsurf.engine.geometry.directions import DIR_TYPES, IGNORES, NORMS
from lsurf.run.options import (
    Amp,
    BatchNorm,
    DirectionSource,
    Dtype,
    FidelityCheck,
    Layout,
    Options,
    Schedule,
    Sharding,
    Writer,
    choices,
    field_names,
    read_job_file,
)

SUPPRESS = argparse.SUPPRESS
_NOT_OPTIONS = ("command", "func", "config", "debug")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (``--help`` still shows the usage)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lsurf: error: {message} (see {self.prog} --help)\n")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--x -1:1:11`` -> ``--x=-1:1:11``: argparse would take a value starting with '-' for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"^-[\d.]", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _default(name: str) -> str:
    value = next(f for f in dataclasses.fields(Options) if f.name == name).default
    return "" if value is None else f" (default {value})"


def add_common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", help="TOML job file; flags given here override its values")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=SUPPRESS, help="zoo name (mlp, cnn, resnet20, ...), pkg.module:factory, "
                   "hf:DIR (a causal LM saved by save_pretrained) or hf-seq-cls:DIR" + _default("model"))
    g.add_argument("--checkpoint", default=SUPPRESS, help="weights to centre on: a state dict or {'state_dict': ...}")


def add_data(p: argparse.ArgumentParser, split_help: str = "comma-separated splits: train,test") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=SUPPRESS,
                   help="digits | cifar10:PATH | synthetic[:shape=3x32x32,n=1000,...] | hdf5:FILE | npy:DIR | "
                   "tokens:DIR[:uint32] (train.bin, val.bin) | pkg.module:factory" + _default("data"))
    g.add_argument("--seq-len", type=int, default=SUPPRESS, help="tokens: window length T in tokens")
    g.add_argument("--subset", type=int, default=SUPPRESS, help="use a fixed seeded subset of N samples per split")
    g.add_argument("--split", default=SUPPRESS, help=split_help + _default("split"))
    g.add_argument("--loss", default=SUPPRESS, help="cross_entropy | mse | pkg.module:fn (per-sample)")
    g.add_argument("--ignore-index", type=int, default=SUPPRESS,
                   help="token targets equal to this are padding: not scored (default -100)")
    g.add_argument("--output", default=SUPPRESS,
                   help="entry of a dict-like model output to score (default: the tensor, or 'logits')")


def add_device(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default=SUPPRESS, help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--dtype", default=SUPPRESS, choices=choices(Dtype),
                   help="weights' dtype (default float32; bfloat16 weights are perturbed in float32)")
    g.add_argument("--threads", type=int, default=SUPPRESS,
                   help="torch threads per rank (default: cores per rank on the node)")
    g.add_argument("--batch-size", type=int, default=SUPPRESS,
                   help="samples per forward (default: 128 on CPU, 1024 on GPU, fewer for large outputs)")
    g.add_argument("--tf32", action="store_true", default=SUPPRESS,
                   help="let GPUs compute float32 matmuls and convolutions in TF32 (faster; values change at "
                   "the 1e-4 level; recorded). Default: IEEE float32, as on the CPU")


def add_data_feed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data larger than memory")
    g.add_argument("--resident", default=SUPPRESS, choices=choices(Residency),
                   help="hold each split on the device (always), stream it at every point (never), or hold it "
                   "when it fits the memory budget (auto, the default)")
    g.add_argument("--memory-budget", default=SUPPRESS,
                   help="bytes a rank may hold data in, e.g. 4G (default: half the device's free memory; "
                   "on the CPU half the available RAM shared by the node's ranks)")
    g.add_argument("--workers", type=int, default=SUPPRESS,
                   help="loader processes per rank when streaming a plug-in Dataset or a compressed HDF5 store "
                   "(default: 1 on CPU, 2 on GPU); host tensors, stores and token files are read in-process")


def add_directions(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("directions")
    g.add_argument("--directions", default=SUPPRESS, choices=choices(DirectionSource),
                   help="random (default), or Hessian eigenvectors at the checkpoint: max,max2 (the two sharpest), "
                   "max,min (the plane that shows a saddle), max or min for a curve")
    g.add_argument("--seed", type=int, default=SUPPRESS, help="seed of the random directions (default 0)")
    g.add_argument("--norm", default=SUPPRESS, choices=NORMS, help="(default filter)")
    g.add_argument("--ignore", default=SUPPRESS, choices=IGNORES, help="biasbn: zero biases and BN parameters")
    g.add_argument("--dir-type", default=SUPPRESS, choices=DIR_TYPES, help="(default weights)")
    g.add_argument("--same-dir", action="store_true", default=SUPPRESS, help="y direction = x direction")
    g.add_argument("--regenerate", action="store_true", default=SUPPRESS,
                   help="redraw the seeded directions tensor by tensor at every point: weights and θ* only "
                   "(2P memory, not 4P), for models that barely fit")
    g.add_argument("--dir-file", default=SUPPRESS, help="reuse the directions in this file (ours or Li et al.'s)")
    g.add_argument("--model2", default=SUPPRESS,
                   help="x direction = model2 - checkpoint (alpha=1 is model 2): interpolation")
    g.add_argument("--model3", default=SUPPRESS,
                   help="with --model2: y direction = model3 - checkpoint, the plane of 3 models")
    g.add_argument("--geometry", default=SUPPRESS, metavar="PKG.MODULE:FACTORY",
                   help="your own set of points instead of a plane: factory(params) -> an object with axes, "
                   "offset(index) and identity() (see README); its axes replace --x/--y")
    g.add_argument("--curve-plane", default=SUPPRESS, metavar="CURVE",
                   help="the plane of a curve of `lsurf curve train` through its model A, its bend and model "
                   "B: x = B - A, y = bend - A made orthogonal to x (model, checkpoint and data: the curve's "
                   "unless given)")


def add_evaluation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--points-per-pass", type=int, default=SUPPRESS,
                   help="grid points per vmap-ed forward (1 = per point; default: calibrated at start)")
    g.add_argument("--amp", default=SUPPRESS, choices=choices(Amp),
                   help="bf16: bfloat16 autocast of forwards (values change at the 1e-2 level; recorded)")
    g.add_argument("--layout", default=SUPPRESS, choices=choices(Layout),
                   help="memory layout of 4-D inputs (auto: the faster of the two, measured at start)")
    g.add_argument("--bn", default=SUPPRESS, choices=choices(BatchNorm), help="(default eval)")
    g.add_argument("--hessian", action="store_true", default=SUPPRESS,
                   help="also λ_max, λ_min of the Hessian at every point")
    g.add_argument("--metric", action="append", default=SUPPRESS, metavar="PKG.MODULE:FACTORY",
                   help="also your own additive metric, stored as SPLIT_NAME (repeatable; see README)")
    g.add_argument("--hessian-iters", type=int, default=SUPPRESS, help="Lanczos steps per point for --hessian (30)")
    g.add_argument("--fidelity", default=SUPPRESS, choices=choices(FidelityCheck),
                   help="the curvature each plane sees vs the Hessian's extremes at the centre "
                        "(auto: where it costs < 5 %% of the run)")


def add_fewer_passes(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fewer passes (off by default: every point, every sample)")
    g.add_argument("--budget", type=int, default=SUPPRESS,
                   help="coarse to fine: compute at most this many points of the grid, where the picture needs "
                        "them; plots interpolate the rest")
    g.add_argument("--refine-tol", type=float, default=SUPPRESS,
                   help="coarse to fine: refine until the expected interpolation error of the losses is below this")
    g.add_argument("--tolerance", type=float, default=SUPPRESS,
                   help="stop each point's pass once the standard error of its loss is below this")
    g.add_argument("--min-samples", type=int, default=SUPPRESS, help="samples before --tolerance may stop (256)")


def add_sharding(g: argparse._ArgumentGroup, point: str = "every grid point") -> None:
    """Rank groups and the model sharded over them (``surface``, ``hessian`` and ``sharpness``)."""
    g.add_argument("--ranks-per-point", type=int, default=SUPPRESS,
                   help=f"G ranks share {point}, each with 1/G of every split (G divides the ranks)")
    g.add_argument("--shard", default=SUPPRESS, choices=choices(Sharding),
                   help="fsdp: each rank of a group also holds 1/G of the model (PyTorch FSDP2), for models "
                        "larger than one device")


def add_run(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    """Distribution and output; ``out_help``: ``--out`` is required, said so (else it defaults to surface.h5)."""
    g = p.add_argument_group("distribution and output")
    add_sharding(g)
    g.add_argument("--tile", default=SUPPRESS,
                   help="ROWSxCOLS of grid points per tile, counted on the coarse-first lattice it lies in "
                        "(every 4th row and column first, then the gaps; default: about 4 tiles per rank)")
    g.add_argument("--schedule", default=SUPPRESS, choices=choices(Schedule), help="(default dynamic)")
    g.add_argument("--writer", default=SUPPRESS, choices=choices(Writer),
                   help="mpio: every rank writes via parallel HDF5; root: tiles are sent to rank 0")
    if out_help:
        g.add_argument("--out", required=True, help=out_help)
    else:
        g.add_argument("--out", default=SUPPRESS, help="the surface file (resumed if it matches; default surface.h5)")
    g.add_argument("--overwrite", action="store_true", default=SUPPRESS,
                   help="replace an existing output made differently")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=SUPPRESS)


def add_slice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice", metavar="AXIS=VALUE",
                   help="a grid of three axes (a geometry's): the plane at this value of its third axis")


def stderr_log(message: str) -> None:
    """A job's progress line, on standard error (its results go to standard output)."""
    print(f"lsurf: {message}", file=sys.stderr, flush=True)


def keyword_defaults(fn: Callable, names: tuple[str, ...]) -> dict[str, Any]:
    """The defaults of ``fn``'s parameters ``names``: a command takes the library's, never its own copy."""
    parameters = inspect.signature(fn).parameters
    return {name: parameters[name].default for name in names}


def merged_values(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The job file's values overridden by the flags the user typed, keys as field names. Keys
    that are neither an option nor one of this command's ``extra`` names are refused."""
    typed = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    table: dict[str, Any] = {}
    if getattr(args, "config", None):
        known = {f.name for f in dataclasses.fields(Options)} | set(extra) | {"hessian", "no_progress"}
        table = field_names(read_job_file(args.config), known, f"`config` {args.config!r}: unknown key")
        if "no_progress" in table:  # the flag's own name, as job files have always spelt it
            table["progress"] = not table.pop("no_progress")
    return {**table, **typed}


def options_from(values: dict[str, Any], **fixed: Any) -> Options:
    """:class:`Options` from merged values: ``hessian`` (a flag) turns ``hessian_iters`` on."""
    values = dict(values)
    if "hessian" in values:
        values["hessian_iters"] = values.pop("hessian_iters", 30) if values.pop("hessian") else 0
    elif "hessian_iters" in values:
        values.pop("hessian_iters")  # steps without --hessian: no curvature maps, as before
    return Options.from_mapping({**values, **fixed})
