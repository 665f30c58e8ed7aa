"""The surface file: one HDF5 file per surface, shared by all ranks, and the reader for ours and
Li et al.'s.

Layout (2-D; a 1-D file drops ``y``): root datasets ``x``/``y`` (HDF5 dimension scales, so
xarray shows named coordinates), ``xcoordinates``/``ycoordinates`` (the reference's names),
``{split}_{loss,acc,loss_stderr,acc_stderr}`` of shape (ny, nx) with value ``[j, i]`` at
``(x[i], y[j])``, NaN until computed, ``done`` (uint8) and ``finished_at`` (float64: the Unix time
its tile was written, NaN until then; files before it lack it). Attributes hold the provenance.
An ensemble of K planes adds a leading axis, (K, ny, nx), with its own scale ``plane`` (0..K-1).

Crash safety: the file is created complete (every dataset allocated and filled with NaN) under a
temporary name, closed and renamed into place. During a run only raw values are written into
that fixed storage, so a killed process leaves a valid file whose ``done`` mask says what is
finished: an interrupt (SIGINT, SIGTERM) waits until the tile being written is whole, and only a
SIGKILL mid-tile can leave values without ``done`` (they are computed again on resume).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from lsurf.engine.curvature import fidelity
from lsurf.engine.geometry.grid import Grid, Tile
from lsurf.engine.geometry.refine import fill as _fill
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError

FORMAT = "lsurf-surface-1"
FINISHED_AT = "finished_at"


def open_h5(path: str | Path, mode: str = "r", **kw) -> h5py.File:
    """``h5py.File`` with a :class:`UserError` naming the file when it is not readable HDF5."""
    try:
        return h5py.File(path, mode, **kw)
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist") from None
    except OSError as e:
        reason = "it is in use by another process" if "lock" in str(e).lower() else "not a readable HDF5 file"
        raise UserError(f"{str(path)!r}: {reason} ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def exclusive_lock(path: str | Path):
    """Hold ``PATH.lock`` (flock) for a whole run so a second job on the same file is refused.

    The kernel drops an flock when its process dies, even by SIGKILL, so no stale lock survives.
    """
    lock_path = f"{path}.lock"
    if not Path(path).parent.is_dir():
        raise UserError(f"output folder {str(Path(path).parent)!r} does not exist")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write next to {str(path)!r}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # the lock file is the running job's: it stays (readers tell a running job by it)
        raise UserError(f"{str(path)!r} is in use by another lsurf job (lock {lock_path} is held)") from None
    except OSError:
        pass  # file systems without flock: carry on unprotected
    try:
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)


def _identity_mismatch(f: h5py.File, grid: Grid, identity: dict, optional: Collection[str] = ()) -> str | None:
    """Why an existing file cannot be resumed by this run, or None if it can. Keys in ``optional``
    that the file lacks were not recorded when it was written: they are not compared. A setting
    recorded only when used (``tolerance``, ``metrics``, ``geometry``) and absent from this run is
    off here: a file that has it on is a mismatch (one with it off, e.g. an older file's retired
    ``tf32: false``, is not)."""
    if f.attrs.get("format") != FORMAT:
        return "it was not written by lsurf"
    old_grid = _grid(f)
    if describe_grid(old_grid) != describe_grid(grid) or not np.array_equal(old_grid.x, grid.x) or (
        grid.y is not None and (old_grid.y is None or not np.array_equal(old_grid.y, grid.y))
    ) or (grid.z is not None and not np.array_equal(f["plane"][()], grid.z)):
        return f"it has another grid ({describe_grid(old_grid)}; this run: {describe_grid(grid)})"
    old = json.loads(f.attrs["identity"])
    for key in {**old, **identity}:
        if (key in optional and key not in old) or (key not in identity and not old[key]):
            continue
        value = identity.get(key)
        if old.get(key) != value:
            return f"it was made with another {key.replace('_', ' ')} ({old.get(key)!r}, now {value!r})"
    return None


def describe_grid(grid: Grid) -> str:
    """``x -1:1:51, y -1:1:51`` (``, 8 planes``) — the grid in the syntax of the options."""
    def axis(name: str, v: np.ndarray) -> str:
        return f"{name} {v[0]:g}:{v[-1]:g}:{len(v)}"

    return (axis("x", grid.x) + ("" if grid.y is None else ", " + axis("y", grid.y))
            + ("" if grid.planes is None else f", {grid.planes} planes"))


def _grid(f: h5py.File) -> Grid:
    return Grid(f["x"][()], f["y"][()] if "y" in f else None, len(f["plane"]) if "plane" in f else None)


def accept(path: str | Path, grid: Grid, identity: dict, overwrite: bool, optional: Collection[str] = ()) -> bool:
    """May this run write ``path``? True if it resumes an existing matching file, False if it
    must create one; an existing file made differently is refused (and never touched) unless
    ``overwrite``. ``optional``: identity keys older files may lack."""
    path = Path(path)
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"output folder {str(path.parent)!r} is not writable")
    if not path.exists() or overwrite:
        return False
    with open_h5(path, "r") as f:
        why = _identity_mismatch(f, grid, identity, optional)
    if why is not None:
        raise UserError(f"{str(path)!r} exists but {why}: use `overwrite` to replace it")
    return True


def create(path: str | Path, grid: Grid, quantities: list[str], identity: dict, attrs: dict) -> None:
    """A fresh file with every dataset allocated, replacing ``path`` atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        _create(tmp, grid, quantities, identity, attrs)


