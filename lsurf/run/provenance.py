"""What a surface was made from — by name and by hash — built once per run: the file's provenance
attributes and the identity an existing file must match to be resumed."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from lsurf._version import __version__
from lsurf.engine.data.splits import AnySplit
from lsurf.engine.geometry.directions import AnyDirections, markers
from lsurf.engine.io import file_sha256
from lsurf.run.options import Options
from lsurf.run.runtime import float32_precision

# Identity entries older files lack (not recorded then: not a mismatch when resuming one).
RECORDED_SINCE = ("float32_precision", "gpu_model", "cuda_version", "cudnn_version")


def computing(dev: torch.device) -> dict[str, str]:
    """What the values depend on besides the inputs: the float32 precision in force on ``dev``'s
    type and, on a GPU, its model and the CUDA and cuDNN versions (kernels, and so the last bits,
    differ between them)."""
    out = {"float32_precision": float32_precision(dev.type)}
    if dev.type == "cuda":
        out.update(gpu_model=torch.cuda.get_device_name(dev), cuda_version=str(torch.version.cuda),
                   cudnn_version=str(torch.backends.cudnn.version()))
    return out


def device_versions() -> dict[str, str]:
    """The GPU, CUDA and cuDNN this process computes with (empty without CUDA), and its float32 mode."""
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device()
    return {"gpu": torch.cuda.get_device_name(dev), "cuda": str(torch.version.cuda),
            "cudnn": str(torch.backends.cudnn.version()), "float32": float32_precision()}


@dataclass(frozen=True)
class Provenance:
    """The inputs of a run by name (and the files by SHA-256); empty strings where a notebook call
    passed objects rather than names. ``config`` is the whole option set, for the record."""

    model: str = ""
    data: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    subset: int | None = None
    model_seed: int | None = None  # the seed a model without checkpoint was drawn from
    dir_file: str = ""
    dir_file_sha256: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, options: Options) -> Provenance:
        """Provenance of a run described by ``options``: the checkpoint and direction file hashed."""
        return cls(model=options.model, data=options.data or "", checkpoint=options.checkpoint or "",
                   checkpoint_sha256=file_sha256(options.checkpoint) if options.checkpoint else "",
                   subset=options.subset, model_seed=None if options.checkpoint else options.seed,
                   config=options.as_dict()).with_dir_file(options.dir_file)

    def with_dir_file(self, path: str | Path | None) -> Provenance:
        """The same, with the direction file the run reads (or has just written)."""
        if not path:
            return self
        return replace(self, dir_file=str(path), dir_file_sha256=file_sha256(path))

    def identity(self, planes: list[AnyDirections], data: dict[str, AnySplit], options: Options,
                 fingerprints: bool = True, device: torch.device | None = None) -> dict[str, Any]:
        """What an existing file must have been made with to be resumed: the inputs, every option
        that changes values and what computes them on ``device`` (:func:`computing`). ``planes``:
        the directions of each plane (one, unless an ensemble). Fingerprinting the data is costly:
        ``fingerprints`` False (ranks other than the one that checks) leaves it out."""
        hashes = [d.sha256() for d in planes]
        directions = planes[0]
        return {
            "model": self.model, "checkpoint_sha256": self.checkpoint_sha256, "model_seed": self.model_seed,
            "splits": list(data),
            "subset": self.subset, "directions_sha256": hashes[0] if len(hashes) == 1 else hashes,
            "data_sha256": {s: split.fingerprint() for s, split in data.items()} if fingerprints else None,
            "loss": options.loss, "dtype": options.dtype, "bn": options.bn,
            "dir_type": directions.meta.get("dir_type", "weights"), "amp": options.amp == "bf16",
            "hessian_iters": options.hessian_iters, "seq_len": options.seq_len, "ignore_index": options.ignore_index,
            "output": options.output, **(computing(device) if device is not None else {}),
            **({"metrics": list(options.metric)} if options.metric else {}),  # absent before plug-in metrics
            # a pass stopped early gives other values, and which samples it saw follows the seed
            **({"tolerance": options.tolerance, "min_samples": options.min_samples, "sample_order_seed": options.seed}
               if options.tolerance else {}),
        }

    def attrs(self, planes: list[AnyDirections], ranks: int) -> dict[str, Any]:
        """The file's provenance attributes; an ensemble's ``directions`` lists each plane's."""
        metas = [d.meta for d in planes]
        versions = {"lsurf": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
                    "numpy": np.__version__, "python": sys.version.split()[0], **device_versions()}
        out: dict[str, Any] = {
            "config": json.dumps(self.config, default=str), "model": self.model, "data": self.data,
            "checkpoint": self.checkpoint, "checkpoint_sha256": self.checkpoint_sha256, "mpi_ranks": ranks,
            "markers": json.dumps(markers(metas[0])),
            "directions": json.dumps(metas[0] if len(metas) == 1 else metas, default=str),
            "versions": json.dumps(versions), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.model_seed is not None:
            out["model_seed"] = self.model_seed
        if self.dir_file:
            out.update(dir_file=self.dir_file, dir_file_sha256=self.dir_file_sha256)
        return out
