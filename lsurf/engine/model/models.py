"""Model zoo by name, ``pkg.module:factory`` plug-ins, and checkpoint loading.

The CIFAR ResNets and VGG-9 keep the layer names of Li et al.'s ``loss-landscape`` code so its
checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from lsurf.engine.io import make_plugin
from lsurf.engine.model.hf import build_hf, is_hf, load_hf
from lsurf.engine.model.tensor_parts import local_part
from lsurf.engine.model.weights_file import open_weights
from lsurf.errors import UserError


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers; ``hidden=()`` is plain linear regression."""

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images (scikit-learn's digits): two 3x3 convs, one pool, a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.linear = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.linear(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.has_shortcut = shortcut
        if shortcut:
            self.shortcut = nn.Sequential()
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.has_shortcut:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, 8x8 average pool, ``linear`` head."""

    layer1: nn.Sequential  # set by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, depth: int, shortcut: bool = True, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        for s, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes_in, planes, stride if b == 0 else 1, shortcut))
                planes_in = planes
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class VGG9(nn.Module):
    """VGG-9 as in Li et al.: 7 conv+BN layers, one FC+BN layer, a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cfg: list[int | Literal["M"]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                size = -(-size // 2)
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(256 * size * size, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x).flatten(1)))


def _flat(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# name -> factory(in_shape, num_outputs)
ZOO: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "linear": lambda shape, k: MLP(_flat(shape), k, hidden=()),
    "mlp": lambda shape, k: MLP(_flat(shape), k),
    "cnn": lambda shape, k: DigitsCNN(shape[0], k),
    "vgg9": lambda shape, k: VGG9(shape[0], k, shape[-1]),
}


def _resnet(depth: int, shortcut: bool) -> Callable[[tuple[int, ...], int], nn.Module]:
    return lambda shape, k: CifarResNet(depth, shortcut, shape[0], k)


for _depth in (20, 56, 110):
    ZOO[f"resnet{_depth}"] = _resnet(_depth, True)
    ZOO[f"resnet{_depth}_noshort"] = _resnet(_depth, False)


def is_zoo(name: str) -> bool:
    """A zoo name (sized from the data), not a plug-in or a Hugging Face folder (which size themselves)."""
    return ":" not in name


def build_model(name: str, in_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A zoo model sized for the data, or a plug-in ``pkg.module:factory`` called with no arguments."""
    if ":" in name:
        model = make_plugin(name, "model")
        if not isinstance(model, nn.Module):
            raise UserError(f"model plug-in {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if name not in ZOO:
        close = difflib.get_close_matches(name, ZOO, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(ZOO))})"
        raise UserError(f"unknown model {name!r}{hint}")
    return ZOO[name](tuple(in_shape), num_outputs)


def weights_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """A cheap hash of a model's state: every tensor's name, shape and dtype, and up to ``samples``
    of its values, evenly spaced (a few MB read for any model size). Enough to tell two draws or
    two checkpoints apart, e.g. the ranks of a job that must all hold the same model. Of a sharded
    model: of this rank's shards."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = local_part(t).detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(picked.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint, read whole: any that :func:`~lsurf.engine.model.weights_file.open_weights`
    opens (a torch file, bare or ``{'state_dict': ...}`` as Li et al. save; safetensors; a
    ``save_pretrained`` folder)."""
    with open_weights(path) as f:
        return {name: f.read(name) for name in f.names()}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint with ``strict=True``, naming the first missing/unexpected key on mismatch."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]!r}")
        raise UserError(f"checkpoint {str(path)!r} does not fit this model: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(
                f"checkpoint {str(path)!r} does not fit this model: {k!r} has shape "
                f"{tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=True)


# Input shape and class count of the data each zoo family was designed for, used when no data is
# given (e.g. ``lsurf directions --model resnet20``).
DEFAULT_SHAPES = {"cnn": ((1, 8, 8), 10), "vgg9": ((3, 32, 32), 10), "resnet": ((3, 32, 32), 10)}


def load_model(name: str, in_shape: tuple[int, ...] | None, num_outputs: int | None,
               checkpoint: str | Path | None = None, dtype: torch.dtype = torch.float32,
               seed: int | None = None) -> nn.Module:
    """A model by zoo name, plug-in or ``hf:DIR``, in ``dtype``, with the checkpoint's weights if given.

    The dtype is set before loading so a float64 checkpoint keeps its precision in a float64 run.
    ``seed`` draws the initial weights from that seed without touching torch's global generator.
    """
    model = load_hf(name, dtype) if is_hf(name) else build_for(name, in_shape, num_outputs, dtype, seed)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def build_for(name: str, in_shape: tuple[int, ...] | None, num_outputs: int | None, dtype: torch.dtype,
              seed: int | None) -> nn.Module:
    """The model ``name`` names, its weights freshly drawn (from ``seed``), none read: a Hugging Face
    folder's as its config describes it."""
    if is_hf(name):
        return build_hf(name, dtype)
    if in_shape is None and is_zoo(name):
        family = "resnet" if name.startswith("resnet") else name
        if family not in DEFAULT_SHAPES:
            raise UserError(f"model {name!r} needs `data` to know its input shape")
        in_shape, num_outputs = DEFAULT_SHAPES[family]
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        # in_shape and num_outputs are None only for plug-ins, which ignore them
        return build_model(name, cast(tuple, in_shape), cast(int, num_outputs)).to(dtype)
