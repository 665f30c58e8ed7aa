"""Against Li et al.'s loss-landscape: its checkpoint, direction file and surface file."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, lsurf, mpirun, requires_fixtures, requires_mpi

from lsurf import load_model, read_surface

pytestmark = requires_fixtures
RESNET = FIXTURES / "resnet20"


def test_reference_checkpoint_loads_strictly():
    model = load_model("resnet20", None, None, RESNET / "model_300.t7")
    assert sum(1 for _ in model.parameters()) == 65


@pytest.mark.mpi
@requires_mpi
def test_reproduces_reference_surface(tmp_path):
    """Every fifth row and column of the reference's 11x11 surface (its corners, edge midpoints and
    centre: 9 points), on 2 ranks, against its numbers (float32: ~1e-5): the whole grid would check
    the same code at 13x the cost (each point is a ResNet-20 pass)."""
    out = tmp_path / "ref.h5"
    mpirun(2, "surface", "--model", "resnet20", "--checkpoint", RESNET / "model_300.t7",
           "--dir-file", RESNET / "directions_weights_filter_biasbn.h5",
           "--data", f"cifar10:{FIXTURES / 'cifar10-fake'}", "--x", "-1:1:3", "--y", "-1:1:3",
           "--out", out, "--no-progress", check=True, timeout=600)
    ours, theirs = read_surface(out), read_surface(RESNET / "surface_11x11.h5")
    assert theirs.reference and ours.done.all()
    every_fifth = np.s_[::5, ::5]
    np.testing.assert_allclose(ours.x, theirs.x[::5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(ours.values["train_loss"], theirs.values["train_loss"][every_fifth], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(ours.values["train_acc"], theirs.values["train_acc"][every_fifth], atol=1e-9)
    # Square grid: our (ny, nx) arrays are the reference's bytes.
    import h5py

    with h5py.File(RESNET / "surface_11x11.h5") as f:
        np.testing.assert_allclose(ours.values["train_loss"], f["train_loss"][()][every_fifth], rtol=1e-5)


@pytest.mark.cli
def test_info_reads_reference_file():
    p = lsurf("info", RESNET / "surface_11x11.h5", check=True)
    assert "Li et al." in p.stdout
    assert "121/121 points done" in p.stdout
    assert "11 x 11 points" in p.stdout
