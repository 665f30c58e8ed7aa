"""Streamed splits read in the evaluating process (host tensors, ``npy:``/``hdf5:`` stores, token
windows): the very batches of the resident path, bit for bit, in the same order and dtype, for every
rank of a group, across read units; loader workers still serve plug-in Datasets and filtered HDF5."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lsurf import UserError
from lsurf.engine.data import batches as batches_mod
from lsurf.engine.data.batches import Streamed, keep_resident, resident_batches
from lsurf.engine.data.splits import DatasetSplit, Split, load_data
from lsurf.engine.data.stores import save_store

CPU = torch.device("cpu")


def _splits(tmp_path) -> dict:
    """The same 203 rows (uint8 images, int32 labels on disk) as host tensors, both stores and token windows."""
    g = np.random.default_rng(0)
    x, y = g.integers(0, 256, (203, 3, 4, 4)).astype(np.uint8), g.integers(0, 10, 203).astype(np.int32)
    save_store(f"npy:{tmp_path / 'npy'}", {"train": (x, y)})
    save_store(f"hdf5:{tmp_path / 's.h5'}", {"train": (x, y)}, chunk_rows=10)
    g.integers(0, 50_000, 203 * 7 + 1).astype(np.uint16).tofile(tmp_path / "train.bin")
    return {"tensors": Split(torch.from_numpy(x), torch.from_numpy(y).long()),
            "npy": load_data(f"npy:{tmp_path / 'npy'}")["train"],
            "hdf5": load_data(f"hdf5:{tmp_path / 's.h5'}")["train"],
            "tokens": load_data(f"tokens:{tmp_path / 'train.bin'}", seq_len=7)["train"],
            "npy-subset": load_data(f"npy:{tmp_path / 'npy'}", subset=150)["train"]}


def _same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == wx.dtype and gy.dtype == wy.dtype and gx.shape == wx.shape
        assert torch.equal(gx, wx) and torch.equal(gy, wy)


@pytest.mark.parametrize("name", ["tensors", "npy", "hdf5", "tokens", "npy-subset"])
@pytest.mark.parametrize("unit_bytes", [1, 3 * 17 * 56, 4 << 20], ids=["batch", "3-batches", "default"])
def test_in_process_batches_equal_the_resident_ones(name, unit_bytes, tmp_path, monkeypatch):
    """Every rank r of G gets the resident path's batches of its rows, whether a read holds one batch,
    three (a pass ends mid-unit, on a short last batch) or the whole range; two passes alike."""
    monkeypatch.setattr(batches_mod, "READ_BYTES", unit_bytes)
    split = _splits(tmp_path)[name]
    dtype = torch.float64
    for g in (1, 2, 3):
        for r in range(g):
            want = resident_batches(split, 17, CPU, dtype, shard=(r, g))
            feed = Streamed(split, 17, CPU, dtype, workers=2, shard=(r, g))
            assert feed.loader is None and feed.unit >= 1  # read here: no worker processes
            assert len(feed) == len(want)
            _same(list(feed), want)
            _same(list(feed), want)


class _Items(Dataset):
    """A plug-in's map-style Dataset: item by item, no ranges."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_workers_still_read_plugin_datasets_and_filtered_hdf5(tmp_path):
    tensors = _splits(tmp_path)["tensors"]
    x, y = tensors.x.numpy(), tensors.y.numpy()
    with h5py.File(tmp_path / "gz.h5", "w") as f:
        f.create_dataset("train/x", data=x, chunks=(16, 3, 4, 4), compression="gzip")
        f.create_dataset("train/y", data=y)
    gz = load_data(f"hdf5:{tmp_path / 'gz.h5'}")["train"]
    for split in (DatasetSplit(_Items(tensors.x, tensors.y), "feeds:items"), gz):
        want = resident_batches(split, 17, CPU, torch.float32, shard=(1, 2))
        feed = Streamed(split, 17, CPU, torch.float32, workers=2, shard=(1, 2))
        assert feed.loader is not None and feed.loader.num_workers == 2
        _same(list(feed), want)


def test_the_budget_counts_an_in_process_read_unit(tmp_path):
    """A store streams holding one read unit (READ_BYTES of batches) and two batches: a smaller budget is refused."""
    split = _splits(tmp_path)["npy"]
    one = 16 * (48 + 8)  # a batch of 16 rows on the device: uint8 images stay uint8, int64 labels
    unit = batches_mod.READ_BYTES // one
    assert not keep_resident(split, "train", "never", (unit + 2) * one, 16, 1, torch.float32)
    with pytest.raises(UserError, match=f"cannot hold the train split's stream \\({unit + 2} batches"):
        keep_resident(split, "train", "never", (unit + 2) * one - 1, 16, 1, torch.float32)


def test_an_npy_file_truncated_after_opening_is_a_user_error(tmp_path):
    split = _splits(tmp_path)["npy"]
    path = tmp_path / "npy" / "train_x.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 48 * 10)
    with pytest.raises(UserError, match="truncated since it was opened"):
        list(Streamed(split, 17, CPU, torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_to_a_gpu_reads_into_pinned_memory_and_equals_resident(tmp_path):
    cuda = torch.device("cuda")
    for name, split in _splits(tmp_path).items():
        x, _ = split.rows(0, 40, pin=True)
        assert x.is_pinned(), name
        feed = Streamed(split, 17, cuda, torch.float32, shard=(1, 2))
        got = [(bx.cpu(), by.cpu()) for bx, by in feed]
        _same(got, [(bx.cpu(), by.cpu()) for bx, by in resident_batches(split, 17, cuda, torch.float32, shard=(1, 2))])
