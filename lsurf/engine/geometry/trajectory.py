"""PCA directions of a training trajectory (Li et al. §7) and the path projected onto them.

Random directions in a million-dimensional space are nearly orthogonal to any optimisation path,
so the path is invisible on a random plane. The top two principal components of the checkpoints'
offsets θ_t − θ_final span the plane the path actually moves in; the explained variance says how
much of it that plane captures, and each checkpoint's distance off the plane says what is lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from lsurf._version import __version__
from lsurf.engine.geometry.directions import Directions, save_directions, target_tensors
from lsurf.engine.io import atomic_write, file_sha256
from lsurf.engine.model.models import load_checkpoint, load_model
from lsurf.errors import UserError


@dataclass
class Projection:
    """Where each checkpoint lies in the PCA plane (α, β) and how far off it."""

    x: np.ndarray
    y: np.ndarray
    distance: np.ndarray
    labels: list[str]
    explained_variance: np.ndarray  # ratios of the two components

    def save(self, path: str | Path) -> None:
        with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
            f["proj_x"], f["proj_y"], f["distance"] = self.x, self.y, self.distance
            f["labels"] = np.array(self.labels, dtype=h5py.string_dtype())
            f.attrs["explained_variance"] = self.explained_variance
            f.attrs["lsurf_version"] = __version__


def _offsets(names: list[str], centre: list[torch.Tensor], state: dict[str, torch.Tensor], ignore: str):
    """θ_t − θ_final as one flat float64 vector; ≤1-D tensors zeroed with ignore=biasbn."""
    parts = []
    for n, w in zip(names, centre):
        d = state[n].double() - w.double() if w.is_floating_point() else torch.zeros(w.numel(), dtype=torch.float64)
        if ignore == "biasbn" and w.dim() <= 1:
            d = torch.zeros_like(d)
        parts.append(d.reshape(-1))
    return torch.cat(parts).numpy()


def pca_directions(model: nn.Module, states: list[dict[str, torch.Tensor]], labels: list[str],
                   dir_type: str = "weights", ignore: str = "biasbn") -> tuple[Directions, Projection]:
    """Top-2 principal directions of the offsets of ``states`` from the model's weights (θ_final).

    PCA is done through the T×T Gram matrix of the centred offsets, so memory stays at the
    offsets themselves however many parameters the model has.
    """
    if len(states) < 3:
        raise UserError(f"a trajectory needs at least 3 checkpoints, got {len(states)}")
    names, centre = target_tensors(model, dir_type)
    offsets = np.stack([_offsets(names, centre, s, ignore) for s in states])
    centred = offsets - offsets.mean(0)
    eigval, eigvec = np.linalg.eigh(centred @ centred.T)
    order = np.argsort(eigval)[::-1][:2]
    if eigval[order[1]] <= 1e-12 * max(eigval[order[0]], 1e-300):
        raise UserError("the checkpoints do not span two dimensions (are they all the same model?)")
    comps = (centred.T @ eigvec[:, order]) / np.sqrt(eigval[order])  # unit-norm principal directions
    px, py = offsets @ comps[:, 0], offsets @ comps[:, 1]
    distance = np.linalg.norm(offsets - np.outer(px, comps[:, 0]) - np.outer(py, comps[:, 1]), axis=1)
    ratio = eigval[order] / eigval[eigval > 0].sum()
    dirs = Directions(names, _unflatten(comps[:, 0], centre), _unflatten(comps[:, 1], centre),
                      {"source": "pca", "dir_type": dir_type, "ignore": ignore,
                       "explained_variance": ratio.tolist(), "checkpoints": labels})
    return dirs, Projection(px, py, distance, labels, ratio)


def _unflatten(vec: np.ndarray, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, k = [], 0
    for w in like:
        n = w.numel()
        dtype = w.dtype if w.is_floating_point() else torch.float32
        out.append(torch.from_numpy(vec[k : k + n].copy()).reshape(w.shape).to(dtype))
        k += n
    return out


def checkpoint_paths(items: list[str], pattern: str) -> list[Path]:
    """Files as given, or a folder's files matching ``pattern`` in natural order (model_2 < model_10)."""
    if len(items) == 1 and Path(items[0]).is_dir():
        def natural(p: Path):
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
        paths = sorted(Path(items[0]).glob(pattern), key=natural)
        if not paths:
            raise UserError(f"no checkpoint matches {pattern!r} in {items[0]!r}")
        return paths
    return [Path(p) for p in items]


def covering_grid(proj: Projection, points: int = 31) -> str:
    """Grid options that frame the whole path with a 10 % margin."""
    def axis(v: np.ndarray) -> str:
        lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
        pad = 0.1 * (hi - lo) or 1.0
        return f"{lo - pad:.3g}:{hi + pad:.3g}:{points}"

    return f"--x={axis(proj.x)} --y={axis(proj.y)}"


def trajectory_directions(model_name: str, paths: list[Path], centre: Path | None = None,
                          data_shape: tuple[tuple[int, ...], int] | None = None, dir_type: str = "weights",
                          ignore: str = "biasbn") -> tuple[Directions, Projection, Path]:
    """PCA directions of the checkpoints at ``paths`` (training order) around ``centre`` (default:
    the last), and the path projected onto them. ``data_shape`` (input shape, outputs) sizes zoo
    models that need it. Returns the directions, the projection and the centre's path."""
    centre_path = centre or paths[-1]
    shape, outputs = data_shape or (None, None)
    model = load_model(model_name, shape, outputs, centre_path)
    states = []
    for path in paths:
        probe = load_model(model_name, shape, outputs)
        load_checkpoint(probe, path)  # a checkpoint of another architecture fails here, by name
        states.append(probe.state_dict())
    dirs, proj = pca_directions(model, states, [str(p) for p in paths], dir_type, ignore)
    return dirs, proj, centre_path


def save_trajectory(dirs: Directions, proj: Projection, centre: Path, dir_out: str | Path,
                    proj_out: str | Path) -> None:
    """The direction file (for ``lsurf surface --dir-file``) and the projection (for ``plot --trajectory``)."""
    save_directions(dirs, dir_out, {"checkpoint": str(centre), "checkpoint_sha256": file_sha256(centre)})
    proj.save(proj_out)
