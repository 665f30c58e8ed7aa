"""``lsurf watch``: draw a surface file again and again while its job fills it in (lsurf.post.watch)."""

from __future__ import annotations

import argparse
import signal
import threading

from lsurf.cli import common
from lsurf.engine.progress import UNFINISHED
from lsurf.post.watch import watch

HELP = ("draw a running job's surface file until the job ends: a text heat map with coverage, points/s and ETA "
        "(exit 1 if the job ended unfinished)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p, config=False)
    p.add_argument("file", help="the job's surface file (it may not exist yet: watch waits for it)")
    p.add_argument("--quantity", help="what to draw (default: the file's first loss)")
    p.add_argument("--plane", type=int, help="an ensemble's plane to draw (default 0)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks (default 2)")
    p.add_argument("--once", action="store_true", help="draw once and exit")
    p.add_argument("--html", metavar="PAGE", help="also keep this page (that of plot --html) up to date; "
                   "it reloads itself while the job runs")
    p.add_argument("--fill", action="store_true", help="draw points not done yet interpolated from the done "
                   "points around them (with the coarse-first order a whole picture early)")
    p.add_argument("--no-color", dest="colour", action="store_false", default=None,
                   help="characters instead of ANSI colours (default: colours in a terminal)")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C ends the watch between looks
    try:
        state = watch(args.file, quantity=args.quantity, plane=args.plane, interval=args.interval, once=args.once,
                      html=args.html, colour=args.colour, fill=args.fill, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.html and state is not None:
        print(f"wrote {args.html}")
    return 1 if state is not None and state.state == UNFINISHED else 0
