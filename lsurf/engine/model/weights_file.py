"""A checkpoint read a few rows at a time: what a rank of a sharded model loads (lsurf.engine.model.sharding).

A model sharded G ways must never be held whole by one rank, so its checkpoint is not loaded but
opened: the rows [start, stop) of one tensor are read when that rank's shard of it is filled, from
a memory-mapped file (only those pages are read). Three kinds of checkpoint are opened:

- a torch file (``torch.save`` of a state dict, or ``{'state_dict': ...}`` as Li et al. save),
  mapped with ``torch.load(mmap=True)``;
- a safetensors file, read with ``safe_open``'s slices;
- a folder written by Hugging Face's ``save_pretrained``: ``model.safetensors`` or
  ``pytorch_model.bin``, or a sharded set of either with its ``*.index.json``.

Names are as in the file, less the ``module.`` prefix ``nn.DataParallel`` adds to every key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from lsurf.errors import UserError

_TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


class WeightsFile:
    """The tensors of a checkpoint by name, each readable by rows without reading the rest.

    Use as a context manager (``with open_weights(path) as f:``): the files stay open, mapped,
    until it ends."""

    def __init__(self, path: Path, sources: dict[str, Any], shapes: dict[str, tuple[int, ...]], stack: ExitStack):
        self.path, self._sources, self._shapes, self._stack = path, sources, shapes, stack

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or its rows ``rows`` along dim 0: a copy in memory of those rows alone."""
        source = self._sources[name]
        if isinstance(source, torch.Tensor):  # a mapped torch tensor: slicing reads only those pages
            return (source if rows is None or source.dim() == 0 else source[rows]).clone()
        handle, key = source
        if rows is None or len(self._shapes[name]) == 0:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows.start:rows.stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes


def open_weights(path: str | Path) -> WeightsFile:
    """The checkpoint at ``path`` (a torch or safetensors file, or a ``save_pretrained`` folder), opened."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    files = _files_of(path) if path.is_dir() else [path]
    stack = ExitStack()
    sources: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for f in files:
            opened = _open_safetensors(f, stack) if f.suffix == ".safetensors" else _open_torch(f)
            for name, (source, shape) in opened.items():
                sources[name], shapes[name] = source, shape
    except BaseException:
        stack.close()
        raise
    if sources and all(k.startswith("module.") for k in sources):  # saved from nn.DataParallel
        sources = {k[len("module."):]: v for k, v in sources.items()}
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    return WeightsFile(path, sources, shapes, stack)


def _files_of(folder: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder, safetensors first (as transformers prefers)."""
    for single, index in (_SAFETENSORS_FILES, _TORCH_FILES):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"checkpoint {str(folder)!r}: {index} is not an index of weight files ({e})") from None
            return [folder / name for name in dict.fromkeys(weight_map.values())]
        if (folder / single).is_file():
            return [folder / single]
    raise UserError(f"checkpoint {str(folder)!r}: a folder without weights (expected one of "
                    f"{', '.join(_SAFETENSORS_FILES + _TORCH_FILES)})")


def _open_safetensors(f: Path, stack: ExitStack) -> dict[str, tuple[Any, tuple[int, ...]]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError(f"checkpoint {str(f)!r} is a safetensors file: pip install safetensors") from None
    if not f.is_file():
        raise UserError(f"checkpoint {str(f)!r} does not exist")
    try:
        handle = stack.enter_context(safe_open(str(f), framework="pt"))
    except Exception as e:
        raise UserError(f"checkpoint {str(f)!r} is not a readable safetensors file ({_first_line(e)})") from None
    return {k: ((handle, k), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}


def _open_torch(f: Path) -> dict[str, tuple[Any, tuple[int, ...]]]:
    if not f.is_file():
        raise UserError(f"checkpoint {str(f)!r} does not exist")
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # a file of torch's legacy (pre-1.6) format cannot be mapped: read whole
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"checkpoint {str(f)!r} is not a readable torch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {str(f)!r} holds no state dict of tensors")
    return {k: (v, tuple(v.shape)) for k, v in obj.items()}


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
