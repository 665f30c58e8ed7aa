"""Filter normalisation, biasbn, seeding and the direction file (ours and Li et al.'s)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import FIXTURES, lsurf, requires_fixtures

from lsurf import UserError, load_directions, load_model, random_directions, save_directions
from lsurf.engine.geometry.directions import target_tensors


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return load_model("resnet20", None, None)


def test_filter_norm_matches_each_filter(resnet):
    dirs = random_directions(resnet, seed=5, norm="filter", ignore="biasbn")
    for name, d, (pname, w) in zip(dirs.names, dirs.x, resnet.named_parameters(), strict=True):
        assert name == pname
        if w.dim() <= 1:
            assert not d.any(), f"{name}: biasbn must zero 1-D tensors"
            continue
        dn = d.reshape(len(d), -1).norm(dim=1)
        wn = w.detach().reshape(len(w), -1).norm(dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-5, atol=1e-6)


def test_ignore_none_copies_one_dimensional_tensors(resnet):
    dirs = random_directions(resnet, seed=5, ignore="none")
    for d, w in zip(dirs.x, resnet.parameters(), strict=True):
        if w.dim() <= 1:
            torch.testing.assert_close(d, w.detach())


def test_layer_and_weight_norms(resnet):
    layer = random_directions(resnet, seed=2, norm="layer")
    weight = random_directions(resnet, seed=2, norm="none")
    scaled = random_directions(resnet, seed=2, norm="weight")
    for dl, dn, dw, w in zip(layer.x, weight.x, scaled.x, resnet.parameters(), strict=True):
        if w.dim() > 1:
            assert dl.norm().item() == pytest.approx(w.norm().item(), rel=1e-5)
            torch.testing.assert_close(dw, dn * w.detach())


def test_same_seed_same_file_other_seed_other(resnet, tmp_path):
    def contents(path):
        with h5py.File(path) as f:
            return [f[g][k][()] for g in ("xdirection", "ydirection") for k in sorted(f[g], key=int)]

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        save_directions(random_directions(resnet, seed=seed), tmp_path / f"{name}.h5")
    a, b, c = (contents(tmp_path / f"{n}.h5") for n in "abc")
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    # x and y differ, and --same-dir makes them equal
    d = random_directions(resnet, seed=1)
    assert not all(torch.equal(u, v) for u, v in zip(d.x, d.y, strict=True))
    s = random_directions(resnet, seed=1, same_dir=True)
    assert all(torch.equal(u, v) for u, v in zip(s.x, s.y, strict=True))


def test_states_directions_cover_buffers(resnet):
    dirs = random_directions(resnet, seed=0, dir_type="states")
    assert dirs.names == list(resnet.state_dict())
    assert any(n.endswith("running_mean") for n in dirs.names)
    tracked = dirs.names.index("bn1.num_batches_tracked")
    assert not dirs.x[tracked].any()


def test_file_round_trip_and_provenance(resnet, tmp_path):
    dirs = random_directions(resnet, seed=4)
    save_directions(dirs, tmp_path / "d.h5", {"checkpoint_sha256": "abc"})
    names, targets = target_tensors(resnet, "weights")
    back = load_directions(tmp_path / "d.h5", names, targets, want_y=True)
    assert back.sha256() == dirs.sha256()
    with h5py.File(tmp_path / "d.h5") as f:
        assert f.attrs["seed"] == 4 and f.attrs["norm"] == "filter" and f.attrs["checkpoint_sha256"] == "abc"


def test_direction_file_for_another_model_is_refused(resnet, tmp_path):
    other = load_model("resnet56", None, None)
    save_directions(random_directions(other, seed=0), tmp_path / "other.h5")
    names, targets = target_tensors(resnet, "weights")
    with pytest.raises(UserError, match="another model"):
        load_directions(tmp_path / "other.h5", names, targets, want_y=True)


@requires_fixtures
def test_reference_direction_file_loads(resnet):
    ckpt = load_model("resnet20", None, None, FIXTURES / "resnet20" / "model_300.t7")
    names, targets = target_tensors(ckpt, "weights")
    dirs = load_directions(FIXTURES / "resnet20" / "directions_weights_filter_biasbn.h5", names, targets, True)
    assert len(dirs.x) == len(dirs.y) == 65
    # The reference's file obeys the same normalisation: filter norms equal the checkpoint's.
    for d, w in zip(dirs.x, targets, strict=True):
        if w.dim() > 1:
            torch.testing.assert_close(d.reshape(len(d), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1),
                                       rtol=1e-4, atol=1e-6)
        else:
            assert not d.any()


@pytest.mark.cli
def test_directions_command(tmp_path):
    p = lsurf("directions", "--model", "resnet20", "--seed", "9", "--out", tmp_path / "d.h5", check=True)
    assert "65 tensors" in p.stdout
    with h5py.File(tmp_path / "d.h5") as f:
        assert len(f["xdirection"]) == 65 and len(f["ydirection"]) == 65