def _create(tmp: Path, grid: Grid, quantities: list[str], identity: dict, attrs: dict) -> None:
    with h5py.File(tmp, "w") as f:
        x = f.create_dataset("x", data=grid.x)
        x.make_scale("x")
        scales = [x]
        f.create_dataset("xcoordinates", data=grid.x).dims[0].attach_scale(x)
        if grid.y is not None:
            y = f.create_dataset("y", data=grid.y)
            y.make_scale("y")
            scales = [y, x]
            f.create_dataset("ycoordinates", data=grid.y).dims[0].attach_scale(y)
        if grid.planes is not None:
            plane = f.create_dataset("plane", data=np.arange(grid.planes) if grid.z is None else grid.z)
            plane.make_scale("plane")
            scales = [plane, *scales]
        # data= (not just shape=) allocates the storage now: later writes never touch metadata.
        for name in quantities:
            _attach(f.create_dataset(name, data=np.full(grid.shape, np.nan)), scales)
        _attach(f.create_dataset("done", data=np.zeros(grid.shape, dtype=np.uint8)), scales)
        _attach(f.create_dataset(FINISHED_AT, data=np.full(grid.shape, np.nan)), scales)
        f.attrs["format"] = FORMAT
        f.attrs["quantities"] = json.dumps(quantities)
        f.attrs["identity"] = json.dumps(identity)
        for k, v in attrs.items():
            f.attrs[k] = v


def _attach(ds: h5py.Dataset, scales: list[h5py.Dataset]) -> None:
    for axis, scale in enumerate(scales):
        ds.dims[axis].attach_scale(scale)


def _quantities(f: h5py.File) -> list[str]:
    """The per-point datasets: listed in the file, or every dataset but coordinates and ``done``."""
    if "quantities" in f.attrs:
        return json.loads(f.attrs["quantities"])
    return [n for n in f if n not in ("x", "y", "xcoordinates", "ycoordinates", "done", "plane", FINISHED_AT)]


