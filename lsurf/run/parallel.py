"""MPI world, device pinning, threads per rank, the tile queue, and abort-on-error.

mpi4py is imported only when a launcher (mpirun, mpiexec, srun) started us, so lsurf runs in one
process where no MPI library is installed. A serial run uses the same code with ``comm=None``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lsurf.errors import UserError

# Variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")


@dataclass
class World:
    """This process's place in the job; ``comm`` is None for a single process."""

    comm: Any = None
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cpus: int = 1  # CPUs this rank may use: its affinity set, divided among local ranks sharing that set

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def gather(self, obj) -> list | None:
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it raised :class:`UserError` anywhere, raise it everywhere.

        Bad input is then a clean exit 2 on all ranks instead of an abort or a hang.
        """
        try:
            result, error = fn(), None
        except UserError as e:
            result, error = None, str(e)
        errors = [error] if self.comm is None else self.comm.allgather(error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            err = UserError(first)
            err.collective = True  # every rank raises it: exit cleanly, no abort needed
            raise err
        return result

    def abort(self, code: int) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


_WORLD: World | None = None


def world() -> World:
    """The process's :class:`World`, created once; ``LSURF_MPI=0`` forces a single process."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _make_world()
        if _WORLD.comm is None and os.environ.get("LSURF_MPI") != "0":
            _refuse_tasks_without_mpi()
    return _WORLD


def current_world() -> World:
    """The world if one was made, else a single process: for error paths, which must not fail."""
    return _WORLD or World()


def _refuse_tasks_without_mpi() -> None:
    """``srun --mpi=none`` (or a launcher that sets no PMI variables) starts N copies that know
    nothing of each other: each would sample the whole grid alone and race for the output file."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        raise UserError(f"srun started {tasks} tasks that share no MPI job (no PMI variables set): launch with "
                        "srun --mpi=pmix (or the --mpi your site's MPI needs) or mpirun; LSURF_MPI=1 if it is MPI")


def _make_world() -> World:
    forced = os.environ.get("LSURF_MPI")
    if forced == "0" or (forced != "1" and not any(v in os.environ for v in _LAUNCHER_VARS)):
        return World(cpus=len(_affinity()))
    try:
        from mpi4py import MPI
    except Exception as e:  # launched by MPI but mpi4py or its library is unusable
        raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be used: {e}") from e
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    # Launchers either bind each rank to its own cores or give every rank the whole allocation;
    # ranks that see the same set must share it.
    mine = _affinity()
    sharing = sum(1 for other in node.allgather(mine) if other == mine)
    w = World(comm, comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), max(1, len(mine) // sharing))
    node.Free()
    return w


def _affinity() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def install_abort_hook(w: World) -> None:
    """An uncaught exception on any rank ends the whole job at once (never a hang in a collective)."""
    if w.size == 1:
        return

    def hook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"lsurf: rank {w.rank} failed: {kind.__name__}: {value}\n{text}")
        sys.stderr.flush()
        w.comm.Abort(1)

    sys.excepthook = hook


def threads_per_rank(w: World) -> int:
    """Torch threads for this rank: ``OMP_NUM_THREADS`` if set (e.g. from Slurm's cpus-per-task),
    else the CPUs it does not share with other ranks. Oversubscribed threads are catastrophic:
    with the other core busy, 2 threads ran a ResNet-20 pass 3-7x slower than 1 here."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else w.cpus


def keep_freed_memory() -> None:
    """Ask glibc to keep freed activation buffers instead of returning them to the kernel.

    A forward pass allocates and frees the same multi-MB activations every batch; by default glibc
    serves those with fresh mmap pages, and the page faults cost more than the convolutions: a
    ResNet-20 pass over 1,000 CIFAR images took 1.13 s instead of 0.70 s here (batch 128).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def pin_device(w: World, spec: str = "auto", threads: int | None = None) -> torch.device:
    """Choose this rank's device (``cuda:(local_rank % GPUs)``) and its CPU thread count."""
    n_threads = threads or threads_per_rank(w)
    torch.set_num_threads(n_threads)
    keep_freed_memory()
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda:"):
        device = torch.device(spec)
    elif spec in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if spec == "cuda":
                raise UserError("`device` cuda: no CUDA device is visible")
            return torch.device("cpu")
        # device_count() honours CUDA_VISIBLE_DEVICES, e.g. one GPU per Slurm task -> cuda:0.
        device = torch.device("cuda", w.local_rank % torch.cuda.device_count())
    else:
        raise UserError(f"`device` {spec!r}: expected auto, cpu, cuda or cuda:N")
    torch.cuda.set_device(device)
    return device


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
                np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0
            w.barrier()

    def _fetch_add(self, slot: int, value: int) -> int:
        MPI = self._MPI
        one = np.array([value], dtype=np.int64)
        old = np.zeros(1, dtype=np.int64)
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Fetch_and_op(one, old, 0, slot, MPI.SUM)
        self.win.Unlock(0)
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
