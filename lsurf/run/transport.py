"""How ranks share the work and the file: a queue of tile numbers and a sink for finished tiles.

Both speak MPI (mpi4py imported lazily) when the world has an MPI communicator, use the c10d store
under torch.distributed (lsurf.run.c10d), and degrade to plain loops in one process. The MPI
message tag lives here, beside the only code that sends and receives it.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lsurf.engine.formats import surface_file
from lsurf.engine.geometry.grid import Grid, Tile
from lsurf.errors import UserError
from lsurf.run.c10d import StoreCounter, StoreRelay, TorchComm
from lsurf.run.world import World

if TYPE_CHECKING:
    from mpi4py import MPI

_TAG_TILE = 11
_PROGRESS_THREAD = True  # bench/bench_tile_wait.py turns it off to measure what it is for


class _Progress:
    """A daemon thread on the window's owner that enters MPI about once a millisecond.

    Why: where the fabric has no hardware atomics (TCP and many cloud networks across nodes), Open
    MPI's ``osc/rdma`` serves a ``Lock``/``Fetch_and_op``/``Unlock`` on rank 0's window only when
    rank 0 itself enters MPI; rank 0 also evaluates grid points, so without this every worker would
    wait for rank 0's current point before it could take a tile. A call that runs MPI's progress
    engine is needed; measured here (``mpirun --mca osc ^sm --mca btl self,tcp``), ``Iprobe`` is one:
    a worker's longest wait for a tile fell from 3.2 s (all of rank 0's computation) to 7 ms
    (bench/bench_tile_wait.py); ``MPI.Wtime`` or an empty ``Testall`` do not progress it, nor does
    Open MPI's ``btl_tcp_progress_thread``.
    It probes a private duplicate of ``COMM_SELF`` (no collective needed, no message ever comes)
    and sleeps in between: rank 0's matmul rate with it was within noise (0.97-1.02 of without).
    Calling MPI from a second thread needs ``MPI_THREAD_MULTIPLE``; without it there is no thread,
    and ``note`` says why.
    """

    def __init__(self) -> None:
        from mpi4py import MPI

        self.thread: threading.Thread | None = None
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            self.note = ("no progress thread: MPI was initialised without MPI_THREAD_MULTIPLE, so on fabrics "
                         "without hardware atomics a worker may wait for rank 0's current point to take a tile")
            return
        self.note = "progress thread on rank 0"
        self.comm = MPI.COMM_SELF.Dup()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(MPI.ANY_SOURCE, MPI.ANY_TAG),
                                       name="lsurf-mpi-progress", daemon=True)
        self.thread.start()
        # A failed run may never reach TileQueue.close(); Python's atexit handlers run before
        # mpi4py finalizes MPI, so this one guarantees no call into MPI after MPI_Finalize.
        atexit.register(self.stop)

    def _loop(self, source: int, tag: int) -> None:
        while not self.stopping.wait(0.001):
            self.comm.Iprobe(source, tag)

    def stop(self) -> None:
        """Stop and join the thread (idempotent); the caller may free the window afterwards."""
        if self.thread is None:
            return
        self.stopping.set()
        self.thread.join()
        self.thread = None
        self.comm.Free()
        atexit.unregister(self.stop)


class Counter(Protocol):
    """Integer slots on rank 0 that every rank adds to atomically: an MPI window or the c10d store."""

    progress_note: str

    def fetch_add(self, slot: int, value: int) -> int: ...

    def stop_progress(self) -> None: ...

    def close(self) -> None: ...


class _WindowCounter:
    """The slots in an MPI window on rank 0, taken with an atomic ``Fetch_and_op``; rank 0 keeps
    the window served while it computes (see :class:`_Progress`). Collective over ``w``."""

    def __init__(self, w: World, slots: int):
        from mpi4py import MPI

        self._MPI = MPI
        self._progress: _Progress | None = None
        self.progress_note = ""  # on rank 0 of several: whether a progress thread serves the window, or why not
        self.win: MPI.Win | None = MPI.Win.Allocate((slots if w.is_root else 0) * 8, disp_unit=8, comm=w.comm)
        if w.is_root:
            # mpi4py's buffer has the buffer protocol, but numpy's stubs for Python < 3.12 name concrete types only
            np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0  # type: ignore[call-overload]
            if w.size > 1 and _PROGRESS_THREAD:  # every schedule: add_done uses the window too
                self._progress = _Progress()
                self.progress_note = self._progress.note
        w.barrier()

    def fetch_add(self, slot: int, value: int) -> int:
        MPI = self._MPI
        one = np.array([value], dtype=np.int64)
        old = np.zeros(1, dtype=np.int64)
        win = self.win
        assert win is not None  # not closed
        win.Lock(0, MPI.LOCK_SHARED)
        win.Fetch_and_op(one, old, 0, slot, MPI.SUM)
        win.Unlock(0)
        return int(old[0])

    def stop_progress(self) -> None:
        """Stop rank 0's progress thread (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        """Collective: stop the progress thread first (it must not touch MPI past this point), then
        free the window."""
        self.stop_progress()
        if self.win is not None:
            self.win.Free()
            self.win = None


def _counter(w: World, slots: int) -> Counter | None:
    """The world's shared counter (None in one process). Collective over ``w``."""
    if w.comm is None:
        return None
    return StoreCounter(w.comm) if isinstance(w.comm, TorchComm) else _WindowCounter(w, slots)


