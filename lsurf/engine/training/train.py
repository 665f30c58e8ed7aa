"""A small deterministic SGD trainer, so the demo and the trajectory tools have real checkpoints.

It saves ``model_0.t7`` (the initial weights) and ``model_<epoch>.t7`` after every epoch, in the
format of Li et al.'s code: ``{'state_dict': ..., 'epoch': e, 'acc': test accuracy}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lsurf.engine.data.splits import AnySplit, Split
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.io import atomic_write


def _accuracy(model: nn.Module, split: Split | None) -> float:
    if split is None or not split.is_classification:
        return 0.0
    model.eval()
    with torch.inference_mode():
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        pred = torch.cat([model(split.x[i : i + 1024].to(device, dtype)).argmax(1).cpu()
                          for i in range(0, len(split), 1024)])
    return 100.0 * (pred == split.y).double().mean().item()


def save_checkpoint(model: nn.Module, path: Path, epoch: int, acc: float) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:  # a run killed while saving keeps the last whole checkpoint
        torch.save({"state_dict": state, "epoch": epoch, "acc": acc}, tmp)


def train(
    model: nn.Module,
    data: dict[str, AnySplit],
    out_dir: str | Path,
    *,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    loss: str = "cross_entropy",
    device: torch.device | str = "cpu",
    log=print,
) -> list[Path]:
    """Train on ``data['train']`` with SGD on ``device``; the shuffling order is a function of ``seed``.
    The model is trained in place (that is the point) and left on ``device``; checkpoints hold CPU tensors.
    Training shuffles every epoch, so the splits are read into host memory whole."""
    whole = {name: split.materialise() for name, split in data.items()}
    out = Path(out_dir)
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    loss_fn = resolve_loss(loss)
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    train_split, test_split = whole["train"], whole.get("test")
    paths = [out / "model_0.t7"]
    save_checkpoint(model, paths[0], 0, _accuracy(model, test_split))
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(train_split), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            x, y = train_split.x[idx].to(device), train_split.y[idx].to(device)
            batch_loss = loss_fn(model(x.to(dtype) if x.is_floating_point() else x), y).mean()
            batch_loss.backward()
            opt.step()
            total += batch_loss.item() * len(idx)
        sched.step()
        acc = _accuracy(model, test_split)
        paths.append(out / f"model_{epoch}.t7")
        save_checkpoint(model, paths[-1], epoch, acc)
        log(f"epoch {epoch}/{epochs}: train loss {total / len(perm):.4f}, test acc {acc:.2f}%")
    return paths
