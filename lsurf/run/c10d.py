"""A job's world over ``torch.distributed`` (gloo), for launchers that start ranks without MPI:
``torchrun``, or any that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.

:class:`TorchComm` speaks the part of mpi4py's communicator API that lsurf's :class:`World` and
:class:`Group` use (``Get_rank``, ``Get_size``, ``bcast``, ``gather``, ``allgather``, ``Barrier``,
``Split``, ``Free``, ``Abort``), with torch's object collectives: the collective habits of a job
(agree, abort, groups) are written once, for either communicator. What MPI does one-sidedly has a
counterpart on the c10d store, which a server thread outside the ranks' computation serves: the
tile queue's counters (:class:`StoreCounter`, the store's atomic ``add``) and the tiles sent to
rank 0 (:class:`StoreRelay`). Parallel HDF5 needs MPI: under torch.distributed rank 0 writes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import time
import uuid
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lsurf.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_place() -> tuple[int, int] | None:
    """(rank, world size) that torch.distributed's variables announce, or None unless both
    ``RANK`` and ``WORLD_SIZE`` are set (every launcher of torch.distributed sets both; either
    alone, or ``MASTER_ADDR``/``PORT`` alone, may be a site's own and announces no world)."""
    rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or size is None:
        return None
    bad = [f"{k}={v!r}" for k, v in (("RANK", rank), ("WORLD_SIZE", size)) if not v.isdigit()]
    if bad:
        raise UserError(f"torchrun: {', '.join(bad)} is not a whole number (torch.distributed's RANK and "
                        "WORLD_SIZE)")
    return int(rank), int(size)


class TorchComm:
    """A communicator over torch.distributed: the default group (the whole job, ``group`` None),
    or a group that :meth:`Split` made."""

    def __init__(self, group: Any = None):
        self.group = group

    @classmethod
    def from_env(cls) -> TorchComm:
        """The whole job, joining torch.distributed's default group (gloo: every message is a
        Python object on the host, whatever device evaluates) if nobody has yet."""
        missing = [v for v in TORCHRUN_VARS if not os.environ.get(v)]
        if missing:
            raise UserError(f"torchrun: WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but "
                            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            atexit.register(leave)
        return cls()

    def Get_rank(self) -> int:
        return dist.get_rank(self.group)

    def Get_size(self) -> int:
        return dist.get_world_size(self.group)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=root)
        return box[0]

    def gather(self, obj: Any, root: int = 0) -> list | None:
        out: list | None = [None] * self.Get_size() if self.Get_rank() == root else None
        dist.gather_object(obj, out, group=self.group, group_dst=root)
        return out

    def allgather(self, obj: Any) -> list:
        out: list = [None] * self.Get_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def Barrier(self) -> None:
        dist.barrier(group=self.group)

    def Split(self, color: int, key: int = 0) -> TorchComm:
        """The group of the ranks that pass the same ``color``, ordered by ``key``. Collective over
        the whole job: torch makes every group with every rank taking part, members or not."""
        if self.group is not None:
            raise ValueError("TorchComm.Split splits the whole job only")
        peers = self.allgather((color, key, dist.get_rank()))
        mine = self
        for c in sorted({c for c, _, _ in peers}):
            members = [r for _, _, r in sorted((k, r, r) for cc, k, r in peers if cc == c)]
            group = dist.new_group(members, sort_ranks=False)
            if c == color:
                mine = TorchComm(group)
        return mine

    def Free(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

    def Abort(self, errorcode: int = 1) -> None:
        """End this process now: the launcher (torchrun) ends the others when one exits non-zero,
        and no collective waits for a process that is gone (its peers' sockets close)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(errorcode)

    def add_in_place(self, sums: np.ndarray) -> np.ndarray:
        """Every member's ``sums`` added (float64), as MPI's in-place ``Allreduce`` gives them."""
        t = torch.from_numpy(np.ascontiguousarray(sums, dtype=np.float64).copy())
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()

    def store(self) -> dist.Store:
        """A fresh namespace on the job's c10d store (collective: rank 0 names it), so keys of two
        queues, or of a run before a torchrun restart, never meet."""
        name = self.bcast(uuid.uuid4().hex if self.Get_rank() == 0 else None)
        return dist.PrefixStore(f"lsurf/{name}/", dist.distributed_c10d._get_default_store())


def leave() -> None:
    """Leave the default group at exit (torch warns about a group never destroyed)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class StoreCounter:
    """Integer slots that every rank adds to atomically (the store's ``add``): the tile queue's
    [next tile, points done]. The store's server answers while the ranks compute: no progress
    thread is needed, unlike an MPI window on fabrics without hardware atomics."""

    progress_note = ""

    def __init__(self, comm: TorchComm):
        self.store = comm.store()

    def fetch_add(self, slot: int, value: int) -> int:
        """The slot's value before adding ``value``."""
        return int(self.store.add(f"slot{slot}", value)) - value

    def stop_progress(self) -> None:
        """Nothing to stop: the store serves itself."""

    def close(self) -> None:
        """Nothing to free: the namespace dies with the job's store."""


class StoreRelay:
    """Messages from any rank to rank 0 through the store: a sender numbers its message from a
    shared counter and stores it under that number; rank 0 takes them in number order. A sender
    never waits for rank 0 (which is evaluating points too), like MPI's ``isend``."""

    def __init__(self, comm: TorchComm):
        self.store = comm.store()
        self.taken = 0

    def send(self, msg: Any) -> None:
        number = int(self.store.add("sent", 1)) - 1
        # bytes are stored as they are (torch's stub names str only)
        self.store.set(f"m{number}", pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))  # type: ignore[arg-type]

    def flush(self) -> None:
        """Nothing in flight: a message is in the store once :meth:`send` returns."""

    def poll(self) -> tuple[bool, Any]:
        """(True, the next message) if it has arrived, else (False, None)."""
        key = f"m{self.taken}"
        if not self.store.check([key]):
            return False, None
        return True, self._take(key)

    def wait(self) -> Any:
        """The next message, once it arrives. Polled rather than a blocking ``get``, whose store
        timeout would fail a job whose last tiles take longer than it."""
        key = f"m{self.taken}"
        while not self.store.check([key]):
            time.sleep(0.005)
        return self._take(key)

    def _take(self, key: str) -> Any:
        msg = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        self.taken += 1
        return msg
