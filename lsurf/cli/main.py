"""``lsurf``: the command table and the one place where errors become exit codes.

Bad input ends with one line ``lsurf: error: ...`` and exit status 2 (``--debug`` shows the
traceback); under MPI rank 0 alone reports an error every rank agreed on, and any other failure
aborts the whole job (see lsurf.run.world.abort_on_failure).
"""

from __future__ import annotations

import os
import signal
import sys

from lsurf._version import __version__
from lsurf.cli import (
    common,
    curve,
    directions,
    export,
    hessian,
    info,
    plot,
    sharpness,
    surface,
    train,
    trajectory,
    vtk,
    watch,
)
from lsurf.errors import UserError

# name -> module with HELP, add_arguments(parser) and run(args) -> exit status
COMMANDS = {
    "surface": surface, "directions": directions, "train": train, "plot": plot, "vtk": vtk,
    "export": export, "trajectory": trajectory, "hessian": hessian, "info": info, "sharpness": sharpness,
    "curve": curve, "watch": watch,
}
FLAGS = {"hessian_iters": "--hessian-iters", "progress": "--no-progress"}


def build_parser() -> common.Parser:
    parser = common.Parser(prog="lsurf", description="Loss-surface sampling of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lsurf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=common.Parser)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(common.join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        if not e.collective or e.rank == 0:
            print(f"lsurf: error: {e.as_flags(FLAGS)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("lsurf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader of our output went away (``lsurf info f.h5 | head``): stop quietly, as a shell
    tool killed by SIGPIPE would (status 141), with stdout pointed at /dev/null so that Python's
    own flush at exit does not raise again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
