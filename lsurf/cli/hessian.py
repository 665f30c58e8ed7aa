"""``lsurf hessian``: top Hessian eigenvalues, trace and eigenvalue density at the checkpoint
(MPI-aware: under mpirun or srun the ranks share the split; rank 0 prints and writes)."""

from __future__ import annotations

import argparse

from lsurf.cli import common
from lsurf.engine.curvature.hessian import SpectrumSpec, save_results
from lsurf.run.curvature import hessian_spectrum
from lsurf.run.runtime import configure_job, start_job
from lsurf.run.sources import save_direction_file

HELP = "top Hessian eigenvalues, trace and eigenvalue density at the checkpoint"
_SPEC = common.keyword_defaults(SpectrumSpec, ("top_k", "trace_samples", "density", "iters"))
_EXTRA = {**_SPEC, "out": None, "save_directions": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common(p)
    common.add_model(p)
    common.add_data(p, split_help="the split whose loss is differentiated: train or test")
    common.add_device(p)
    g = p.add_argument_group("spectrum")
    g.add_argument("--top-k", type=int, default=argparse.SUPPRESS,
                   help=f"eigenvalues to report (default {_EXTRA['top_k']})")
    g.add_argument("--trace-samples", type=int, default=argparse.SUPPRESS,
                   help=f"Hutchinson samples (0: skip; {_EXTRA['trace_samples']})")
    g.add_argument("--density", action="store_true", default=argparse.SUPPRESS,
                   help="also the eigenvalue density (SLQ)")
    g.add_argument("--iters", type=int, default=argparse.SUPPRESS, help=f"Lanczos steps (default {_EXTRA['iters']})")
    g.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the random start vectors (0)")
    common.add_sharding(p.add_argument_group("a model larger than one device"), "every Hessian-vector product")
    g.add_argument("--out", default=argparse.SUPPRESS, help="HDF5 file for the results")
    g.add_argument("--save-directions", metavar="FILE", default=argparse.SUPPRESS,
                   help="write the top two eigenvectors (one with --top-k 1) as a direction file for "
                   "`lsurf surface --dir-file`")


def run(args: argparse.Namespace) -> int:
    w = start_job()
    values = common.merged_values(args, extra=tuple(_EXTRA))
    extra = {k: values.pop(k, default) for k, default in _EXTRA.items()}
    options = w.agree(lambda: common.options_from(values))
    out, save_to = extra.pop("out"), extra.pop("save_directions")
    spec = w.agree(lambda: SpectrumSpec(**extra, directions=bool(save_to)))
    configure_job(w, options.device, options.threads, options.tf32, keep_freed=not options.shard)
    done = hessian_spectrum(options, spec, w.comm, common.stderr_log if w.is_root else None)
    if done is None:  # not rank 0
        return 0
    results, dirs = done
    report(results, spec.trace_samples)
    if out:
        save_results(results, out, {**options.as_dict(), **extra, "out": out, "ranks": w.size})
        print(f"wrote {out}")
    if save_to and dirs is not None:
        save_direction_file(dirs, options.replace(out=save_to))
        print(f"wrote {save_to} ({dirs.ndim} eigenvector{'s' * (dirs.ndim > 1)})")
    return 0


def report(results: dict, trace_samples: int) -> None:
    """The spectrum in a few lines for people (the file holds every number)."""
    print("top eigenvalues: " + ", ".join(f"{v:.6g}" for v in results["eigenvalues"]))
    if "trace" in results:
        print(f"trace (Hutchinson, {trace_samples} samples): {float(results['trace']):.6g} "
              f"± {float(results['trace_stderr']):.2g} (standard error)")
    if "density" in results:
        grid = results["density_grid"]
        print(f"density: {len(results['density'])} bins over [{grid[0]:.4g}, {grid[-1]:.4g}]")