def tile_slice(grid: Grid, tile: Tile) -> tuple[slice | int, ...]:
    """Where a tile lies in the file's datasets (a curve's are one-dimensional; an ensemble's
    start with the plane): slices with the tile's steps, which h5py writes as one strided hyperslab."""
    rows_cols = (tile.rows, tile.cols)[2 - grid.ndim:]
    return rows_cols if grid.planes is None else (tile.plane, *rows_cols)


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM (Ctrl-C, mpirun forwarding one, Slurm's end of time) are held while a
    tile is written and delivered after it, to the handlers the caller had: a tile is then either
    written whole, ``done`` included, or not at all. Handlers, not a signal mask: a process-directed
    signal that the main thread blocks goes to another thread (MPI's, our progress thread), and
    Python still raises it in the main thread at once. Only the main thread may set handlers; a
    write from another thread, or past handlers Python cannot restore (set in C), goes ahead
    undeferred."""
    previous = {s: signal.getsignal(s) for s in _INTERRUPTS}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught: list[int] = []
    for s in _INTERRUPTS:
        signal.signal(s, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for number in caught:
            signal.raise_signal(number)


class TileWriter:
    """Writes finished tiles (values first, then ``finished_at``, then ``done``) into an open file.

    With ``driver='mpio'`` every rank holds one and writes its own tiles independently; on the
    serial path only rank 0 holds one and writes what the other ranks send it.
    """

    def __init__(self, path: str | Path, grid: Grid, comm=None):
        self.grid = grid
        self.parallel = comm is not None
        # HDF5's own lock would stop `lsurf info` and plots from reading a running job's file;
        # writers are kept apart by exclusive_lock() instead.
        self.f = (h5py.File(path, "r+", driver="mpio", comm=comm) if self.parallel
                  else h5py.File(path, "r+", locking=False))
        self.datasets = {name: self.f[name] for name in _quantities(self.f)}
        self.finished_at = self.f[FINISHED_AT] if FINISHED_AT in self.f else None  # None: a file before it
        self.seconds = 0.0  # time spent writing, for the run's statistics

    def write(self, tile: Tile, values: dict[str, np.ndarray], held: np.ndarray | None = None) -> None:
        """The tile's values, then ``done`` where ``held`` (default: the whole tile). ``values`` may
        hold ``finished_at``: the times of points finished before (a resumed file's, NaN elsewhere),
        which are kept; the other held points are stamped now."""
        t0 = time.perf_counter()
        sl = tile_slice(self.grid, tile)
        shape = tile.shape[2 - self.grid.ndim:]  # (rows, columns), or a curve's columns
        held = np.ones(shape, dtype=bool) if held is None else held.reshape(shape)
        with _interrupts_deferred():
            for name, arr in values.items():
                if name != FINISHED_AT:
                    self.datasets[name][sl] = arr.reshape(shape)
            if self.finished_at is not None:
                self.finished_at[sl] = _stamps(values.get(FINISHED_AT), held, time.time())
            if not self.parallel:  # the values on disk before done: HDF5 writes done's small write first else
                self.f.flush()
            self.f["done"][sl] = held.astype(np.uint8)
            if not self.parallel:
                self.f.flush()  # the serial driver buffers small writes; H5Fflush is collective under mpio
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.f.close()


def _stamps(before: np.ndarray | None, held: np.ndarray, now: float) -> np.ndarray:
    """A tile's ``finished_at``: the earlier time of a point finished before, ``now`` for one
    finished by this write, NaN for one not done."""
    earlier = np.full(held.shape, np.nan) if before is None else before.reshape(held.shape)
    return np.where(held, np.where(np.isnan(earlier), now, earlier), np.nan)


def set_attrs(path: str | Path, attrs: dict, drop: tuple[str, ...] = ()) -> None:
    """Add attributes (the run plan, run statistics) while no rank holds the file open for writing.

    Without HDF5's lock, for the reason TileWriter gives: a reader watching the job (``lsurf info``,
    a plot) holds a shared lock that would make this open fail and end the run.
    """
    with h5py.File(path, "r+", locking=False) as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        for k in drop:
            if k in f.attrs:
                del f.attrs[k]


@dataclass
class Surface:
    """A surface read back: coordinates, quantities as (ny, nx) or (nx,) arrays, ``done`` and
    attributes; an ensemble of ``planes`` K has a leading plane axis on every array."""

    path: str
    x: np.ndarray
    y: np.ndarray | None
    values: dict[str, np.ndarray]
    done: np.ndarray
    attrs: dict = field(default_factory=dict)
    reference: bool = False  # written by Li et al.'s code
    planes: int | None = None
    computed: np.ndarray | None = None  # of an interpolated surface: the points measured (``done``: those with values)
    z: np.ndarray | None = None  # the planes' coordinates: 0..K-1 for an ensemble, a 3-axis geometry's third axis
    finished_at: np.ndarray | None = None  # Unix time each point's tile was written (NaN: not done); None: older file

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def grid(self) -> Grid:
        return Grid(self.x, self.y, self.planes)

    def plane(self, k: int) -> Surface:
        """Plane ``k`` of an ensemble as a surface of its own (what a single-plane run with its
        seed would have written)."""
        if self.planes is None:
            raise UserError(f"{self.path!r} holds one plane, not an ensemble")
        if not 0 <= k < self.planes:
            raise UserError(f"`plane` {k}: {self.path!r} holds planes 0 to {self.planes - 1}")
        fid = self.fidelity
        attrs = self.attrs if fid is None else {**self.attrs, "fidelity": fid.only(k).to_json()}
        return Surface(self.path, self.x, self.y, {n: v[k] for n, v in self.values.items()}, self.done[k],
                       attrs, self.reference,
                       finished_at=None if self.finished_at is None else self.finished_at[k])

    def view(self, use: str | None = None, *, fill: bool = False, ensembles: bool = False) -> View:
        """This surface as it is drawn (:class:`View`): its kind, its axes by name, its
        values filled in where a coarse-to-fine run trusted interpolation (``fill``: a file not done
        yet too, as ``lsurf plot --fill`` draws it). ``use`` (e.g. ``export``) takes one plane: a
        three-axis grid is refused, and an ensemble unless ``use`` takes ``ensembles``; None: any."""
        resolved = resolve(self, fill)
        return resolved if use is None else resolved.taking(use, ONE_PLANE + ENSEMBLES if ensembles else ONE_PLANE)

    @property
    def axis_names(self) -> list[str]:
        """The names of the grid's axes: a geometry's own, else x and y."""
        if "axis_names" in self.attrs:
            return json.loads(self.attrs["axis_names"])
        return ["x", "y"][: self.ndim]

    @property
    def third_axis(self) -> str | None:
        """The name of a geometry's third axis (its planes), None for any other file (an ensemble's
        planes are draws of directions, not an axis)."""
        names = self.axis_names
        return names[2] if len(names) == 3 else None

    def slice(self, spec: str) -> Surface:
        """``NAME=VALUE``: the plane of a three-axis grid at the value of its third axis nearest
        VALUE, as a surface of its own (two axes)."""
        name, _, value = spec.partition("=")
        if self.third_axis is None:
            raise UserError(f"`slice` {spec!r}: {self.path!r} has no third axis to slice "
                            f"(its axes: {', '.join(self.axis_names)})")
        if name != self.third_axis:
            raise UserError(f"`slice` {spec!r}: expected {self.third_axis}=VALUE (the third axis of {self.path!r})")
        try:
            target = float(value)
        except ValueError:
            raise UserError(f"`slice` {spec!r}: VALUE must be a number") from None
        assert self.z is not None  # a third axis has coordinates
        k = int(np.abs(self.z - target).argmin())
        return replace(self.plane(k), attrs={**self.attrs, "axis_names": json.dumps(self.axis_names[:2]),
                                             "slice": f"{name}={self.z[k]:g}"})

    @property
    def refinement(self) -> dict | None:
        """The state of a coarse-to-fine run (lsurf.engine.geometry.refine), or None for a whole grid."""
        raw = self.attrs.get("refinement")
        return json.loads(raw) if raw else None

    def accounting(self) -> list[str]:
        """What the file holds besides whole passes: computed vs interpolated points, and the
        samples passes stopped early used (lines for ``lsurf info``)."""
        lines = []
        ref = self.refinement
        if ref is not None:
            measured = self.done if self.computed is None else self.computed
            state = "finished" if ref["finished"] else f"in progress, round {ref['rounds']}"
            lines.append(f"{'coarse to fine:':<20}{int(measured.sum())} of {measured.size} points computed, the rest "
                         f"interpolated ({state}; budget {ref['budget']}, refine_tol {ref['refine_tol']})")
        sizes = json.loads(self.attrs.get("split_sizes", "{}"))
        for split, size in sizes.items():
            used = self.values.get(f"{split}_samples")
            if used is not None and self.done.any():
                n = used[self.done]
                lines.append(f"{split + ' samples:':<20}{n.mean():.0f} of {size} per point on average "
                             f"({100 * n.sum() / (size * n.size):.1f} % of whole passes), min {n.min():.0f}")
        return lines

    @property
    def directions_meta(self) -> dict:
        """How the directions were made (of the first plane of an ensemble); empty if unrecorded."""
        try:
            meta = json.loads(self.attrs.get("directions", "{}"))
        except (TypeError, ValueError):
            return {}
        meta = meta[0] if isinstance(meta, list) and meta else meta
        return meta if isinstance(meta, dict) else {}

    @property
    def config(self) -> dict:
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def fidelity(self) -> fidelity.Fidelity | None:
        """What the planes see of the Hessian at the centre, if it was measured."""
        raw = self.attrs.get("fidelity")
        return fidelity.Fidelity.from_json(raw) if raw else None

    def centre_curvatures(self, split: str) -> list[tuple[float | None, float | None]]:
        """Each plane's second differences of ``{split}_loss`` at the centre along α and β (None
        where the grid cannot tell): the surface's own dᵀHd, to set beside the stored quotients."""
        z = self.values.get(f"{split}_loss")
        if z is None:
            return []
        known = np.where(self.done, z, np.nan)
        planes = [known] if self.planes is None else list(known)
        return [fidelity.centre_curvature(self.x, self.y, p) for p in planes]


