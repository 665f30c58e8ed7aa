"""The torch.distributed side of a sharded run (``shard`` fsdp): a process group per rank group,
made from the World lsurf already has, over which lsurf.engine.model.sharding shards the model.

Under torchrun the ranks have joined torch.distributed already (lsurf.run.c10d). Under MPI they
join it here: rank 0 opens a TCPStore on a port the OS picks (so no other job can race for it)
and the others learn its host and port over MPI — no launcher variables, no second launcher.
Gloo carries a CPU group's collectives, NCCL a GPU group's.
"""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lsurf.errors import UserError
from lsurf.run.c10d import leave
from lsurf.run.options import Options
from lsurf.run.world import Group, World


def shard_mesh(w: World, options: Options, dev: torch.device) -> DeviceMesh | None:
    """The mesh a run with ``shard`` loads its model onto (collective), or None without ``shard``:
    its rank group's, on this rank's ``dev`` (the mesh :func:`group_mesh` keeps for the run itself)."""
    if not options.shard:
        return None
    group = w.groups(options.ranks_per_point)
    try:
        return group_mesh(w, group, dev)
    finally:
        group.free()


def group_mesh(w: World, group: Group, device: torch.device) -> DeviceMesh:
    """This rank's group as a one-dimensional DeviceMesh of ``device``'s kind (collective: every
    rank of the job calls it). Made once per process and kept, like the default group: a mesh
    whose process groups were destroyed stays known to DTensor's caches, so a second run would
    find the first run's groups gone."""
    _join(w)
    backend = "nccl" if device.type == "cuda" else "gloo"
    key = (group.size, device.type)
    if key not in _MESHES:
        # every rank makes every group, in one order: new_group is collective over the whole job
        groups = [dist.new_group(list(range(g * group.size, (g + 1) * group.size)), backend=backend)
                  for g in range(group.count)]
        _MESHES[key] = DeviceMesh.from_group(groups[group.index], device.type)
    return _MESHES[key]


_MESHES: dict[tuple[int, str], DeviceMesh] = {}


def _join(w: World) -> None:
    """Join torch.distributed's default group over the job's ranks, if this process has not."""
    if dist.is_initialized():
        if dist.get_world_size() != w.size:
            raise UserError(f"torch.distributed is joined with {dist.get_world_size()} ranks but this job has "
                            f"{w.size}: `shard` needs the job's own ranks")
        return
    if w.is_root:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        store = dist.TCPStore(host, 0, w.size, is_master=True, wait_for_workers=False)
        w.bcast((host, store.port))
    else:
        host, port = w.bcast(None)
        store = dist.TCPStore(host, port, w.size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=w.rank, world_size=w.size)
    atexit.register(leave)
