"""Process-wide set-up, in one explicit place that entry points call (the CLI, a job script, a
notebook that wants the CLI's speed): the MPI communicator a launcher gave us, torch's thread
count, glibc's malloc policy, the current CUDA device. Library calls never change these.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import traceback
from typing import Any

import torch

from lsurf.errors import UserError
from lsurf.run.world import World

# Variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")


def launcher_comm() -> Any:
    """``MPI.COMM_WORLD`` when an MPI launcher (mpirun, mpiexec, srun) started us, else None.
    ``LSURF_MPI=0`` forces a single process, ``LSURF_MPI=1`` forces MPI."""
    forced = os.environ.get("LSURF_MPI")
    if forced == "0" or (forced != "1" and not any(v in os.environ for v in _LAUNCHER_VARS)):
        if forced != "0":
            _refuse_tasks_without_mpi()
        return None
    try:
        from mpi4py import MPI
    except Exception as e:  # launched by MPI but mpi4py or its library is unusable
        raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be used: {e}") from e
    return MPI.COMM_WORLD


def _refuse_tasks_without_mpi() -> None:
    """``srun --mpi=none`` (or a launcher that sets no PMI variables) starts N copies that know
    nothing of each other: each would sample the whole grid alone and race for the output file."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        raise UserError(f"srun started {tasks} tasks that share no MPI job (no PMI variables set): launch with "
                        "srun --mpi=pmix (or the --mpi your site's MPI needs) or mpirun; LSURF_MPI=1 if it is MPI")


def threads_per_rank(w: World) -> int:
    """Torch threads for this rank: ``OMP_NUM_THREADS`` if set (e.g. from Slurm's cpus-per-task),
    else the CPUs it does not share with other ranks. Oversubscribed threads are catastrophic
    (see bench/bench_speed.py's thread section)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else w.cpus


def keep_freed_memory() -> None:
    """Ask glibc to keep freed activation buffers instead of returning them to the kernel.

    A forward pass allocates and frees the same multi-MB activations every batch; by default glibc
    serves those with fresh mmap pages, and the page faults can cost more than the convolutions.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


def choose_device(w: World, spec: str = "auto") -> torch.device:
    """This rank's device: ``cuda:(local_rank % visible GPUs)`` for ``auto``/``cuda``, else as given."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda:"):
        index = spec[len("cuda:"):]
        count = torch.cuda.device_count()
        if not index.isdigit():
            raise UserError(f"`device` {spec!r}: expected cuda:N with N a GPU index")
        if int(index) >= count:
            raise UserError(f"`device` {spec!r}: this process sees {count} CUDA device{'s' * (count != 1)}"
                            + (f" (cuda:0 to cuda:{count - 1})" if count else ""))
        return torch.device(spec)
    if spec in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if spec == "cuda":
                raise UserError("`device` cuda: no CUDA device is visible")
            return torch.device("cpu")
        # device_count() honours CUDA_VISIBLE_DEVICES, e.g. one GPU per Slurm task -> cuda:0.
        return torch.device("cuda", w.local_rank % torch.cuda.device_count())
    raise UserError(f"`device` {spec!r}: expected auto, cpu, cuda or cuda:N")


def configure_process(w: World | None = None, device: str = "auto", threads: int | None = None,
                      tf32: bool = False) -> torch.device:
    """Set this process up for evaluation and return its device: torch threads (``threads`` or the
    CPUs this rank does not share), glibc's malloc policy, float32 precision on GPUs, and the current
    CUDA device.

    torch leaves cuDNN's float32 convolutions in TF32 (10-bit mantissa), so a float32 surface on a
    GPU would differ from the CPU's at the 1e-4 level: IEEE float32 is pinned unless ``tf32``.
    """
    w = w or World.of(None)
    torch.set_num_threads(threads or threads_per_rank(w))
    keep_freed_memory()
    set_float32_precision(tf32)
    dev = choose_device(w, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def set_float32_precision(tf32: bool) -> None:
    """IEEE float32 (or TF32 with ``tf32``) for CUDA matmuls and cuDNN convolutions."""
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode  # type: ignore[attr-defined]  # in torch, not its stubs


def float32_precision() -> str:
    """What this process computes float32 GPU convolutions in (recorded with every surface)."""
    return str(torch.backends.cudnn.conv.fp32_precision)  # type: ignore[attr-defined]  # as above


def check_device_binding(w: World, dev: torch.device) -> None:
    """Refuse a job whose ranks use different device types (``auto`` on nodes where only some
    ranks see a GPU: the surface would mix values computed two ways), or whose ranks on one node
    share a GPU (a binding mistake, e.g. ``--gpu-bind=single:1`` overriding one GPU per task)."""
    uuid = str(torch.cuda.get_device_properties(dev).uuid) if dev.type == "cuda" else ""
    seen = w.allgather((dev.type, socket.gethostname(), uuid))
    types = sorted({t for t, _, _ in seen})
    if len(types) > 1:
        raise UserError(f"ranks of this job run on different device types ({', '.join(types)}): pass `device` "
                        "cuda or cpu so every rank computes the same way")
    owners: dict[tuple[str, str], int] = {}
    for rank, (_, node, gpu) in enumerate(seen):
        if gpu and (node, gpu) in owners:
            raise UserError(f"ranks {owners[node, gpu]} and {rank} on {node} share GPU {gpu}: bind one GPU per "
                            "rank (Slurm: --gpus-per-task=1 without --gpu-bind=single:1)")
        owners.setdefault((node, gpu), rank)


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