# The view: a surface resolved once for whoever draws or converts it (Surface.view). Which kind of
# grid a file holds, its axes by name, its values filled in where a coarse-to-fine run trusted
# interpolation and the one refusal of a file that is not one plane are answered here once, so
# that a plot, a comparison, a page, an export and a VTK file cannot answer them differently.
# Here, not in lsurf.post: what the ``y`` and ``plane`` datasets and the ``axis_names`` and
# ``refinement`` attributes mean is the format's knowledge, and the engine may not import post.
# In this module, not one of its own: ``Surface.view`` and a View naming Surface would import each
# other (a circle to grimp, which counts imports made only for type checking too).

CURVE = "curve"    # one axis
PLANE = "plane"    # two axes
CURVES = "curves"  # an ensemble: K curves, each along its own random direction
PLANES = "planes"  # an ensemble: K planes, each of its own pair of directions
GRID = "grid"      # a geometry of three axes: planes along its third axis (or one of them, Surface.plane)
ONE_PLANE = (CURVE, PLANE)
ENSEMBLES = (CURVES, PLANES)


@dataclass(frozen=True)
class Axis:
    """One axis of a view: its name (a geometry's own, else ``x``/``y``) and its coordinates."""

    name: str
    coords: np.ndarray


@dataclass(frozen=True)
class View:
    """A surface as it is drawn, with what kind of grid it is.

    ``surface``: the file's surface with the points a coarse-to-fine run (or ``fill``) left out
    filled in, ``done`` where a value stands and ``computed`` the points measured; the surface
    itself where nothing is filled. ``source``: the surface as it was given (what an export of
    the file's own points writes). ``axes``: those of one plane (x, and y for a plane), a
    three-axis grid's third last; an ensemble's K draws share the axes of one plane."""

    surface: Surface
    kind: str
    axes: tuple[Axis, ...]
    source: Surface

    @property
    def path(self) -> str:
        return self.surface.path

    @property
    def values(self) -> dict[str, np.ndarray]:
        return self.surface.values

    @property
    def done(self) -> np.ndarray:
        return self.surface.done

    @property
    def computed(self) -> np.ndarray | None:
        """The points measured, where some were filled in (None: every done point was measured)."""
        return self.surface.computed

    @property
    def planes(self) -> int | None:
        """K: an ensemble's draws or a grid's planes held; None: one plane (or curve)."""
        return self.surface.planes

    @property
    def plane_axes(self) -> tuple[Axis, ...]:
        """The axes of one plane (or curve): a three-axis grid's first two, every other view's all."""
        return self.axes[:2]

    @property
    def x(self) -> np.ndarray:
        return self.axes[0].coords

    @property
    def y(self) -> np.ndarray:
        """The second axis's coordinates; a curve has none (IndexError: a caller that asks for
        them has not dispatched on ``kind``)."""
        return self.axes[1].coords

    def refusal(self, use: str) -> UserError:
        """Why ``use`` (e.g. ``export``), which takes one plane, cannot take this view."""
        path, names = self.surface.path, self.surface.axis_names
        if self.kind == GRID:
            return UserError(f"{path!r} holds a grid of three axes ({', '.join(names)}); {use} takes one plane: "
                             f"pick one with `slice` {names[2]}=VALUE")
        return UserError(f"{path!r} holds an ensemble of {self.planes} planes; {use} takes one plane: "
                         "`lsurf plot` draws the ensemble, Surface.plane(k) picks one")

    def taking(self, use: str, kinds: Collection[str] = ONE_PLANE) -> View:
        """This view, if ``use`` takes its kind; else the refusal."""
        if self.kind not in kinds:
            raise self.refusal(use)
        return self


