"""Process-wide set-up, in one explicit place that entry points call (the CLI, a job script, a
notebook that wants the CLI's speed): the MPI communicator a launcher gave us, torch's thread
count, glibc's malloc policy, the current CUDA device. Library calls never change these.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from lsurf.errors import UserError
from lsurf.run.c10d import TorchComm, torchrun_place
from lsurf.run.world import World

# Variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK")


def launcher_comm() -> Any:
    """The job's communicator, from what started us: ``MPI.COMM_WORLD`` when an MPI launcher
    (mpirun, mpiexec, srun) did, a :class:`TorchComm` when torchrun (or any launcher setting
    torch.distributed's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) started a world of
    several ranks without MPI, else None (one process). An MPI world of several ranks wins: its
    agreement with torchrun's variables is checked by :func:`start_job`. A process torchrun's agent
    started (``TORCHELASTIC_RUN_ID``) is not an MPI rank even where it inherited PMI variables from
    the ``srun`` that started torchrun: initialising MPI there would make the node's workers claim
    one rank. ``LSURF_MPI=0`` forbids MPI, ``LSURF_MPI=1`` forces it."""
    forced = os.environ.get("LSURF_MPI")
    launched = any(v in os.environ for v in _LAUNCHER_VARS) and "TORCHELASTIC_RUN_ID" not in os.environ
    mpi = _mpi_world() if forced == "1" or (forced != "0" and launched) else None
    if mpi is not None and mpi.Get_size() > 1:
        return mpi
    place = torchrun_place()
    if place is not None and place[1] > 1:
        return TorchComm.from_env()
    if mpi is None and forced != "0":
        _refuse_tasks_without_mpi()
    return mpi


def _mpi_world() -> Any:
    try:
        from mpi4py import MPI
    except Exception as e:  # launched by MPI but mpi4py or its library is unusable
        raise RuntimeError(f"started by an MPI launcher but mpi4py cannot be used: {e}") from e
    return MPI.COMM_WORLD


def check_one_launcher(w: World) -> None:
    """Refuse an MPI world of several ranks whose torch.distributed variables tell another story
    (e.g. ``mpirun`` of a script that exports torchrun's ``WORLD_SIZE``): which world is meant?"""
    place = torchrun_place()
    if w.launcher in ("mpirun", "srun") and w.size > 1 and place is not None and place != (w.rank, w.size):
        raise UserError(f"{w.launcher} started this job as rank {w.rank} of {w.size} MPI ranks, but "
                        f"torch.distributed's RANK={place[0]} WORLD_SIZE={place[1]} (torchrun's) disagree: launch "
                        "with one of them (unset RANK and WORLD_SIZE under mpirun or srun)")


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


def set_malloc_policy(keep_freed: bool = True) -> None:
    """How glibc hands freed memory back: kept (the default) or returned at once (``keep_freed`` False).

    Kept: a forward pass allocates and frees the same multi-MB activations every batch; by default
    glibc serves those with fresh mmap pages, and the page faults can cost more than the
    convolutions. Returned, for a model sharded because memory is short (``shard``): FSDP2 gathers
    and frees a whole block per layer, and drawing the directions gathers and frees whole tensors;
    kept, those freed blocks stay in the process, interleaved with the shards it holds, and its
    peak grows past the unsharded model's (``bench/bench_shard.py``). Allocations of 1 MB and more
    are then mapped and unmapped one by one.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    if keep_freed:
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_top_pad, 64 << 20)
    else:
        libc.mallopt(m_mmap_threshold, 1 << 20)  # a fixed threshold: glibc no longer raises it
        libc.mallopt(m_trim_threshold, 16 << 20)
        libc.mallopt(m_top_pad, 0)


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
                      tf32: bool = False, keep_freed: bool = True) -> torch.device:
    """Set this process up for evaluation and return its device: torch threads (``threads`` or the
    CPUs this rank does not share), glibc's malloc policy (:func:`set_malloc_policy`), float32
    precision on GPUs, and the current CUDA device.

    torch leaves cuDNN's float32 convolutions in TF32 (10-bit mantissa), so a float32 surface on a
    GPU would differ from the CPU's at the 1e-4 level: IEEE float32 is pinned unless ``tf32``.
    """
    w = w or World.of(None)
    torch.set_num_threads(threads or threads_per_rank(w))
    set_malloc_policy(keep_freed)
    set_float32_precision(tf32)
    dev = choose_device(w, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def configure_job(w: World, device: str = "auto", threads: int | None = None, tf32: bool = False,
                  keep_freed: bool = True) -> torch.device:
    """:func:`configure_process` on every rank of a job, then :func:`check_device_binding`: what
    every job's entry point calls, so none skips the one-GPU-per-rank check. Two agreed steps
    (bad input is a clean exit 2 everywhere): a rank that failed to configure never reaches the
    binding check's collective while the others wait in it."""
    dev = w.agree(lambda: configure_process(w, device, threads, tf32, keep_freed))
    w.agree(lambda: check_device_binding(w, dev))
    return dev


def set_float32_precision(tf32: bool) -> None:
    """IEEE float32 (or TF32 with ``tf32``) for CUDA matmuls and cuDNN convolutions, set through
    both of torch's APIs so that both stay readable and agree: torch raises from its legacy getters
    (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.get_float32_matmul_precision()``) once the new ``fp32_precision`` flags alone were set,
    and plug-ins, Hugging Face or compiled code read them. The legacy setters come first (they
    reset the new flags of cuDNN to ``none``), then the new flags where this torch has them."""
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    for flags in (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None),
                  getattr(torch.backends.cudnn, "rnn", None)):
        if flags is not None and hasattr(flags, "fp32_precision"):
            flags.fp32_precision = mode


def float32_precision(device_type: str = "cuda") -> str:
    """What float32 matmuls and convolutions compute in on ``device_type`` (cuBLAS and cuDNN on
    ``cuda``, oneDNN on the CPU): ``ieee``, ``tf32``, ``bf16``, or ``matmul X, conv Y`` where they
    differ. Recorded with every surface (a resume must match it), so it is what runs: ``none``
    resolved as torch resolves it (the op's flag, then its backend's, then the generic one; IEEE
    when none is set)."""
    backend = "cuda" if device_type == "cuda" else "mkldnn"
    ops = {op: _resolved_precision(backend, op) for op in ("matmul", "conv")}
    return ops["matmul"] if ops["matmul"] == ops["conv"] else f"matmul {ops['matmul']}, conv {ops['conv']}"


def _resolved_precision(backend: str, op: str) -> str:
    get = getattr(torch._C, "_get_fp32_precision_getter", None)  # torch >= 2.9: the flags behind fp32_precision
    if get is None:  # older torch: only the legacy TF32 switches, and no reduced precision on the CPU
        legacy = torch.backends.cuda.matmul.allow_tf32 if op == "matmul" else torch.backends.cudnn.allow_tf32
        return "tf32" if backend == "cuda" and legacy else "ieee"
    for flag in ((backend, op), (backend, "all"), ("generic", "all")):
        value = str(get(*flag))
        if value != "none":
            return value
    return "ieee"


@contextlib.contextmanager
def bound_device(dev: torch.device) -> Iterator[None]:
    """``dev`` as the calling thread's current CUDA device for a library call, restored after:
    what allocates on "the current device" (plug-ins' ``.cuda()``, argument-less CUDA queries)
    then lands on the run's GPU. The binding is per host thread (cudaSetDevice), so unlike the
    precision flags (process-wide: a library call reads and records them, see
    :func:`float32_precision`) setting it for the call disturbs no other thread."""
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        yield


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


def start_job() -> World:
    """Where every job's entry point begins: the launcher's communicator (MPI, torch.distributed,
    or one process), this process's place in it, and an abort of the whole job when any rank
    fails (never a hang). Contradictory launchers are refused on every rank (one line, exit 2)."""
    w = World.of(launcher_comm())
    install_abort_hook(w)
    w.agree(lambda: check_one_launcher(w))
    return w


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
