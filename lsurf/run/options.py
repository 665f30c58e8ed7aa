"""The options of a run, in one frozen, validated object.

Every command and every notebook call goes through :class:`Options`: the CLI fills it from flags
and the ``--config`` job file (TOML keys are the field names, ``-`` or ``_``), and a notebook user
writes ``Options(x="-1:1:31", batch_size=256)``. The vocabularies below are the only definition of
the allowed values; argparse takes its ``choices`` from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lsurf.engine.data.batches import Residency
from lsurf.engine.geometry.directions import DirType, Ignore, Norm
from lsurf.engine.geometry.grid import TileOrder
from lsurf.engine.model.hf import is_hf
from lsurf.errors import UserError

Dtype = Literal["float32", "float64", "bfloat16"]
Layout = Literal["auto", "contiguous", "channels-last"]
BatchNorm = Literal["eval", "recalibrate"]
Amp = Literal["none", "bf16"]
Schedule = Literal["dynamic", "static"]
Writer = Literal["auto", "mpio", "root"]
Split = Literal["train", "test"]
Sharding = Literal["fsdp"]  # how a group of ranks shares the model (none: each holds it whole)
FidelityCheck = Literal["auto", "on", "off"]  # the curvature a plane sees (auto: where it is cheap)
# Where the directions come from, besides a file (`dir_file`) or other models (`model2`): seeded
# random ones, or eigenvectors of the Hessian at the centre (two for a plane, one for a curve).
DirectionSource = Literal["random", "hessian:max,max2", "hessian:max,min", "hessian:max", "hessian:min"]


def choices(vocabulary: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` vocabulary (for argparse ``choices`` and messages)."""
    return tuple(get_args(vocabulary))


