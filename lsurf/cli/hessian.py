"""``lsurf hessian``: top Hessian eigenvalues, trace and eigenvalue density at the checkpoint."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.hessian import save_spectrum
from lsurf.run.curvature import hessian_spectrum
from lsurf.run.runtime import configure_process
from lsurf.run.world import World

HELP = "top Hessian eigenvalues, trace and eigenvalue density at the checkpoint"
_EXTRA = {"top_k": 5, "trace_samples": 50, "density": False, "iters": 100, "out": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p, split_help="the split whose loss is differentiated: train or test")
    common.add_device(p)
    g = p.add_argument_group("spectrum")
    g.add_argument("--top-k", type=int, default=argparse.SUPPRESS, help="eigenvalues to report (default 5)")
    g.add_argument("--trace-samples", type=int, default=argparse.SUPPRESS, help="Hutchinson samples (0: skip; 50)")
    g.add_argument("--density", action="store_true", default=argparse.SUPPRESS,
                   help="also the eigenvalue density (SLQ)")
    g.add_argument("--iters", type=int, default=argparse.SUPPRESS, help="Lanczos steps (default 100)")
    g.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the random start vectors (0)")
    g.add_argument("--out", default=argparse.SUPPRESS, help="HDF5 file for the results")


def run(args: argparse.Namespace) -> int:
    values = common.merged_values(args, extra=tuple(_EXTRA))
    extra = {k: values.pop(k, default) for k, default in _EXTRA.items()}
    options = common.options_from(values)
    device = configure_process(World.of(None), options.device, options.threads, options.tf32)
    out = extra.pop("out")
    results = hessian_spectrum(options, device, **extra)
    print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in results["eigenvalues"]))
    if "trace" in results:
        print(f"trace (Hutchinson, {extra['trace_samples']} samples): {float(results['trace']):.6g}")
    if "density" in results:
        grid = results["density_grid"]
        print(f"density: {len(results['density'])} bins over [{grid[0]:.4g}, {grid[-1]:.4g}]")
    if out:
        save_spectrum(results, out, {**options.as_dict(), **extra, "out": out})
        print(f"wrote {out}")
    return 0
