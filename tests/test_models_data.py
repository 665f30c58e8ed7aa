"""The model zoo, checkpoint formats and the data loaders on small files the test makes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lsurf import UserError, load_data, load_model
from lsurf.engine.data.splits import CIFAR_MEAN, CIFAR_STD


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("linear", (5,)),
                                        ("vgg9", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                                        ("resnet56_noshort", (3, 32, 32))])
def test_zoo_models_run(name, shape):
    model = load_model(name, shape, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet_layouts():
    keys = set(load_model("resnet20", None, None).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var",
            "layer3.2.conv2.weight", "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in k for k in load_model("resnet20_noshort", None, None).state_dict())
    n_convs = sum(1 for k in load_model("resnet110", None, None).state_dict() if k.endswith("conv1.weight"))
    assert n_convs == 1 + 54  # stem + one per block (18 blocks x 3 stages)


def test_checkpoint_formats(tmp_path):
    model = load_model("cnn", (1, 8, 8), 10)
    state = model.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"state_dict": state, "epoch": 3, "acc": 91.0}, tmp_path / "dict.t7")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")
    for f in ("bare.pt", "dict.t7", "dp.pt"):
        loaded = load_model("cnn", (1, 8, 8), 10, tmp_path / f).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    bad = dict(state)
    bad["conv1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(UserError, match="'conv1.weight' has shape"):
        load_model("cnn", (1, 8, 8), 10, tmp_path / "shape.pt")


def _write_cifar(root, n_per_batch: int, key_type=bytes):
    """CIFAR-10's python layout: data_batch_1..5 and test_batch, uint8 rows of 3072 (CHW), labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        k = (lambda s: s.encode()) if key_type is bytes else (lambda s: s)
        with open(folder / name, "wb") as f:
            pickle.dump({k("data"): data, k("labels"): labels, k("batch_label"): k(name)}, f)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("key_type", [bytes, str])
def test_cifar10_loader_normalises_in_file_order(tmp_path, key_type):
    batches = _write_cifar(tmp_path, 4, key_type)
    data = load_data(f"cifar10:{tmp_path}", ("train", "test"))
    assert data["train"].x.shape == (20, 3, 32, 32) and data["test"].x.shape == (4, 3, 32, 32)
    raw, labels = batches["data_batch_2"]
    img = raw[1].reshape(3, 32, 32).astype(np.float64) / 255  # 6th training image, channel-first
    expected = (img - np.array(CIFAR_MEAN)[:, None, None]) / np.array(CIFAR_STD)[:, None, None]
    np.testing.assert_allclose(data["train"].x[5].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert data["train"].y[5].item() == labels[1]


def test_subset_is_fixed_and_seeded():
    a = load_data("digits", ("train",), subset=50)["train"]
    b = load_data("digits", ("train",), subset=50)["train"]
    full = load_data("digits", ("train",))["train"]
    assert torch.equal(a.x, b.x) and len(a) == 50 and len(full) == 1438
    assert a.fingerprint() == b.fingerprint() != full.fingerprint()


def test_synthetic_is_seeded_and_shaped():
    a = load_data("synthetic:shape=2x4x4,n=30,classes=3,seed=5", ("train", "test"))
    b = load_data("synthetic:shape=2x4x4,n=30,classes=3,seed=5", ("train", "test"))
    assert a["train"].x.shape == (30, 2, 4, 4) and len(a["test"]) == 6
    assert torch.equal(a["train"].x, b["train"].x) and int(a["train"].y.max()) < 3