def resolve(surface: Surface, fill: bool = False) -> View:
    """The view of ``surface`` (see :meth:`Surface.view`): its kind and axes, its values filled."""
    coords = [surface.x] if surface.y is None else [surface.x, surface.y]
    if surface.third_axis is not None and surface.z is not None:  # Surface.plane(k) of the grid has no z
        coords.append(surface.z)
    axes = tuple(Axis(name, c) for name, c in zip(surface.axis_names, coords))
    if surface.third_axis is not None:  # its axis names say so: one plane taken out with plane(k) is refused too
        kind = GRID
    elif surface.planes is not None:
        kind = CURVES if surface.y is None else PLANES
    else:
        kind = CURVE if surface.y is None else PLANE
    return View(filled(surface, fill), kind, axes, surface)


def filled(surface: Surface, unfinished: bool = False) -> Surface:
    """A coarse-to-fine surface with the points it left out filled in by the interpolation its
    refinement trusted; ``computed`` keeps which points were measured. With ``unfinished``, a
    whole grid not done yet too (a running job's file drawn whole: its points not done are
    interpolated from the done ones around them where there are, else stay NaN). Any other
    surface (an ensemble, one filled already) comes back as it is."""
    fills = surface.refinement is not None or (unfinished and not surface.done.all())
    if not fills or surface.planes is not None or surface.computed is not None:
        return surface
    plane = surface.grid.plane_shape
    known = surface.done.reshape(plane)
    values = {n: _fill(v.reshape(plane), known).reshape(v.shape) for n, v in surface.values.items()}
    reached = np.isfinite(_fill(np.ones(plane), known)).reshape(surface.done.shape)
    return replace(surface, values=values, done=reached, computed=surface.done)


