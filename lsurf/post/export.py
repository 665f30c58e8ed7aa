"""A surface in other programs' formats: Li et al.'s HDF5 layout, a Wavefront OBJ mesh, CSV.

- ``ll`` lets the reference code's own scripts (plot_2D.py, h52vtp.py) run on lsurf's output:
  its dataset names (``xcoordinates``, ``ycoordinates``, ``{split}_loss``, ``{split}_acc``,
  ``dir_file``), −1 for points not computed, and its index order — the reference allocates
  (nx, ny) but fills element ``[a, b]`` with the point ``(x[b], y[a])``, so our (ny, nx) array
  raveled and reshaped to (nx, ny) is byte for byte what it would have written
  (../shared/fixtures/README.md).
- ``obj`` is a triangle mesh for Blender or MeshLab: one vertex per grid point, the quantity
  (or its log10) as height, two triangles per grid cell; cells touching a point without a
  finite height are left out, so holes show where nothing was computed.
- ``csv`` is one row per grid point for spreadsheets and pandas.

Every format is written to ``PATH.tmp`` and renamed into place, so a failure (full disk, a
killed process) never leaves a half-written file and never damages an existing one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from lsurf.engine.formats.surface_file import CURVE, Surface, View
from lsurf.engine.io import atomic_write
from lsurf.errors import UserError
from lsurf.post.plot import values_of

FORMATS = ("ll", "obj", "csv")


def export_surface(surface: Surface, path: str | Path, fmt: Literal["ll", "obj", "csv"], *,
                   quantity: str = "train_loss", log: bool = False) -> Path:
    """Write ``surface`` to ``path`` in format ``fmt``; returns the path written.

    ``quantity`` and ``log`` choose the height of an ``obj`` mesh; ``ll`` and ``csv`` hold every
    quantity (``ll``: only losses and accuracies, the reference's quantities).
    """
    path = Path(path)
    view = surface.view("export")
    if fmt not in FORMATS:
        raise UserError(f"`fmt` {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "obj" and view.kind == CURVE:
        raise UserError(f"`fmt` 'obj' needs a 2-D surface: {surface.path!r} is 1-D (use csv for curves)")
    if not path.parent.is_dir():
        raise UserError(f"`path`: folder {str(path.parent)!r} does not exist")
    if path.exists() and path.resolve() == Path(surface.path).resolve():
        raise UserError(f"`path` {str(path)!r} is the source file itself: choose another name")
    if fmt == "ll":
        return _atomic(path, lambda tmp: _write_ll(view, tmp))
    if fmt == "obj":
        height = values_of(view, quantity)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                height = np.where(height > 0, np.log10(height), np.nan)
        if not np.isfinite(height).any():
            raise UserError(f"`quantity` {quantity!r}: no finite {'positive ' if log else ''}values to mesh")
        label = f"log10 {quantity}" if log else quantity
        return _atomic(path, lambda tmp: _write_obj(view, height, label, tmp))
    return _atomic(path, lambda tmp: _write_csv(view, tmp))


def default_export_path(source: str | Path, fmt: str) -> Path:
    """Beside the source: ``NAME_ll.h5`` (never the source itself), ``NAME.obj``, ``NAME.csv``."""
    source = Path(source)
    return source.with_name(f"{source.stem}_ll.h5") if fmt == "ll" else source.with_suffix(f".{fmt}")


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    with atomic_write(path, "path") as tmp:
        write(tmp)
    return path


def reference_layout(a: np.ndarray) -> np.ndarray:
    """Our (ny, nx) array, ``[j, i]`` at ``(x[i], y[j])``, as the reference stores it: shape (nx, ny),
    flat index ``j * nx + i``. 1-D arrays are unchanged."""
    return a if a.ndim == 1 else a.ravel().reshape(a.shape[1], a.shape[0])


def _write_ll(view: View, tmp: Path) -> None:
    """The file as stored (the reference has no interpolated points: those left out stay −1)."""
    surface = view.source
    names = [n for n in surface.values if n.endswith(("_loss", "_acc"))]
    if not names:
        raise UserError(f"`fmt` 'll': {surface.path!r} has no *_loss or *_acc quantity to export")
    with h5py.File(tmp, "w") as f:
        for label, axis in zip(("xcoordinates", "ycoordinates"), view.axes):  # a curve has no ycoordinates
            f.create_dataset(label, data=np.asarray(axis.coords, dtype=np.float64))
        for name in names:
            arr = np.where(surface.done, np.asarray(surface.values[name], dtype=np.float64), -1.0)
            f.create_dataset(name, data=reference_layout(arr))
        f["dir_file"] = str(surface.attrs.get("dir_file", ""))


def _write_obj(view: View, height: np.ndarray, label: str, tmp: Path) -> None:
    ny, nx = height.shape
    ok = np.isfinite(height)
    # Every grid point is a vertex (indices stay j * nx + i + 1); points without a height sit at the
    # lowest height and belong to no face.
    h = np.where(ok, height, np.nanmin(np.where(ok, height, np.nan)))
    X, Y = np.meshgrid(view.x, view.y)
    vertices = np.column_stack([X.ravel(), Y.ravel(), h.ravel()])
    idx = np.arange(ny * nx).reshape(ny, nx) + 1
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]  # counter-clockwise seen from +z
    cell_ok = (ok[:-1, :-1] & ok[:-1, 1:] & ok[1:, 1:] & ok[1:, :-1]).ravel()
    a, b, c, d = (v.ravel()[cell_ok] for v in (a, b, c, d))
    faces = np.column_stack([a, b, c, a, c, d]).reshape(-1, 3)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"# lsurf surface {Path(view.path).name}: vertices (alpha, beta, {label}), "
                f"{nx} x {ny} grid, {len(faces)} triangles\n")
        f.write(f"o {Path(view.path).stem}\n")
        np.savetxt(f, vertices, fmt="v %.9g %.9g %.9g")
        np.savetxt(f, faces, fmt="f %d %d %d")


def _write_csv(view: View, tmp: Path) -> None:
    """The file as stored, a row a point: its coordinates (x, and y of a plane), each quantity, done."""
    surface = view.source
    names = list(surface.values)
    done = surface.done.ravel()
    # row j * nx + i is the point (x[i], y[j]); a curve's one axis is its own grid
    coords = [c.ravel() for c in np.meshgrid(*(a.coords for a in view.axes))]
    columns = coords + [np.asarray(surface.values[n], dtype=np.float64).ravel() for n in names]
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(["x", "y"][:len(coords)] + names + ["done"]) + "\n")
        for k in range(done.size):
            cells = [repr(float(c[k])) for c in coords]
            # points not computed have empty cells: spreadsheets and pandas read them as missing
            cells += [repr(float(c[k])) if done[k] else "" for c in columns[len(coords):]]
            f.write(",".join(cells + [str(int(done[k]))]) + "\n")
