"""How ranks share the work and the file: a queue of tile numbers and a sink for finished tiles.

Both speak MPI (mpi4py imported lazily) when the world has a communicator, and degrade to plain
loops in one process. Message tags live here, beside the only code that sends and receives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lsurf.engine import surface_file
from lsurf.engine.grid import Grid, Tile
from lsurf.errors import UserError
from lsurf.run.world import World

if TYPE_CHECKING:
    from mpi4py import MPI

_TAG_TILE, _TAG_END = 11, 12


class TileQueue:
    """Hands out tile numbers ``0..n-1``: dynamically from a shared counter, or round-robin.

    The dynamic queue is an MPI window on rank 0 holding [next tile, points done]; ranks take the
    next tile with an atomic ``Fetch_and_op``, so a faster rank simply takes more tiles. The
    second slot feeds rank 0's progress bar.
    """

    def __init__(self, w: World, n: int, schedule: str = "dynamic"):
        if schedule not in ("dynamic", "static"):
            raise UserError(f"`schedule` {schedule!r}: expected dynamic or static")
        self.w, self.n, self.schedule = w, n, schedule
        self._next_static = w.rank
        self._done_local = 0
        self.win = None
        if w.comm is not None:
            from mpi4py import MPI

            self._MPI = MPI
            size = 2 if w.is_root else 0
            self.win = MPI.Win.Allocate(size * 8, disp_unit=8, comm=w.comm)
            if w.is_root:
                # mpi4py's buffer has the buffer protocol, but numpy's stubs for Python < 3.12 name concrete types only
                np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0  # type: ignore[call-overload]
            w.barrier()

    def _fetch_add(self, slot: int, value: int) -> int:
        MPI = self._MPI
        one = np.array([value], dtype=np.int64)
        old = np.zeros(1, dtype=np.int64)
        win = self.win
        assert win is not None  # every caller checks that the window exists
        win.Lock(0, MPI.LOCK_SHARED)
        win.Fetch_and_op(one, old, 0, slot, MPI.SUM)
        win.Unlock(0)
        return int(old[0])

    def next(self) -> int | None:
        if self.schedule == "static" or self.win is None:
            if self._next_static >= self.n:
                return None
            t = self._next_static
            self._next_static += self.w.size
            return t
        t = self._fetch_add(0, 1)
        return t if t < self.n else None

    def add_done(self, points: int) -> None:
        self._done_local += points
        if self.win is not None:
            self._fetch_add(1, points)

    def points_done(self) -> int:
        """Points finished by all ranks so far (exact on rank 0's own count when serial)."""
        return self._done_local if self.win is None else self._fetch_add(1, 0)

    def close(self) -> None:
        if self.win is not None:
            self.win.Free()
            self.win = None


class TileSink:
    """Where finished tiles go: into the file by this rank (parallel HDF5, or a lone process), or,
    where h5py is serial, to rank 0, which writes its own tiles and those the others send."""

    def __init__(self, w: World, path: Path, grid: Grid, tiles: list[Tile], parallel_io: bool):
        self.w, self.tiles = w, tiles
        self.relay = w.comm is not None and not parallel_io  # tiles travel to rank 0
        writes_here = parallel_io or w.is_root
        self.out = surface_file.TileWriter(path, grid, w.comm if parallel_io else None) if writes_here else None
        self.sends: list[MPI.Request] = []  # non-blocking, so a worker never waits while rank 0 computes
        self.finished_ranks = 0

    def put(self, k: int, values: dict[str, np.ndarray]) -> None:
        if self.out is not None:
            self.out.write(self.tiles[k], values)
        else:
            self.sends.append(self.w.comm.isend((k, values), dest=0, tag=_TAG_TILE))
        if self.relay and self.w.is_root:
            self._receive(block=False)

    def finish(self) -> float:
        """Deliver everything; returns the seconds this rank spent writing."""
        if self.relay and self.w.is_root:
            while self.finished_ranks < self.w.size - 1:
                self._receive(block=True)
        elif self.relay:
            self.sends.append(self.w.comm.isend(None, dest=0, tag=_TAG_END))
            for request in self.sends:
                request.wait()
        if self.out is None:
            return 0.0
        self.out.close()
        return self.out.seconds

    def abandon(self) -> None:
        """After a failure: close a serial writer so what was written is flushed and the file is free.
        A parallel one is left alone: its close is collective, and the other ranks are not closing."""
        if self.out is not None and not self.out.parallel:
            self.out.close()

    def _receive(self, block: bool) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while block or self.w.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
            msg = self.w.comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if status.Get_tag() == _TAG_END:
                self.finished_ranks += 1
            else:
                k, values = msg
                assert self.out is not None  # only rank 0 receives, and rank 0 always writes
                self.out.write(self.tiles[k], values)
            if block:
                return
