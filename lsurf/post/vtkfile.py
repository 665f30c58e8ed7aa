"""``lsurf vtk``: a surface as a VTK XML structured grid (``.vts``) for ParaView.

The chosen quantity is the height z (``log``: log10 of it; ``zmax`` clips), and every quantity
plus ``done`` is point data, NaN kept, so ParaView can colour by accuracy on a loss-shaped surface.
A 1-D file becomes a single row of points (nx × 1 × 1). ``interp`` K refines each axis K-fold by
linear interpolation (K·(n−1)+1 points), smoothing the look of a coarse grid without new samples.
Written by hand (XML with base64 arrays): no VTK library is needed to make the file, only to read it.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import numpy as np

from lsurf.engine.formats.surface_file import PLANE, Surface, View
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError


def refine(x: np.ndarray, values: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``values`` along ``axis`` onto a K-fold finer ``x``."""
    fine = np.linspace(x[0], x[-1], k * (len(x) - 1) + 1) if len(x) > 1 else x
    moved = np.moveaxis(values, axis, -1)
    out = np.apply_along_axis(lambda v: np.interp(fine, x, v), -1, moved)
    return fine, np.moveaxis(out, -1, axis)


def write_vtk(surface: Surface, path: str | Path | None = None, quantity: str = "train_loss", *, log: bool = False,
              zmax: float | None = None, interp: int = 1) -> Path:
    """Write the ``.vts`` file (default: beside the surface file, ``NAME.vts``) and return its path."""
    view = surface.view("VTK")
    path = Path(surface.path).with_suffix(".vts") if path is None else Path(path)
    if quantity not in surface.values:
        raise UserError(f"{surface.path!r} has no quantity {quantity!r} (it has: {', '.join(sorted(surface.values))})")
    if interp < 1:
        raise UserError(f"`interp` {interp}: must be at least 1")
    x, y, fields = _rows(view)
    if interp > 1:
        for axis, coords in ((1, "x"), (0, "y")):
            if (len(x) if coords == "x" else len(y)) < 2:
                continue
            for n in list(fields):
                new, fields[n] = refine(x if coords == "x" else y, fields[n], interp, axis)
            x, y = (new, y) if coords == "x" else (x, new)
    z = fields[quantity].copy()
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(z)
    if zmax is not None:
        z = np.minimum(z, zmax)
    z = np.where(np.isfinite(z), z, np.nanmin(z[np.isfinite(z)]) if np.isfinite(z).any() else 0.0)
    X, Y = np.meshgrid(x, y)  # (ny, nx); VTK runs x fastest, exactly this C order
    points = np.column_stack([X.ravel(), Y.ravel(), z.ravel()])
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(_xml(len(x), len(y), points, fields))
    return path


def _rows(view: View) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """x, y and every field as (ny, nx) rows: a curve is one row at y = 0. A coarse-to-fine surface
    is filled in; ``computed`` marks what was measured."""
    fields = {n: np.where(view.done, v, np.nan).astype(float) for n, v in view.values.items()}
    fields["done"] = view.done.astype(float)
    if view.computed is not None:
        fields["computed"] = view.computed.astype(float)
    x = view.x
    y = view.y if view.kind == PLANE else np.array([0.0])  # a curve is the row β = 0, as inside lsurf (Grid)
    return x, y, {n: v.reshape(len(y), len(x)) for n, v in fields.items()}


def _xml(nx: int, ny: int, points: np.ndarray, fields: dict[str, np.ndarray]) -> str:
    """The XML text; arrays are base64 binary (VTK's ASCII reader cannot parse NaN)."""
    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"

    def encoded(a: np.ndarray) -> str:
        raw = np.ascontiguousarray(a, dtype="<f8").tobytes()
        return base64.b64encode(struct.pack("<I", len(raw)) + raw).decode()  # UInt32 byte count, then data

    arrays = "\n".join(
        f'        <DataArray type="Float64" Name="{n}" format="binary">{encoded(v)}</DataArray>'
        for n, v in fields.items())
    return f"""<?xml version="1.0"?>
<VTKFile type="StructuredGrid" version="1.0" byte_order="LittleEndian" header_type="UInt32">
  <StructuredGrid WholeExtent="{extent}">
    <Piece Extent="{extent}">
      <PointData>
{arrays}
      </PointData>
      <Points>
        <DataArray type="Float64" NumberOfComponents="3" format="binary">{encoded(points)}</DataArray>
      </Points>
    </Piece>
  </StructuredGrid>
</VTKFile>
"""
