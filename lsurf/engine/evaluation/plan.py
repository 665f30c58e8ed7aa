"""The run plan: the automatic choices of a run — device, threads, batch size, memory layout, points
per pass, the splits streamed rather than held, loader workers, the writer, whether plane fidelity
is measured — made once (on rank 0 under MPI) before the surface file exists, recorded in it.

Reusing the plan is what makes a resumed surface bit-identical to an uninterrupted one: batch size,
layout and stacking change the float32 summation order, so a resume that chose afresh (calibration
timings vary) could mix points computed two ways. Those three come from the file on resume; a
value the caller pinned must agree with them. The others depend on the machine (its memory, its
h5py) and not the numbers, so a resumed run decides them afresh and records what it used.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import torch
from torch import nn

from lsurf.engine.model.snapshot import preserved
from lsurf.errors import UserError


@dataclass(frozen=True)
class Plan:
    """``device``: the device type every rank uses (each rank its own GPU); ``threads``: torch threads
    of the rank that planned (recorded; threads are set by the entry point, see lsurf.run.runtime)."""

    device: str
    batch_size: int
    channels_last: bool
    points_per_pass: int  # 0: to be calibrated once the evaluator holds the data
    threads: int
    streamed: tuple[str, ...] = ()
    workers: int = 0
    writer: str = "root"  # or "mpio": every rank writes its tiles to the file (parallel HDF5)
    fidelity: str | None = None  # why plane fidelity is not measured; None: it is

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A recorded plan; one from before a field existed takes that field's default."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in json.loads(text).items() if k in known}
        return cls(**{**fields, "streamed": tuple(fields.get("streamed", ()))})

    def resumed(self, fresh: Plan) -> Plan:
        """The plan of a run resuming this one on ``fresh``'s machine: this plan's choices that
        change the numbers, ``fresh``'s for the rest."""
        return dataclasses.replace(fresh, batch_size=self.batch_size, channels_last=self.channels_last,
                                   points_per_pass=self.points_per_pass)

    def conflicts(self, pinned: dict[str, object]) -> str | None:
        """Why values the caller pinned (non-None) disagree with this plan, or None."""
        for name, value in pinned.items():
            if value is not None and getattr(self, name) != value:
                return f"`{name}` {value!r} (the file was made with {getattr(self, name)!r})"
        return None


# Model outputs one batch may hold: 64 MB of float32 on a CPU, 1 GB on a GPU. A language model's
# logits are sequence length × vocabulary per sample, so its batches are a few sequences.
_OUTPUTS_PER_BATCH = {"cpu": 1 << 24, "cuda": 1 << 28}


def default_batch_size(device: torch.device, outputs_per_sample: int = 1) -> int:
    """128 on the CPU (small activations stay in cache), 1024 on a GPU (fewer kernel launches),
    fewer when one sample's outputs are large. In eval mode the batch size changes only speed (and
    float32 summation order)."""
    usual = 1024 if device.type == "cuda" else 128
    room = _OUTPUTS_PER_BATCH["cuda" if device.type == "cuda" else "cpu"] // max(outputs_per_sample, 1)
    return max(1, min(usual, room))


def faster_in_channels_last(model: nn.Module, x: torch.Tensor, log=None, amp: bool = False) -> bool:
    """Time one batch in both memory layouts (under bfloat16 autocast with ``amp``, as the run will
    compute: the faster layout differs between precisions); NHWC must win by 10 %. Only 4-D inputs
    qualify. The model comes back as it was."""
    if x.dim() != 4:
        return False

    def best(inp: torch.Tensor) -> float:
        with torch.inference_mode(), torch.autocast(inp.device.type, dtype=torch.bfloat16, enabled=amp):
            model(inp)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(inp)
                if inp.is_cuda:
                    torch.cuda.synchronize(inp.device)
                times.append(time.perf_counter() - t0)
        return min(times)

    with preserved(model):
        model.to(device=x.device, dtype=x.dtype).eval()
        nchw = best(x)
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # valid; not in torch stubs
        nhwc = best(x.contiguous(memory_format=torch.channels_last))
    if log:
        log(f"layout: NCHW {1e3 * nchw:.2f} ms, NHWC {1e3 * nhwc:.2f} ms per batch -> "
            f"{'channels-last' if nhwc < 0.9 * nchw else 'contiguous'}")
    return nhwc < 0.9 * nchw


def check_pinned(stored: Plan, pinned: dict[str, object]) -> None:
    """Refuse pinned values that contradict the plan of the file being resumed."""
    why = stored.conflicts(pinned)
    if why is not None:
        raise UserError(f"this run pins {why}: resume with the file's plan, or use `overwrite`")
