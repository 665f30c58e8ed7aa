"""What ``lsurf info`` prints of a surface file: provenance, coverage, the state of a running job,
each quantity's range, the planes' fidelity and the run's statistics, one line per item."""

from __future__ import annotations

import json

import numpy as np

from lsurf.engine.curvature import fidelity
from lsurf.engine.evaluation.quantities import is_error
from lsurf.engine.formats.progress import job_state
from lsurf.engine.formats.surface_file import Surface, View


def describe(surface: Surface) -> list[str]:
    """Human-readable provenance and coverage of ``surface``, one line per item (what ``lsurf info`` prints)."""
    done = int(surface.done.sum())
    lines = [
        f"{'file:':<20}{surface.path}" + ("  (written by Li et al.'s loss-landscape)" if surface.reference else ""),
        f"{'grid:':<20}{_grid_line(surface.view())}",
        f"{'coverage:':<20}{done}/{surface.done.size} points done ({100 * done / surface.done.size:.1f} %)",
        f"{'state:':<20}{job_state(surface).line()}",
        *surface.accounting(),
    ]
    for name, v in sorted(surface.values.items()):
        if is_error(name):
            continue
        ok = v[surface.done]
        bad = int((~np.isfinite(ok)).sum())
        fin = ok[np.isfinite(ok)]
        rng = f"min {fin.min():.6g}, max {fin.max():.6g}" if fin.size else "no finite values"
        flag = f"  ({bad} points non-finite: overflow)" if bad else ""
        lines.append(f"{name + ':':<19} {rng}{flag}")  # a space after the longest names too
    lines += _fidelity_lines(surface)
    for key in ("model", "data", "checkpoint", "checkpoint_sha256", "model_seed", "model2", "curve", "barrier_line",
                "barrier_curve", "sharpness", "sharpness_stderr", "centre_loss", "dir_file", "dir_file_sha256",
                "mpi_ranks", "launcher", "world_size", "rank_layout", "streamed", "created", "finished",
                "eval_seconds_total", "eval_seconds_per_point"):
        if key in surface.attrs and surface.attrs[key] != "":
            lines.append(f"{key + ':':<19} {surface.attrs[key]}")
    for key in ("geometry", "sharpness_spec", "directions", "plan", "versions"):
        if key in surface.attrs:
            lines.append(f"{key + ':':<19} {surface.attrs[key]}")
    if "rank_points" in surface.attrs:
        pts, secs = surface.attrs["rank_points"], surface.attrs["rank_seconds"]
        held = surface.attrs.get("rank_weights", [None] * len(pts))  # since the model may be sharded
        per_rank = (f"{r}: {p} pts {t:.1f} s" + ("" if w is None else f" {w:,} weights")
                    for r, (p, t, w) in enumerate(zip(pts, secs, held)))
        lines.append(f"{'ranks:':<20}" + ", ".join(per_rank))
    if "config" in surface.attrs:
        lines.append(f"{'config:':<20}{json.dumps(json.loads(surface.attrs['config']), sort_keys=True)}")
    return lines


def _grid_line(view: View) -> str:
    """``17 x 13 points in each of 3 planes, x [-1, 1], y [-1, 1]``: each axis's size and range."""
    planes = view.planes
    shape = " x ".join(str(len(a.coords)) for a in view.plane_axes) + " points"
    shape += "" if planes is None else f" in each of {planes} planes"
    ranges = (f"{a.name} [{a.coords.min():g}, {a.coords.max():g}]" + " (the planes)" * (k == 2)  # a grid's third
              for k, a in enumerate(view.axes))
    return f"{shape}, {', '.join(ranges)}"


def _fidelity_lines(surface: Surface) -> list[str]:
    fid = surface.fidelity
    if fid is not None:
        return fidelity.describe(fid, surface.centre_curvatures(fid.split))
    note = surface.attrs.get("fidelity_note")
    return [f"{'plane fidelity:':<20}{note}"] if note else []
