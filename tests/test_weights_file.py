"""Checkpoints read by rows (lsurf.engine.model.weights_file), what a rank of a sharded model loads: a
torch file, a safetensors file and ``save_pretrained`` folders (one file, or sharded with an
index) give the tensors ``torch.load`` gives, any rows of them alone; a bad one is one line."""

from __future__ import annotations

import json

import pytest
import torch

from lsurf.engine.model.models import read_state_dict
from lsurf.engine.model.weights_file import open_weights
from lsurf.errors import UserError


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(7, 3, generator=g, dtype=torch.float64), "a.bias": torch.randn(7, generator=g),
            "b.weight": torch.randn(2, 5, 3, 3, generator=g).to(torch.bfloat16), "n": torch.tensor(4)}


def _check(f, state: dict[str, torch.Tensor]) -> None:
    assert sorted(f.names()) == sorted(state)
    for name, t in state.items():
        assert f.shape(name) == tuple(t.shape)
        assert torch.equal(f.read(name), t) and f.read(name).dtype == t.dtype, name
        if t.dim():
            for rows in (slice(0, 1), slice(1, t.shape[0]), slice(t.shape[0], t.shape[0])):  # the last: empty
                assert torch.equal(f.read(name, rows), t[rows]), (name, rows)


def test_a_torch_file_as_li_et_al_save_it(tmp_path):
    state = _state()
    # {'state_dict': ...} with nn.DataParallel's "module." prefix, as Li et al.'s checkpoints are
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "m.t7")
    with open_weights(tmp_path / "m.t7") as f:
        _check(f, state)
    assert all(torch.equal(read_state_dict(tmp_path / "m.t7")[k], v) for k, v in state.items())


def test_a_safetensors_file_and_a_sharded_folder(tmp_path):
    from safetensors.torch import save_file

    state = _state()
    save_file(state, tmp_path / "one.safetensors")
    with open_weights(tmp_path / "one.safetensors") as f:
        _check(f, state)
    # a folder as save_pretrained writes a large model: several files and the index naming them
    folder = tmp_path / "hf"
    folder.mkdir()
    parts = {"model-00001-of-00002.safetensors": ["a.weight", "n"], "model-00002-of-00002.safetensors": ["a.bias",
                                                                                                        "b.weight"]}
    for file, names in parts.items():
        save_file({k: state[k] for k in names}, folder / file)
    index = {"metadata": {}, "weight_map": {k: file for file, names in parts.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_weights(folder) as f:
        _check(f, state)
    assert all(torch.equal(read_state_dict(folder)[k], v) for k, v in state.items())


def test_a_folder_of_torch_weights(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_weights(tmp_path) as f:
        _check(f, state)


@pytest.mark.parametrize("case, says", [
    ("missing", "checkpoint {p}/nothing.pt does not exist"),
    ("empty folder", "checkpoint {p}: a folder without weights (expected one of model.safetensors"),
    ("garbage", "checkpoint {p}/garbage.pt is not a readable torch checkpoint"),
    ("bad safetensors", "checkpoint {p}/bad.safetensors is not a readable safetensors file"),
    ("bad index", "checkpoint {p}: model.safetensors.index.json is not an index of weight files"),
    ("no tensors", "checkpoint {p}/list.pt holds no state dict of tensors"),
])
def test_a_bad_checkpoint_is_one_line(tmp_path, case, says):
    target = {"missing": tmp_path / "nothing.pt", "garbage": tmp_path / "garbage.pt",
              "bad safetensors": tmp_path / "bad.safetensors", "no tensors": tmp_path / "list.pt"}.get(case, tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    torch.save([1, 2], tmp_path / "list.pt")
    if case == "bad index":
        (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(UserError) as e:
        open_weights(target)
    message = str(e.value).replace(repr(str(tmp_path)), str(tmp_path)).replace("'", "")
    assert message.startswith(says.format(p=tmp_path)) and "\n" not in message, message
