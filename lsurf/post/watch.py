"""``lsurf watch``: a surface drawn again and again while its job fills it in, until the job ends.

A long job's file holds every finished point from the start (lsurf.engine.formats.surface_file), so the
picture can be looked at while it grows: in a terminal as a coloured text heat map (two grid rows
per line with half blocks in ANSI 256 colours; characters where the output is no terminal), and
optionally as the offline page of ``lsurf plot --html`` that reloads itself. The watcher only
reads: no lock, no write to the file, so the job neither waits for it nor sees it
(surface_file.read_surface); its state, rate and ETA come from lsurf.engine.formats.progress.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np

from lsurf.engine.evaluation.quantities import is_error
from lsurf.engine.formats.progress import JobState, RateMeter, job_state
from lsurf.engine.formats.surface_file import Surface, View, read_surface
from lsurf.engine.geometry.levels import color_range, is_geometric
from lsurf.errors import UserError
from lsurf.post.html import write_html
from lsurf.post.plot import values_of


def _ramp(steps: int = 16) -> list[int]:
    """xterm-256 colours along viridis (dark blue, teal, green, yellow): low values dark."""
    anchors = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]) / 255
    at = np.linspace(0, len(anchors) - 1, steps)
    rgb = np.array([np.interp(at, np.arange(len(anchors)), anchors[:, c]) for c in range(3)]).T
    cube = np.rint(rgb * 5).astype(int)
    return [16 + 36 * r + 6 * g + b for r, g, b in cube]


class Stop(Protocol):
    """What ends a watch between looks: a threading.Event set by another thread, or the CLI's
    Ctrl-C (lsurf.cli.watch), which must not be an Event: Event.set from a signal handler
    deadlocks when the signal lands while the main thread holds the Event's own lock in wait."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> object: ...


COLOURS = _ramp()
CHARACTERS = ".:-=+*#%@"  # without colour, low to high; a blank is a point not done
_RESET = "\x1b[0m"


def first_loss(surface: Surface) -> str:
    """The quantity drawn by default: the first loss of the file (else its first quantity)."""
    names = [n for n in surface.values if not is_error(n)]
    return next((n for n in names if n.endswith("_loss")), names[0])