@dataclass(frozen=True)
class Options:
    """Everything a surface run needs to know; defaults are the CLI's defaults.

    Groups: what to load (model, checkpoint, data, subset, split, seq_len), the directions (seed,
    norm, ignore, dir_type, same_dir, regenerate, dir_file, model2, model3, curve_plane, directions) or a
    geometry instead, the grid (x, y, planes), how to
    evaluate (loss, metric, ignore_index, output, dtype, device, threads, batch_size, points_per_pass, amp,
    tf32, layout, bn, hessian_iters, fidelity), fewer passes (budget and refine_tol: coarse-to-fine
    points; tolerance and min_samples: passes stopped once the loss is known well enough), how data
    reaches the device (resident, memory_budget, workers), how to distribute and write
    (ranks_per_point, shard, tile, tile_order, schedule, writer, out, overwrite, progress). ``None`` means
    "choose for me" where the run plan decides (batch size, points per pass, threads, budget,
    loader workers).
    """

    model: str = "cnn"
    checkpoint: str | None = None
    data: str | None = "digits"
    subset: int | None = None
    split: tuple[Split, ...] = ("train",)
    seq_len: int | None = None
    seed: int = 0
    norm: Norm = "filter"
    ignore: Ignore = "biasbn"
    dir_type: DirType = "weights"
    same_dir: bool = False
    regenerate: bool = False
    dir_file: str | None = None
    model2: str | None = None
    model3: str | None = None
    curve_plane: str | None = None
    directions: DirectionSource = "random"
    geometry: str | None = None  # a user's own set of points, pkg.module:factory (lsurf.engine.geometry.plugin)
    x: str = "-1:1:51"
    y: str | None = None
    planes: int = 1
    loss: str = "cross_entropy"
    metric: tuple[str, ...] = ()  # the user's own metrics, pkg.module:factory each (stored as {split}_{name})
    ignore_index: int = -100
    output: str | None = None
    dtype: Dtype = "float32"
    device: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    points_per_pass: int | None = None
    amp: Amp = "none"
    tf32: bool = False  # applied by the entry point (configure_process); a file records the precision in force
    layout: Layout = "auto"
    bn: BatchNorm = "eval"
    hessian_iters: int = 0
    fidelity: FidelityCheck = "auto"
    budget: int | None = None
    refine_tol: float | None = None
    tolerance: float | None = None
    min_samples: int = 256
    resident: Residency = "auto"
    memory_budget: str | None = None
    workers: int | None = None
    ranks_per_point: int = 1
    shard: Sharding | None = None
    tile: str | None = None
    tile_order: TileOrder = "coarse"  # contiguous: bands of rows, as before issue 34 (benches; job-file key only)
    schedule: Schedule = "dynamic"
    writer: Writer = "auto"
    out: str = "surface.h5"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str):  # torch.float64 from Python callers
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if isinstance(self.split, str):  # "train,test" from a job file or a flag
            object.__setattr__(self, "split", tuple(s.strip() for s in self.split.split(",") if s.strip()))
        if isinstance(self.metric, (str, list)):  # one plug-in in a job file; a list from a notebook
            object.__setattr__(self, "metric", (self.metric,) if isinstance(self.metric, str) else tuple(self.metric))
        for f in fields(self):
            _check_field(f.name, _HINTS[f.name], getattr(self, f.name))
        for name in ("threads", "batch_size", "points_per_pass", "subset", "ranks_per_point", "seq_len", "planes",
                     "budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"`{name}` {value}: must be at least 1")
        for name in ("refine_tol", "tolerance"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"`{name}` {value}: must be positive")
        if self.min_samples < 2:
            raise UserError(f"`min_samples` {self.min_samples}: must be at least 2")
        if self.hessian_iters < 0:
            raise UserError(f"`hessian_iters` {self.hessian_iters}: must be at least 0")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"`workers` {self.workers}: must be at least 0")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "memory_budget")
        if not self.split:
            raise UserError("`split` is empty: expected train and/or test")
        self._check_combinations()

    def _check_combinations(self) -> None:
        one_point = "`bn` recalibrate" if self.bn == "recalibrate" else "`hessian_iters`" if self.hessian_iters else ""
        if one_point and (self.points_per_pass or 1) > 1:
            raise UserError(f"`points_per_pass` > 1 cannot be combined with {one_point}: it evaluates one point "
                            "at a time")
        if self.regenerate and (self.dir_file or self.model2):
            raise UserError("`regenerate` redraws seeded random directions: it cannot be combined with "
                            f"`{'dir_file' if self.dir_file else 'model2'}`")
        if self.directions != "random":
            self._check_hessian_directions()
        if self.geometry:
            self._check_geometry()
        clash = [n for n in ("dir_file", "model2", "regenerate") if getattr(self, n)] + ["planes"] * (self.planes > 1)
        if self.curve_plane and clash:
            raise UserError(f"`curve_plane` sets both directions (the plane of the curve): it cannot be combined "
                            f"with `{clash[0]}`")
        if self.planes > 1 and (self.dir_file or self.model2):
            raise UserError(f"`planes` {self.planes} draws random planes (seeds `seed` to `seed` + {self.planes - 1}): "
                            f"it cannot be combined with `{'dir_file' if self.dir_file else 'model2'}`")
        if self.refines and self.planes > 1:
            raise UserError("`budget`/`refine_tol` refine one plane: not with `planes` > 1")
        if self.tolerance is not None and ((self.points_per_pass or 1) > 1 or self.ranks_per_point > 1):
            raise UserError(f"`tolerance` stops each point's pass on its own: it cannot be combined with "
                            f"`{'points_per_pass' if (self.points_per_pass or 1) > 1 else 'ranks_per_point'}` > 1")
        if self.shard is not None:
            self._check_shard()
        if self.amp == "bf16" and self.dtype == "float64":
            raise UserError("`amp` bf16 with `dtype` float64 would compute in bfloat16 and call it float64: "
                            "choose one")

    def _check_shard(self) -> None:
        """A sharded model needs a group to shard over, and the one-point-per-pass path."""
        if self.ranks_per_point < 2:
            raise UserError(f"`shard` {self.shard} shards the model over a rank group: it needs `ranks_per_point` "
                            "of 2 or more")
        if (self.points_per_pass or 1) > 1:
            raise UserError(f"`shard` {self.shard} evaluates one point per pass: it cannot be combined with "
                            "`points_per_pass` > 1")
        if self.weights_on_disk:  # each rank reads its rows only: nothing can use the whole model
            whole = [f"`{n}`" for n in ("geometry", "curve_plane") if getattr(self, n)]
            if whole:
                raise UserError(f"`shard` {self.shard} reads each rank's part of the weights: not with "
                                f"{', '.join(whole)}, which need the whole model on one rank")
        if self.layout == "channels-last":
            raise UserError(f"`shard` {self.shard} needs the weights contiguous: not with `layout` channels-last")

    def _check_geometry(self) -> None:
        """A geometry brings its own points: options that make directions or a grid contradict it."""
        clash = [f"`{n}`" for n in ("dir_file", "model2", "curve_plane", "regenerate", "same_dir", "y")
                 if getattr(self, n)]
        clash += ["`planes` > 1"] * (self.planes > 1) + ["`dir_type` states"] * (self.dir_type == "states")
        clash += [f"`directions` {self.directions}"] * (self.directions != "random")
        if clash:
            raise UserError(f"`geometry` {self.geometry} gives the points and their axes: it cannot be combined "
                            f"with {clash[0]}")

    def _check_hessian_directions(self) -> None:
        clash = [f"`{n}`" for n in ("dir_file", "model2", "curve_plane", "regenerate", "same_dir") if getattr(self, n)]
        clash += ["`planes` > 1"] * (self.planes > 1) + ["`dir_type` states"] * (self.dir_type == "states")
        if clash:
            raise UserError(f"`directions` {self.directions} are Hessian eigenvectors of the weights: they "
                            f"cannot be combined with {clash[0]}")
        if (self.y is not None) != ("," in self.directions):
            raise UserError(f"`directions` {self.directions}: " + ("a plane (`y` given) needs two, e.g. "
                            "hessian:max,min" if self.y is not None else "a curve needs one, e.g. hessian:max"))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Options | None = None) -> Options:
        """Options from a mapping (a job file's table): keys are field names, ``-`` or ``_``;
        an unknown key is refused with the closest known name."""
        clean = field_names(values, {f.name for f in fields(cls)}, "unknown option")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in clean.items()}
        return dataclasses.replace(base or cls(), **clean)

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)

    @property
    def refines(self) -> bool:
        """Whether the grid is sampled coarse to fine (lsurf.engine.geometry.refine) rather than whole."""
        return self.budget is not None or self.refine_tol is not None

    @property
    def weights_on_disk(self) -> str | None:
        """Where the model's weights are read from: the checkpoint, a Hugging Face folder, or None (drawn)."""
        return self.checkpoint or (self.model.partition(":")[2] if is_hf(self.model) else None)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_bytes(self.memory_budget, "memory_budget")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names(values: Mapping[str, Any], known: set[str], what: str) -> dict[str, Any]:
    """``values`` with keys as field names (``batch-size`` -> ``batch_size``); a key not in ``known``
    is refused as ``what``, with the closest known name as a hint."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise UserError(f"{what} {key!r}{hint}")
        out[name] = value
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str, name: str) -> int:
    """``"512M"``, ``"1.5G"``, ``"4096"`` (bytes; K, M, G, T are powers of 1024) as a byte count."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UserError(f"`{name}` {text!r}: expected a size such as 512M or 4G") from None
    if not value > 0:
        raise UserError(f"`{name}` {text!r}: must be positive")
    return int(value * _UNITS[unit])


def read_job_file(path: str) -> dict[str, Any]:
    """The table of a TOML job file (keys checked later by :meth:`Options.from_mapping`)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"`config` {path!r} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"`config` {path!r} is a folder, not a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"`config` {path!r} is not valid TOML ({e})") from None


_HINTS = get_type_hints(Options)


def _check_field(name: str, hint: Any, value: Any) -> None:
    """One field against its annotation: Literal values, ints, bools, strings, optional, tuples."""
    args = get_args(hint)
    if value is None and type(None) in args:
        return
    inner = [a for a in args if a is not type(None)] if type(None) in args else [hint]
    kind = inner[0]
    if getattr(kind, "__origin__", None) is Literal:
        if value not in get_args(kind):
            raise UserError(f"`{name}` {value!r}: expected {' or '.join(map(str, get_args(kind)))}")
    elif getattr(kind, "__origin__", None) is tuple:
        for item in value:
            _check_field(name, get_args(kind)[0], item)
    elif kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"`{name}` {value!r}: expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"`{name}` {value!r}: expected a whole number")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"`{name}` {value!r}: expected a number")
    elif kind is str and not isinstance(value, str):
        raise UserError(f"`{name}` {value!r}: expected a string")
