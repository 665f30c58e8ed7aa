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
from lsurf.engine.directions import DIR_TYPES, IGNORES, Directions, save_directions, target_tensors
from lsurf.engine.models import file_sha256, load_checkpoint, load_model
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
        with h5py.File(path, "w") as f:
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


def _covering_grid(proj: Projection, points: int = 31) -> str:
    """Grid options that frame the whole path with a 10 % margin."""
    def axis(v: np.ndarray) -> str:
        lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
        pad = 0.1 * (hi - lo) or 1.0
        return f"{lo - pad:.3g}:{hi + pad:.3g}:{points}"

    return f"--x={axis(proj.x)} --y={axis(proj.y)}"


def add_arguments(p) -> None:
    p.add_argument("checkpoints", nargs="+", help="checkpoint files in training order, or one folder")
    p.add_argument("--pattern", default="model_*.t7", help="with a folder: which files (natural order)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--data", help="only to size zoo models that need it (mlp, linear)")
    p.add_argument("--checkpoint", help="the centre θ_final (default: the last checkpoint)")
    p.add_argument("--dir-type", default="weights", choices=DIR_TYPES)
    p.add_argument("--ignore", default="biasbn", choices=IGNORES)
    p.add_argument("--dir-out", default="pca_directions.h5", help="direction file for lsurf surface --dir-file")
    p.add_argument("--proj-out", default="pca_projection.h5", help="projection file for lsurf plot --trajectory")


def run(args) -> int:
    from lsurf.engine.data import load_data

    paths = checkpoint_paths(args.checkpoints, args.pattern)
    centre_path = Path(args.checkpoint) if args.checkpoint else paths[-1]
    shape, outputs = None, None
    if args.data:
        split = load_data(args.data, ("train",))["train"]
        shape, outputs = tuple(split.x.shape[1:]), split.num_outputs
    model = load_model(args.model, shape, outputs, centre_path)
    states = []
    for path in paths:
        probe = load_model(args.model, shape, outputs)
        load_checkpoint(probe, path)  # a checkpoint of another architecture fails here, by name
        states.append(probe.state_dict())
    dirs, proj = pca_directions(model, states, [str(p) for p in paths], args.dir_type, args.ignore)
    save_directions(dirs, args.dir_out, {"checkpoint": str(centre_path), "checkpoint_sha256": file_sha256(centre_path)})
    proj.save(args.proj_out)
    ev = proj.explained_variance
    print(f"{len(paths)} checkpoints; explained variance PC1 {100 * ev[0]:.1f} %, PC2 {100 * ev[1]:.1f} %; "
          f"largest distance off the plane {proj.distance.max():.4g}")
    print(f"wrote {args.dir_out} (directions, centre {centre_path}) and {args.proj_out} (projection)")
    print(f"next: lsurf surface --model {args.model} --checkpoint {centre_path} --dir-file {args.dir_out} "
          f"{_covering_grid(proj)} ...; lsurf plot SURFACE --trajectory {args.proj_out}")
    return 0
