"""This process's place in a job — built from a communicator the caller passes: an mpi4py one, a
:class:`lsurf.run.c10d.TorchComm` (torchrun), or None for one process — and the collective habits
every rank follows: agree on bad input, abort on failure.

mpi4py is imported only to learn the node-local layout of an MPI communicator that already exists,
so a single process, or a torch.distributed job, never needs an MPI library.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lsurf.errors import UserError
from lsurf.run.c10d import TorchComm


@dataclass
class World:
    """This process's place in the job; ``comm`` is None for a single process. ``launcher``: what
    started the job (``mpirun``, ``srun``, ``torchrun`` or ``single``), recorded with its results."""

    comm: Any = None
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cpus: int = 1  # CPUs this rank may use: its affinity set, divided among local ranks sharing that set
    launcher: str = "single"

    @classmethod
    def of(cls, comm: Any = None) -> World:
        """The world of ``comm`` (an mpi4py communicator, a TorchComm, or None for one process)."""
        if comm is None:
            return cls(cpus=len(affinity()))
        if isinstance(comm, TorchComm):
            return cls._of_peers(comm)
        from mpi4py import MPI

        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        # Launchers either bind each rank to its own cores or give every rank the whole allocation;
        # ranks that see the same set must share it.
        mine = affinity()
        sharing = sum(1 for other in node.allgather(mine) if other == mine)
        w = cls(comm, comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(),
                max(1, len(mine) // sharing), mpi_launcher(comm.Get_rank(), comm.Get_size()))
        node.Free()
        return w

    @classmethod
    def _of_peers(cls, comm: TorchComm) -> World:
        """The world of a torch.distributed job: the node-local layout from every rank's host name
        and CPU set (no node communicator needed), as :meth:`of` finds it under MPI."""
        rank, mine = comm.Get_rank(), (socket.gethostname(), affinity())
        peers = comm.allgather(mine)
        node = [r for r, (host, _) in enumerate(peers) if host == mine[0]]
        sharing = sum(1 for other in peers if other == mine)
        return cls(comm, rank, len(peers), node.index(rank), len(node), max(1, len(mine[1]) // sharing), "torchrun")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def gather(self, obj) -> list | None:
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def allgather(self, obj) -> list:
        return [obj] if self.comm is None else self.comm.allgather(obj)

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
        first = next((e for e in self.allgather(error) if e is not None), None)
        if first is not None:
            err = UserError(first)
            err.collective = True  # every rank raises it: exit cleanly, no abort needed
            err.rank = self.rank  # rank 0 alone reports it
            raise err
        return result

    def groups(self, size: int) -> Group:
        """This rank's group of ``size`` consecutive ranks, which share every grid point."""
        if size < 1 or self.size % size:
            raise UserError(f"`ranks_per_point` {size} does not divide the {self.size} ranks of this job")
        if size == 1:
            return Group(None, 0, 1, self.rank, self.size)
        comm = self.comm.Split(color=self.rank // size, key=self.rank)
        return Group(comm, self.rank % size, size, self.rank // size, self.size // size)

    def abort(self, code: int) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


@dataclass
class Group:
    """The ranks that evaluate the same points, each on its share of the data: ``rank`` of ``size``
    in group ``index`` of ``count``. Its first rank (the leader) takes tiles and writes them."""

    comm: Any
    rank: int
    size: int
    index: int
    count: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def add_sums(self) -> Callable[[Any], Any] | None:
        """The group's sum of every rank's sums (an in-place allreduce), or None for a lone rank."""
        if self.comm is None:
            return None
        if isinstance(self.comm, TorchComm):
            return self.comm.add_in_place
        import numpy as np
        from mpi4py import MPI

        def add(sums):
            out = np.ascontiguousarray(sums, dtype=np.float64)
            self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
            return out
        return add

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


def mpi_launcher(rank: int, size: int) -> str:
    """``srun`` where Slurm started each MPI rank as a task of its own (its task number is the
    rank), else ``mpirun`` (mpiexec, or mpirun inside an allocation: Slurm then started one
    daemon per node, not the ranks)."""
    env = os.environ
    by_srun = env.get("SLURM_STEP_NUM_TASKS") == str(size) and env.get("SLURM_PROCID") == str(rank)
    return "srun" if by_srun and "SLURM_STEP_ID" in env else "mpirun"


def affinity() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


@contextlib.contextmanager
def abort_on_failure(w: World) -> Iterator[None]:
    """Any failure on one rank ends the whole job at once, never a hang in a collective: the other
    ranks may be waiting for this one. Bad input that every rank agreed on (``collective``) is left
    to the caller, which exits cleanly everywhere."""
    try:
        yield
    except BaseException as e:
        if w.size == 1 or getattr(e, "collective", False) or isinstance(e, SystemExit):
            raise
        if isinstance(e, UserError):
            sys.stderr.write(f"lsurf: error (rank {w.rank}): {e}\n")
            code = 2
        elif isinstance(e, KeyboardInterrupt):
            sys.stderr.write("lsurf: interrupted\n")
            code = 130
        else:
            text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            sys.stderr.write(f"lsurf: rank {w.rank} failed: {type(e).__name__}: {e}\n{text}")
            code = 1
        sys.stderr.flush()
        w.comm.Abort(code)
        raise