def completion(path: str | Path) -> tuple[int, int]:
    """(points done, points to do) of a surface file: what a job script checks after a run. A
    finished coarse-to-fine run has done all it meant to (its other points are interpolated)."""
    surface = read_surface(path)
    done = int(surface.done.sum())
    ref = surface.refinement
    return done, done if ref is not None and ref["finished"] else int(surface.done.size)


READ_TRIES = 6  # a read that meets a job's metadata mid-update is tried again, after 0.05, 0.1, ... 0.8 s
_HDF5_SIGNATURE = "file signature not found"  # h5py's message for a file that is no HDF5 at all: never retried


def read_surface(path: str | Path) -> Surface:
    """Read our file or one of Li et al.'s (−1 = not computed, arrays stored ``[ix, iy]``-allocated).

    A file that a running job writes is read as it stands, without disturbing the job: without
    HDF5's file lock (the job's writers take none, and where the file system has no flock a lock
    would only make the read fail), ``done`` before the values (the job writes the values first),
    and a read that meets the job's attributes mid-update (set between rounds and at the end) is
    tried again a few times. A point done without a single value (a read between a tile's ``done``
    and its values, were the order ever lost) is read once more before it is believed (an overflow
    can make it so)."""
    for attempt in range(READ_TRIES):
        try:
            with h5py.File(path, "r", locking=False) as f:
                surface = _read_open(f, str(path))
            if attempt > 0 or not _torn(surface):
                return surface
            time.sleep(0.05)
        except FileNotFoundError:
            raise UserError(f"{str(path)!r} does not exist") from None
        except UserError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            if attempt == READ_TRIES - 1 or _HDF5_SIGNATURE in str(e):
                raise UserError(f"{str(path)!r}: not a readable surface file ({str(e).splitlines()[0]})") from None
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("unreachable: the last try returns or raises")


