"""How long a worker waits for a tile while rank 0 computes, with rank 0's progress thread off and on.

Across nodes on fabrics without hardware atomics, the tile queue's ``Fetch_and_op`` on rank 0's
window goes through Open MPI's ``osc/rdma`` over ``btl/tcp`` and completes only when rank 0 enters
MPI (see lsurf.run.transport._Progress). One machine reproduces that with
``--mca osc ^sm --mca btl self,tcp``; the default MCA (``osc/sm``, atomics in shared memory) is
shown for reference.

Each run is ``mpirun -n 2`` on this file: rank 0 makes a TileQueue of 200 tiles, takes one, then
computes for 3 s without calling MPI (torch matmuls, one thread), then takes tiles with no work
until the queue is empty. Rank 1 takes tiles, with 10 ms of work each, and times every
``queue.next()``. With the progress thread, rank 1 should take nearly all tiles while rank 0
computes, each wait well under a tile's work; without it, rank 1's first wait lasts rank 0's whole
computation, and rank 0 then takes most of the queue. The thread's cost to rank 0 is measured
apart, in one process with no other rank busy: matmuls per second with a progress thread running
and without, alternately over 10 rounds of 0.5 s (median of each).

Run: ``python bench/bench_tile_wait.py [--smoke]``; the last line is JSON. ``--smoke``: 20 tiles of
2 ms, 0.3 s of compute, 2 rounds of 0.05 s for the thread's cost (seconds; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    tiles: int = 200
    compute: float = 3.0  # seconds rank 0 computes without MPI
    work: float = 0.010  # seconds of work per tile on rank 1
    rounds: int = 10  # of the thread's cost, each ``slice`` seconds with the thread and without
    slice: float = 0.5


SMOKE = Sizes(tiles=20, compute=0.3, work=0.002, rounds=2, slice=0.05)
TCP = ["--mca", "osc", "^sm", "--mca", "btl", "self,tcp"]


def rank_main(progress: bool, sizes: Sizes) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from lsurf.run import transport
    from lsurf.run.world import World

    torch.set_num_threads(1)
    transport._PROGRESS_THREAD = progress
    w = World.of(MPI.COMM_WORLD)
    queue = transport.TileQueue(w, sizes.tiles)
    waits, tiles, matmuls = [], 0, 0
    t_start = time.perf_counter()
    if w.is_root:
        queue.next()
        tiles += 1
        a = torch.randn(256, 256)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < sizes.compute:
            a = torch.tanh(a @ a)
            matmuls += 1
    while True:
        t0 = time.perf_counter()
        k = queue.next()
        waits.append(time.perf_counter() - t0)
        if k is None:
            break
        tiles += 1
        if not w.is_root:
            time.sleep(sizes.work)
    finished = time.perf_counter() - t_start
    rows = w.gather({"rank": w.rank, "tiles": tiles, "finished": finished, "matmuls": matmuls,
                     "longest": max(waits), "median": float(np.median(waits)), "note": queue.progress_note})
    queue.close()
    if w.is_root:
        print(json.dumps(rows))


def overhead(sizes: Sizes) -> float:
    """Rank 0's compute rate with the progress thread over without it (1.0: no cost)."""
    import numpy as np
    import torch
    from mpi4py import MPI  # noqa: F401  (initialises MPI for a singleton run)

    from lsurf.run import transport

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(sizes.rounds):
        for on in (False, True):
            progress = transport._Progress() if on else None
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < sizes.slice:
                a = torch.tanh(a @ a)
                n += 1
            rates[on].append(n / (time.perf_counter() - t0))
            if progress is not None:
                progress.stop()
    return float(np.median(rates[True]) / np.median(rates[False]))


def measure(mca: list[str], progress: bool, sizes: Sizes) -> dict:
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root", *mca,
           sys.executable, __file__, "--rank", "on" if progress else "off", "--sizes", json.dumps(asdict(sizes))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=300)
    root, worker = json.loads(p.stdout.strip().splitlines()[-1])
    return {"mca": " ".join(mca) or "default", "progress_thread": progress, "worker_longest": worker["longest"],
            "worker_median": worker["median"], "worker_tiles": worker["tiles"], "worker_finished": worker["finished"],
            "root_matmuls": root["matmuls"], "note": root["note"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    ap.add_argument("--rank", choices=["on", "off"], help=argparse.SUPPRESS)  # one rank of a measured job
    ap.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)  # the thread's cost, alone
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = Sizes(**json.loads(args.sizes)) if args.sizes else SMOKE if args.smoke else Sizes()
    if args.rank:
        rank_main(args.rank == "on", sizes)
    elif args.overhead:
        print(overhead(sizes))
    else:
        report(sizes)


def report(sizes: Sizes) -> None:
    """Both MCA settings with the thread off and on, and the thread's cost: the table and JSON."""
    load_before = os.getloadavg()
    rows = [measure(mca, progress, sizes) for mca in (TCP, []) for progress in (False, True)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cost = float(subprocess.run([sys.executable, __file__, "--overhead", "--sizes", json.dumps(asdict(sizes))],
                                check=True, capture_output=True, text=True, env=env, timeout=120).stdout.split()[-1])
    print(f"2 ranks; rank 0 computes {sizes.compute:g} s without MPI after its first tile; rank 1 works "
          f"{sizes.work * 1e3:g} ms per tile; {sizes.tiles} tiles; load before {load_before[0]:.2f}")
    print(f"{'MCA':<28} {'thread':>6} {'longest s':>10} {'median ms':>10} {'rank 1 tiles':>12} "
          f"{'rank 1 done s':>13} {'rank 0 matmuls':>14}")
    for r in rows:
        print(f"{r['mca']:<28} {'on' if r['progress_thread'] else 'off':>6} {r['worker_longest']:>10.3f} "
              f"{1e3 * r['worker_median']:>10.3f} {r['worker_tiles']:>12} {r['worker_finished']:>13.2f} "
              f"{r['root_matmuls']:>14}")
    off, on = rows[0], rows[1]
    print(f"over TCP without atomics the thread cuts rank 1's longest wait "
          f"{off['worker_longest'] / on['worker_longest']:.0f}x; rank 0's matmul rate with it / without it, "
          f"measured apart: {cost:.3f}")
    print(json.dumps({"bench": "tile_wait", "tiles": sizes.tiles, "compute_s": sizes.compute, "work_s": sizes.work,
                      "load_before": load_before, "rows": rows, "root_rate_with_thread": cost}))


if __name__ == "__main__":
    main()