def shrink(z: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``z`` averaged over blocks to at most ``rows`` x ``cols`` cells (the mean of each block's
    finite values; NaN where it has none), so a big grid fits the terminal without dropping points."""
    ok = np.isfinite(z)
    total, count = np.where(ok, z, 0.0), ok.astype(np.float64)
    for axis, size in ((0, rows), (1, cols)):
        if z.shape[axis] > size:
            edges = np.linspace(0, z.shape[axis], size + 1).astype(int)[:-1]
            total, count = np.add.reduceat(total, edges, axis=axis), np.add.reduceat(count, edges, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def levels(z: np.ndarray, lo: float, hi: float, geometric: bool, n: int) -> np.ndarray:
    """Each cell's colour step 0..n-1 between ``lo`` and ``hi`` (-1: nothing to draw)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.clip(z, lo, hi)
        t = np.log(c / lo) / np.log(hi / lo) if geometric else (c - lo) / (hi - lo)
    return np.where(np.isfinite(z), np.rint(np.nan_to_num(t) * (n - 1)), -1).astype(int)


def heat_map(steps: np.ndarray, colour: bool) -> list[str]:
    """Lines of text for a grid of colour steps (top row first): in colour two rows a line (upper
    half block over lower), otherwise one character a cell."""
    if not colour:
        return ["".join(" " if s < 0 else CHARACTERS[s] for s in row) for row in steps]
    if len(steps) % 2:
        steps = np.vstack([steps, np.full(steps.shape[1], -1)])
    lines = []
    for top, bottom in zip(steps[::2], steps[1::2]):
        cells = []
        for a, b in zip(top, bottom):
            if a < 0 and b < 0:
                cells.append(" ")
            elif a < 0:
                cells.append(f"\x1b[38;5;{COLOURS[b]}m▄{_RESET}")
            elif b < 0:
                cells.append(f"\x1b[38;5;{COLOURS[a]}m▀{_RESET}")
            else:
                cells.append(f"\x1b[38;5;{COLOURS[a]};48;5;{COLOURS[b]}m▀{_RESET}")
        lines.append("".join(cells))
    return lines


def frame(surface: Surface, state: JobState, name: str, colour: bool, size: tuple[int, int], where: str = "") -> str:
    """One screenful: what is drawn, the job's state, the map, its colour scale and axes. ``surface``
    is the plane drawn (``where``: which, of an ensemble); ``size`` the terminal's (columns, lines)."""
    view = surface.view()
    z = values_of(view, name).reshape(-1, len(view.x))[::-1]  # β grows upwards; a curve is one row
    n = len(COLOURS) if colour else len(CHARACTERS)
    cols, lines = max(size[0] - 1, 8), max(size[1] - 6, 2) * (2 if colour else 1)
    head = [f"{surface.path}: {name}{where}", state.line()]
    try:
        lo, hi = color_range(z, None, None, False)
    except UserError:
        return "\n".join([*head, "(no point done yet)"])
    geometric = is_geometric(name, lo)
    cells = shrink(np.clip(z, lo, hi), lines, cols)  # clipped first: an overflow counts as the top colour
    scale = "".join(heat_map(np.arange(n)[None, :], colour)) if colour else CHARACTERS
    axes = ", ".join(f"{symbol} {a.coords[0]:g} … {a.coords[-1]:g} {way}" for symbol, a, way
                     in zip(("α", "β"), view.plane_axes, ("left to right", "bottom to top")))
    return "\n".join([*head, *heat_map(levels(cells, lo, hi, geometric, n), colour),
                      f"{lo:.4g} {scale} {hi:.4g}{' (log scale)' if geometric else ''}{_blanks(view)}", axes])


def _blanks(view: View) -> str:
    """What the map's gaps are: points not done, or (``fill``) not reached by the interpolation."""
    if view.computed is not None and not view.computed.all():
        return "; between computed points interpolated" + ("" if view.done.all() else ", blank: not reached yet")
    return "" if view.done.all() else "; blank: not done yet"


def watch(path: str | Path, *, quantity: str | None = None, plane: int | None = None, interval: float = 2.0,
          once: bool = False, html: str | Path | None = None, colour: bool | None = None, fill: bool = False,
          out: TextIO = sys.stdout, stop: Stop | None = None) -> JobState | None:
    """Draw ``path`` every ``interval`` seconds until its job ends (``once``: one drawing now), and
    keep the page ``html`` up to date; returns the last state (None if interrupted before the file
    appeared). ``colour``: ANSI colours (default: when ``out`` is a terminal and NO_COLOR unset);
    ``fill``: points not done drawn interpolated from done ones (Surface.view). Ctrl-C ends
    the watch, not the job; so does ``stop`` once set (the CLI's, from SIGINT, so the signal never
    lands inside an HDF5 call, after which h5py's lock can hang the interpreter's exit)."""
    stop = stop or threading.Event()
    if interval <= 0:
        raise UserError(f"`interval` {interval:g}: must be more than 0 seconds")
    terminal = out.isatty()
    colour = terminal and "NO_COLOR" not in os.environ if colour is None else colour
    state = None
    try:
        _await(Path(path), interval, once, out, stop)
        meter, shown = RateMeter(), None
        while not stop.is_set():
            surface = read_surface(path)
            now = time.time()
            state = job_state(surface, now=now)
            state = state.measured(meter.observe(now, state.done))
            drawn = _plane(surface, plane).view(fill=fill).surface
            name = quantity or first_loss(drawn)
            if html is not None and (state.done, state.state) != shown:  # the page first: a frame drawn is on it
                write_html([drawn], html, refresh=interval if state.running else None)
            if terminal or (state.done, state.state) != shown:  # a log gets a frame when something changed
                where = "" if surface.planes is None else f", plane {plane or 0} of {surface.planes}"
                text = frame(drawn, state, name, colour, shutil.get_terminal_size((100, 40)), where)
                out.write(("\x1b[H\x1b[J" if terminal else "") + text + "\n")
                out.flush()
            shown = (state.done, state.state)
            if once or not state.running:
                return state
            stop.wait(interval)
    except KeyboardInterrupt:
        pass
    out.write("\n")
    return state


def _plane(surface: Surface, plane: int | None) -> Surface:
    """The plane drawn: an ensemble's ``plane`` (default 0); ``plane`` of a single plane is refused."""
    if surface.planes is None:
        if plane not in (None, 0):
            raise UserError(f"`plane` {plane}: {surface.path!r} holds one plane")
        return surface
    return surface.plane(plane or 0)


def _await(path: Path, interval: float, once: bool, out: TextIO, stop: Stop) -> None:
    """Wait, saying so, until the job has made the file (it appears whole: surface_file.create)."""
    if path.exists():
        return
    if once:
        raise UserError(f"`file` {str(path)!r} does not exist (yet)")
    out.write(f"waiting for {path} to appear (Ctrl-C to stop)\n")
    out.flush()
    while not path.exists() and not stop.is_set():
        stop.wait(interval)