def _torn(surface: Surface) -> bool:
    """Are some points done without any value (as a read between a tile's ``done`` and its values sees)?"""
    if not surface.values or surface.reference:
        return False
    none = np.logical_and.reduce([np.isnan(v) for v in surface.values.values()])
    return bool((none & surface.done).any())


def _read_open(f: h5py.File, path: str) -> Surface:
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if attrs.get("format") == FORMAT:
        done = f["done"][()].astype(bool)
        y = f["y"][()] if "y" in f else None
        values = {n: f[n][()] for n in _quantities(f)}
        plane = f["plane"][()] if "plane" in f else None
        return Surface(path, f["x"][()], y, values, done, attrs, planes=None if plane is None else len(plane),
                       z=plane, finished_at=f[FINISHED_AT][()] if FINISHED_AT in f else None)
    if "xcoordinates" not in f:
        raise UserError(f"{path!r} is not a surface file (no xcoordinates)")
    return _read_reference(f, path, attrs)


def _read_reference(f: h5py.File, path: str, attrs: dict) -> Surface:
    x = f["xcoordinates"][()]
    y = f["ycoordinates"][()] if "ycoordinates" in f else None
    shape = (len(x),) if y is None else (len(y), len(x))
    values = {}
    for name in f:
        if name.endswith(("_loss", "_acc")) and isinstance(f[name], h5py.Dataset):
            # Allocated (nx, ny) but filled so that element [a, b] is the point (x[b], y[a]).
            a = np.array(f[name][()], dtype=np.float64).ravel().reshape(shape)
            a[a == -1] = np.nan
            values[name] = a
    if not values:
        raise UserError(f"{path!r} has coordinates but no *_loss or *_acc datasets")
    done = np.any([np.isfinite(v) for v in values.values()], axis=0)  # their loss and accuracy come together
    if "dir_file" in f:
        raw = f["dir_file"][()]
        attrs["dir_file"] = raw.decode() if isinstance(raw, bytes) else str(raw)
    return Surface(path, x, y, values, done, attrs, reference=True)
