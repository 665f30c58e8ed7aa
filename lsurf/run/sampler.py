"""The distributed sampling run: tiles of the grid -> evaluator -> one shared surface file.

Every rank runs :func:`sample_surface`. Rank 0 checks (or creates) the file and broadcasts what is
already done; tiles are taken from a shared queue, evaluated, and written as soon as they finish —
by each rank itself through parallel HDF5 (``driver='mpio'``), or, where h5py is serial, by rank 0
from messages the other ranks send it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.engine import surface_file
from lsurf.engine.data import Split, resident_batches
from lsurf.engine.directions import Directions, save_directions, target_tensors
from lsurf.engine.evaluate import Evaluator, check_outputs_fit, quantity_names, resolve_loss
from lsurf.engine.grid import Grid, Tile
from lsurf.engine.models import file_sha256
from lsurf.errors import UserError
from lsurf.run.parallel import TileQueue, World, pin_device, world

_TAG_TILE, _TAG_END = 11, 12


def use_parallel_hdf5(w: World, writer: str) -> bool:
    """``writer``: ``auto`` (mpio where h5py has MPI), ``mpio`` or ``root`` (gather to rank 0)."""
    if writer not in ("auto", "mpio", "root"):
        raise UserError(f"`writer` {writer!r}: expected auto, mpio or root")
    has_mpi = h5py.get_config().mpi
    if writer == "mpio" and not has_mpi and w.size > 1:
        raise UserError("`writer` mpio: this h5py is not built with MPI")
    return w.size > 1 and has_mpi and writer != "root"


def sample_surface(
    model: nn.Module,
    data: dict[str, Split],
    directions: Directions,
    grid: Grid,
    out: str | Path,
    *,
    loss: str = "cross_entropy",
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
    points_per_pass: int | None = None,
    amp: bool = False,
    channels_last: bool | None = None,
    hessian_iters: int = 0,
    bn: str = "eval",
    tile: tuple[int, int] | None = None,
    schedule: str = "dynamic",
    writer: str = "auto",
    overwrite: bool = False,
    provenance: dict | None = None,
    save_directions_to: str | Path | None = None,
    progress: bool = True,
    log=None,
) -> surface_file.Surface | None:
    """Sample loss and accuracy over ``grid`` around the model's current weights into ``out``.

    Call it on every rank of an MPI job (or in a single process). Returns the finished surface on
    rank 0 and None elsewhere. ``batch_size`` None means 128 on the CPU (small activations stay
    in cache) and 1024 on a GPU (fewer kernel launches); in eval mode it changes only speed.
    ``provenance`` (e.g. the checkpoint's SHA-256) is stored in the file, and its ``identity``
    entries must match for an existing file to be resumed. ``save_directions_to`` writes the
    directions there (when a new output file is started) and records the file in the surface's
    provenance. ``points_per_pass`` None calibrates:
    the faster of per-point and stacked (vmap) evaluation is measured on rank 0 and used by all.
    ``amp`` runs forwards under bfloat16 autocast (values change at the 1e-2 level: a speed
    option for GPUs, recorded in the file's identity). ``channels_last`` (NHWC) changes only the
    memory layout; None measures both layouts on rank 0 and keeps the faster (convnets ran ~1.9x
    faster in NHWC on this CPU). Pin it and ``points_per_pass`` for bit-identical reruns.
    ``hessian_iters`` > 0 adds λ_max and λ_min of the first split's Hessian at every point
    (that many Lanczos steps), datasets ``hessian_max`` and ``hessian_min``.
    """
    w = world()
    log = log or (lambda msg: None)
    dev, loss_fn, batch_size = w.agree(
        lambda: _check_inputs(w, model, data, directions, grid, device, threads, loss, dtype, batch_size))
    dir_type = directions.meta.get("dir_type", "weights")
    prov = dict(provenance or {})
    identity = {
        **prov.pop("identity", {}),
        "directions_sha256": directions.sha256(),
        "data_sha256": {s: split.fingerprint() for s, split in data.items()} if w.is_root else None,
        "loss": loss, "dtype": str(dtype).replace("torch.", ""), "bn": bn, "dir_type": dir_type, "amp": amp,
        "hessian_iters": hessian_iters,
    }
    attrs = _provenance_attrs(prov, directions)
    path = Path(out)
    with contextlib.ExitStack() as stack:
        def prepare():
            if not w.is_root:
                return None
            stack.enter_context(surface_file.exclusive_lock(path))
            if surface_file.accept(path, grid, identity, overwrite):
                return _existing(path)
            if save_directions_to is not None:  # only once the output is accepted: nothing else is touched
                _save_directions(directions, save_directions_to, attrs)
            surface_file.create(path, grid, quantity_names(data, hessian_iters > 0), identity, attrs)
            return None

        existing = w.bcast(w.agree(prepare))
        if channels_last is None:
            first = next(iter(data.values()))
            channels_last = w.bcast(faster_in_channels_last(model, first.x[:batch_size].to(dev, dtype), log)
                                    if w.is_root else None)
        if channels_last:  # before taking the target tensors: .to() gives parameters new storage
            model.to(memory_format=torch.channels_last)
        names, targets = target_tensors(model, dir_type)
        batches = {s: resident_batches(split, batch_size, dev, dtype, channels_last) for s, split in data.items()}
        evaluator = w.agree(lambda: Evaluator(model, names, targets, directions.to(dev, dtype), batches, loss_fn, bn,
                                              points_per_pass or 1, amp, hessian_iters))
        # Rank 0 calibrates and decides, so every rank takes the same path. The others wait meanwhile,
        # so calibration is weighed against one rank's share of the points: the run's wall time.
        if points_per_pass is None:
            todo = grid.num_points - (int(existing["done"].sum()) if existing else 0)
            share = -(-todo // w.size)
            evaluator.points_per_pass = w.bcast(evaluator.calibrate(points=share, log=log) if w.is_root else None)
        log(f"rank {w.rank}/{w.size} (local {w.local_rank}/{w.local_size}) on {dev}, "
            f"{torch.get_num_threads()} threads")
        stats = _run(w, evaluator, grid, path, existing, tile, schedule, writer, progress, log)
        gathered = w.gather(stats)
        if w.is_root:
            surface_file.finalize(path, _run_attrs(gathered))
    evaluator.restore()
    return surface_file.read_surface(path) if w.is_root else None


def faster_in_channels_last(model: nn.Module, x: torch.Tensor, log) -> bool:
    """Time one batch in both memory layouts; NHWC must win by 10 %. Only 4-D inputs qualify."""
    if x.dim() != 4:
        return False

    def best(inp: torch.Tensor) -> float:
        with torch.inference_mode():
            model(inp)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(inp)
                if inp.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return min(times)

    nchw = best(x)
    model.to(memory_format=torch.channels_last)
    nhwc = best(x.contiguous(memory_format=torch.channels_last))
    model.to(memory_format=torch.contiguous_format)
    log(f"layout: NCHW {1e3 * nchw:.2f} ms, NHWC {1e3 * nhwc:.2f} ms per batch -> "
        f"{'channels-last' if nhwc < 0.9 * nchw else 'contiguous'}")
    return nhwc < 0.9 * nchw


def _check_inputs(w: World, model: nn.Module, data: dict[str, Split], directions: Directions, grid: Grid, device: str,
                  threads: int | None, loss: str, dtype: torch.dtype, batch_size: int | None):
    """Device, loss function and batch size, after one tiny forward proves model, data and loss fit."""
    if grid.ndim != directions.ndim:
        raise UserError(f"the grid is {grid.ndim}-D but the directions are {directions.ndim}-D")
    dev = pin_device(w, device, threads)
    loss_fn = resolve_loss(loss)
    model.to(device=dev, dtype=dtype).eval()  # before any forward: train mode would move BN statistics
    check_outputs_fit(model, next(iter(data.values())), loss_fn, dev, dtype)
    if batch_size is None:
        batch_size = 1024 if dev.type == "cuda" else 128
    if batch_size < 1:
        raise UserError(f"`batch_size` {batch_size}: must be at least 1")
    return dev, loss_fn, batch_size


def _save_directions(directions: Directions, path: str | Path, attrs: dict) -> None:
    try:
        save_directions(directions, path, {"checkpoint_sha256": attrs.get("checkpoint_sha256", "")})
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    attrs["dir_file"] = str(path)
    attrs["dir_file_sha256"] = file_sha256(path)


def _existing(path: Path) -> dict | None:
    """The done mask and values of a resumed file (None for a fresh one)."""
    surface = surface_file.read_surface(path)
    if not surface.done.any():
        return None
    return {"done": surface.done, "values": surface.values}


def _provenance_attrs(prov: dict, directions: Directions) -> dict:
    versions = {"lsurf": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0]}
    return {
        "config": json.dumps(prov.get("config", {}), default=str),
        "directions": json.dumps(directions.meta, default=str),
        "versions": json.dumps(versions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{k: v for k, v in prov.items() if k != "config" and isinstance(v, (str, int, float))},
    }


def _run(w: World, ev: Evaluator, grid: Grid, path: Path, existing, tile, schedule,
         writer: str, progress: bool, log) -> dict:
    done = existing["done"] if existing else np.zeros(grid.shape, dtype=bool)
    done2 = done.reshape(grid.shape if grid.ndim == 2 else (1, -1))
    tiles = [t for t in grid.tiles(tile, w.size) if not done2[t.j0:t.j1, t.i0:t.i1].all()]
    todo_points = int((~done).sum())
    parallel_io = use_parallel_hdf5(w, writer)
    if w.is_root:
        log(f"{len(tiles)} tiles, {todo_points} of {grid.num_points} points to do; "
            f"writer: {'parallel HDF5 (mpio)' if parallel_io else 'rank 0'}")
    sink = _Sink(w, path, grid, tiles, parallel_io)
    queue = TileQueue(w, len(tiles), schedule)
    bar = _progress_bar(todo_points) if (progress and w.is_root) else None
    points, seconds = 0, 0.0
    wall = time.perf_counter()
    try:
        while (k := queue.next()) is not None:
            t0 = time.perf_counter()
            values, n = _evaluate_tile(ev, grid, tiles[k], done2, existing)
            seconds += time.perf_counter() - t0
            points += n
            queue.add_done(n)
            sink.put(k, values)
            if bar is not None:
                bar.update(queue.points_done() - bar.n)
        write_seconds = sink.finish()
        w.barrier()
        if bar is not None:
            bar.update(queue.points_done() - bar.n)
    finally:
        if bar is not None:
            bar.close()
    queue.close()
    return {"rank": w.rank, "points": points, "seconds": seconds, "points_per_pass": ev.points_per_pass,
            "channels_last": bool(ev.params and ev.params[0].dim() == 4
                                  and ev.params[0].is_contiguous(memory_format=torch.channels_last)),
            "write_seconds": write_seconds, "wall_seconds": time.perf_counter() - wall}


class _Sink:
    """Where finished tiles go: into the file by this rank (parallel HDF5, or a lone process), or,
    where h5py is serial, to rank 0, which writes its own tiles and those the others send."""

    def __init__(self, w: World, path: Path, grid: Grid, tiles: list[Tile], parallel_io: bool):
        self.w, self.tiles = w, tiles
        self.relay = w.comm is not None and not parallel_io  # tiles travel to rank 0
        writes_here = parallel_io or w.is_root
        self.out = surface_file.TileWriter(path, grid, w.comm if parallel_io else None) if writes_here else None
        self.sends = []  # non-blocking, so a worker never waits while rank 0 computes
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

    def _receive(self, block: bool) -> None:
        from mpi4py import MPI

        status = MPI.Status()
        while block or self.w.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
            msg = self.w.comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if status.Get_tag() == _TAG_END:
                self.finished_ranks += 1
            else:
                k, values = msg
                self.out.write(self.tiles[k], values)
            if block:
                return


def _evaluate_tile(ev: Evaluator, grid: Grid, t: Tile, done2: np.ndarray, existing):
    """Values of every quantity over the tile; points already done keep their stored values."""
    shape = (t.j1 - t.j0, t.i1 - t.i0)
    vals = {n: np.full(shape, np.nan) for n in ev.quantities}
    if existing is not None:
        for n in ev.quantities:
            stored = existing["values"][n].reshape(grid.shape if grid.ndim == 2 else (1, -1))
            vals[n][:] = stored[t.j0:t.j1, t.i0:t.i1]
    todo = [(j, i) for j in range(t.j0, t.j1) for i in range(t.i0, t.i1) if not done2[j, i]]
    for (j, i), result in zip(todo, ev.evaluate_many([grid.coords(j, i) for j, i in todo])):
        for n, v in result.items():
            vals[n][j - t.j0, i - t.i0] = v
    if grid.ndim == 1:
        vals = {n: v[0] for n, v in vals.items()}
    return vals, len(todo)


def _progress_bar(total: int):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit="pt", desc="lsurf", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30, smoothing=0.1)


def _run_attrs(gathered: list[dict]) -> dict:
    points = np.array([g["points"] for g in gathered])
    seconds = np.array([g["seconds"] for g in gathered])
    total = int(points.sum())
    return {
        "rank_points": points, "rank_seconds": seconds,
        "rank_write_seconds": np.array([g["write_seconds"] for g in gathered]),
        "wall_seconds": float(max(g["wall_seconds"] for g in gathered)),
        "eval_seconds_total": float(seconds.sum()),
        "eval_seconds_per_point": float(seconds.sum() / total) if total else float("nan"),
        "points_per_pass": int(gathered[0]["points_per_pass"]),
        "channels_last": int(gathered[0]["channels_last"]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
