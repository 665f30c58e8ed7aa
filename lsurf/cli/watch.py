"""``lsurf watch``: draw a surface file again and again while its job fills it in (lsurf.post.watch)."""

from __future__ import annotations

import argparse
import signal
import time

from lsurf.cli import common
from lsurf.engine.formats.progress import UNFINISHED
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


class CtrlC:
    """Ctrl-C that ends the watch between looks (post.watch.Stop) and takes no lock: the handler
    only sets a flag, and interrupts the sleep between looks, never an HDF5 read or a page being
    written. (A threading.Event set from the handler can deadlock: the signal may land while the
    main thread holds the Event's lock inside its wait.)"""

    def __init__(self) -> None:
        self.asked = self.sleeping = False

    def handler(self, _number: int, _frame: object) -> None:
        self.asked = True
        if self.sleeping:
            raise KeyboardInterrupt  # out of time.sleep; lsurf.post.watch ends on it

    def is_set(self) -> bool:
        return self.asked

    def wait(self, timeout: float) -> None:
        self.sleeping = True
        try:
            if not self.asked:  # asked just before sleeping was set: no sleep
                time.sleep(timeout)
        finally:
            self.sleeping = False


def run(args: argparse.Namespace) -> int:
    stop = CtrlC()
    previous = signal.signal(signal.SIGINT, stop.handler)
    try:
        state = watch(args.file, quantity=args.quantity, plane=args.plane, interval=args.interval, once=args.once,
                      html=args.html, colour=args.colour, fill=args.fill, stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.html and state is not None:
        print(f"wrote {args.html}")
    return 1 if state is not None and state.state == UNFINISHED else 0