class TileQueue:
    """Hands out tile numbers ``0..n-1``: dynamically from a shared counter, or round-robin.

    The dynamic queue is a :class:`Counter` holding [next tile, points done]; ranks take the next
    tile with an atomic fetch-and-add, so a faster rank simply takes more tiles. The second slot
    feeds rank 0's progress bar.
    """

    def __init__(self, w: World, n: int, schedule: str = "dynamic", slot: int | None = None,
                 slots: int | None = None):
        """Collective over ``w``. ``slot`` of ``slots`` (default: rank of size) is who takes tiles
        under the static schedule: with rank groups only each group's leader calls :meth:`next`."""
        if schedule not in ("dynamic", "static"):
            raise UserError(f"`schedule` {schedule!r}: expected dynamic or static")
        self.w, self.n, self.schedule = w, n, schedule
        self._stride = w.size if slots is None else slots
        self._next_static = w.rank if slot is None else slot
        self._done_local = 0
        self.shared = _counter(w, 2)
        # on rank 0 of several: whether a progress thread serves the counter, or why not
        self.progress_note = self.shared.progress_note if self.shared is not None else ""

    def next(self) -> int | None:
        if self.schedule == "static" or self.shared is None:
            if self._next_static >= self.n:
                return None
            t = self._next_static
            self._next_static += self._stride
            return t
        t = self.shared.fetch_add(0, 1)
        return t if t < self.n else None

    def add_done(self, points: int) -> None:
        self._done_local += points
        if self.shared is not None:
            self.shared.fetch_add(1, points)

    def points_done(self) -> int:
        """Points finished by all ranks so far (exact on rank 0's own count when serial)."""
        return self._done_local if self.shared is None else self.shared.fetch_add(1, 0)

    def stop_progress(self) -> None:
        """Stop rank 0's progress thread (idempotent). ``close`` does it; a failed run may call it
        where the collective ``close`` is out of reach (atexit does it at the latest)."""
        if self.shared is not None:
            self.shared.stop_progress()

    def close(self) -> None:
        """Collective: release the shared counter."""
        if self.shared is not None:
            self.shared.close()
            self.shared = None


class Relay(Protocol):
    """Messages from any rank to rank 0, which takes them when it pleases: MPI's point-to-point
    messages or the c10d store. A sender never waits for rank 0 (it evaluates points too)."""

    def send(self, msg: Any) -> None: ...

    def flush(self) -> None: ...

    def poll(self) -> tuple[bool, Any]: ...

    def wait(self) -> Any: ...


class _MpiRelay:
    def __init__(self, comm: Any):
        self.comm = comm
        self.sends: list[MPI.Request] = []  # non-blocking, so a worker never waits while rank 0 computes

    def send(self, msg: Any) -> None:
        self.sends.append(self.comm.isend(msg, dest=0, tag=_TAG_TILE))

    def flush(self) -> None:
        """Wait until every message sent has left."""
        for request in self.sends:
            request.wait()

    def poll(self) -> tuple[bool, Any]:
        """(True, a message) if one has arrived, else (False, None)."""
        from mpi4py import MPI

        if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_TILE):
            return False, None
        return True, self.wait()

    def wait(self) -> Any:
        from mpi4py import MPI

        return self.comm.recv(source=MPI.ANY_SOURCE, tag=_TAG_TILE)


class TileSink:
    """Where finished tiles go: into the file by this rank (parallel HDF5, or a lone process), or,
    where h5py is serial (and always under torch.distributed), to rank 0, which writes its own
    tiles and those the others send."""

    def __init__(self, w: World, path: Path, grid: Grid, tiles: list[Tile], parallel_io: bool,
                 senders: int | None = None, puts: bool = True):
        """Collective over ``w`` (parallel HDF5 opens the file on every rank). ``senders``: how many
        ranks put tiles (default all; with rank groups the leaders, rank 0 among them); ``puts``:
        whether this rank is one of them."""
        self.w, self.tiles, self.puts = w, tiles, puts
        self.senders = w.size if senders is None else senders
        self.relay: Relay | None = None  # tiles travel to rank 0
        if w.comm is not None and not parallel_io:
            self.relay = StoreRelay(w.comm) if isinstance(w.comm, TorchComm) else _MpiRelay(w.comm)
        writes_here = parallel_io or w.is_root
        self.out = surface_file.TileWriter(path, grid, w.comm if parallel_io else None) if writes_here else None
        self.finished_ranks = 0

    def put(self, k: int, values: dict[str, np.ndarray], held: np.ndarray) -> None:
        """Tile ``k``'s values; ``held`` marks the points that have one (the rest stay not done)."""
        if self.out is not None:
            self.out.write(self.tiles[k], values, held)
        else:
            assert self.relay is not None  # a rank that does not write relays
            self.relay.send((k, values, held))
        if self.relay is not None and self.w.is_root:
            while (got := self.relay.poll())[0]:
                self._take(got[1])

    def finish(self) -> float:
        """Deliver everything; returns the seconds this rank spent writing."""
        if self.relay is not None and self.w.is_root:
            while self.finished_ranks < self.senders - 1:
                self._take(self.relay.wait())
        elif self.relay is not None and self.puts:
            self.relay.send(None)  # this rank's last message
            self.relay.flush()
        if self.out is None:
            return 0.0
        self.out.close()
        return self.out.seconds

    def abandon(self) -> None:
        """After a failure: close a serial writer so what was written is flushed and the file is free.
        A parallel one is left alone: its close is collective, and the other ranks are not closing."""
        if self.out is not None and not self.out.parallel:
            self.out.close()

    def _take(self, msg: Any) -> None:
        """Rank 0: write a tile another rank sent, or count the end of its tiles (None)."""
        if msg is None:
            self.finished_ranks += 1
            return
        k, values, held = msg
        assert self.out is not None  # only rank 0 receives, and rank 0 always writes
        self.out.write(self.tiles[k], values, held)
