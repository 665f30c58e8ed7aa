"""Streaming's own ceiling, and what it costs next to a model, measured in one run on this machine.

1. **Ceiling** (no model): batches per second of one pass of a streamed split (``Streamed`` over an
   ``npy:`` store, the default loader workers for the device, after one warm-up pass; best of 3) for
   digits-shaped batches (1x8x8 float32, 128) and ResNet-20-sized CIFAR batches (3x32x32 float32, 128
   and 1024), next to iterating the same batches held resident. On a GPU the ceiling includes the
   host-to-device copy, and the **consumption** line gives ResNet-20's forwards per second on resident
   batches there: streaming keeps up while ceiling / consumption > 1.
2. **Cost**: the digits CNN through ``lsurf surface`` at one torch thread, ``--resident never`` over
   ``--resident always``, from a 50,000-row ``npy:`` store of synthetic 1x8x8 images, per point from
   the files' ``eval_seconds_per_point`` (start-up left out), runs alternated, the best of 3 each.
   Target: streamed <= 1.15x resident.

Run: ``python bench/bench_stream.py [--smoke] [--device cpu|cuda]``; ``--smoke`` (small stores, one
pass, a 2-point curve) runs in seconds and checks the bench itself, not the targets. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsurf.engine.data.batches import Streamed, resident_batches  # noqa: E402
from lsurf.engine.data.splits import load_data  # noqa: E402
from lsurf.engine.data.stores import save_store  # noqa: E402
from lsurf.engine.model.models import build_model  # noqa: E402
from lsurf.run.runtime import configure_process  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TARGET = 1.15


def make_store(path: Path, rows: int, shape: tuple[int, ...]) -> str:
    """A synthetic ``npy:`` store of ``rows`` float32 images of ``shape`` and int64 labels."""
    g = np.random.default_rng(0)
    x = g.standard_normal((rows, *shape), dtype=np.float32)
    save_store(f"npy:{path}", {"train": (x, g.integers(0, 10, rows))})
    return f"npy:{path}"


def timed_pass(feed, sync) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in feed)
    sync()
    return n / (time.perf_counter() - start)


def ceiling(spec: str, batch: int, dev: torch.device, workers: int, rounds: int) -> dict:
    """Batches per second of the store's train split streamed, and resident, with nothing consuming them."""
    split = load_data(spec)["train"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    feed = Streamed(split, batch, dev, torch.float32, workers=workers)
    timed_pass(feed, sync)  # starts the workers, warms the page cache
    streamed = max(timed_pass(feed, sync) for _ in range(rounds))
    held = resident_batches(split, batch, dev, torch.float32)
    resident = max(timed_pass(held, sync) for _ in range(rounds))
    x = held[0][0]
    mb = x.numel() * x.element_size() / 1e6
    return {"shape": "x".join(map(str, x.shape[1:])), "batch": batch, "batches": len(held), "workers": workers,
            "streamed_per_s": streamed, "streamed_MB_per_s": streamed * mb, "resident_per_s": resident}


def consumption(batch: int, dev: torch.device, n: int) -> float:
    """ResNet-20 forwards per second on resident 3x32x32 batches of ``batch`` on ``dev``."""
    model = build_model("resnet20", (3, 32, 32), 10).to(dev).eval()
    x = torch.randn(batch, 3, 32, 32, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(x)
        sync()
        start = time.perf_counter()
        for _ in range(n):
            model(x)
        sync()
    return n / (time.perf_counter() - start)


def per_point(spec: str, resident: str, points: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "lsurf", "surface", "--model", "cnn", "--data", spec, "--x", f"-1:1:{points}",
           "--resident", resident, "--threads", "1", "--points-per-pass", "1", "--no-progress", "--overwrite",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)
    with h5py.File(out) as f:
        assert str(f.attrs["streamed"]) == ("train" if resident == "never" else ""), f.attrs["streamed"]
        return float(f.attrs["eval_seconds_per_point"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small stores, one pass: checks the bench, not the targets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=50_000, help="rows of the digits-shaped store (default 50,000)")
    args = ap.parse_args()
    dev = configure_process(device=args.device, threads=1)  # lsurf's threads and malloc policy, as the CLI's
    workers = 2 if dev.type == "cuda" else 1  # lsurf's default loader workers for the device
    rows, cifar_rows = (2_000, 2_048) if args.smoke else (args.rows, 10_240)
    rounds, points = (1, 2) if args.smoke else (3, 5)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        digits = make_store(Path(tmp) / "digits", rows, (1, 8, 8))
        cifar = make_store(Path(tmp) / "cifar", cifar_rows, (3, 32, 32))
        ceilings = [ceiling(digits, 128, dev, workers, rounds),
                    *(ceiling(cifar, b, dev, workers, rounds) for b in (128, 1024))]
        held, streamed = float("inf"), float("inf")
        for _ in range(rounds):  # alternated, the best of each: load on this shared machine hits both alike
            held = min(held, per_point(digits, "always", points, Path(tmp) / "held.h5"))
            streamed = min(streamed, per_point(digits, "never", points, Path(tmp) / "streamed.h5"))
    consumed = {b: consumption(b, dev, 1 if args.smoke or dev.type == "cpu" else 50)
                for b in ((128,) if args.smoke else (128, 1024))}
    ratio = streamed / held
    print(f"{dev}, 1 torch thread, {workers} loader worker(s) where lsurf would use them; load before "
          f"{load_before[0]:.2f}{'  (smoke: figures not meaningful)' if args.smoke else ''}")
    for c in ceilings:
        print(f"ceiling {c['shape']:>7} batch {c['batch']:>4} ({c['batches']:>3} batches): streamed "
              f"{c['streamed_per_s']:9.1f}/s ({c['streamed_MB_per_s']:7.1f} MB/s), "
              f"resident {c['resident_per_s']:9.1f}/s")
    for b, rate in consumed.items():
        c = next(c for c in ceilings if c["shape"] == "3x32x32" and c["batch"] == b)
        print(f"consumption: ResNet-20 forwards, batch {b:>4}, on {dev}: {rate:9.1f}/s; "
              f"streaming ceiling / consumption = {c['streamed_per_s'] / rate:.1f}")
    if dev.type != "cuda":
        print("(no GPU measured: run with --device cuda where one is lent)")
    print(f"digits CNN from {rows} npy rows, per point: streamed {streamed * 1e3:.1f} ms / resident "
          f"{held * 1e3:.1f} ms = {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'})")
    print(json.dumps({"bench": "stream", "device": str(dev), "smoke": args.smoke, "load_before": load_before,
                      "ceilings": ceilings, "consumption_per_s": consumed,
                      "cnn": {"rows": rows, "streamed_s": streamed, "resident_s": held, "ratio": ratio}}))


if __name__ == "__main__":
    main()
