"""GPU memory and host traffic of the CUDA path (issue #30), checked on the CPU where the logic is
device-independent: what is held when, how data is laid out and moved, which K and batch sizes a
run chooses. What only a GPU shows (bytes on the card, syncs) is in tests/test_gpu_readiness.py."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lsurf as api
import lsurf.run.sampler as sampler
from lsurf.engine.data.batches import resident_batches
from lsurf.engine.data.splits import Split
from lsurf.engine.evaluation.evaluate import Evaluator, _coefficients, evaluator
from lsurf.engine.evaluation.losses import resolve_loss
from lsurf.engine.geometry.curve import Curve, parameters_of
from lsurf.engine.geometry.grid import Grid
from lsurf.engine.training.curve import Progress, Training, train_curve
from lsurf.run.runtime import configure_process

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fidelity_runs_after_the_evaluator_and_its_device_copies_are_gone(tmp_path, monkeypatch):
    measure = sampler.plane_fidelity
    alive: list[int] = []

    def spying(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, Evaluator) for o in gc.get_objects()))
        return measure(*args, **kwargs)

    monkeypatch.setattr(sampler, "plane_fidelity", spying)
    data = api.load_data("digits", ("train",), 100)
    model = api.load_model("mlp", (1, 8, 8), 10, seed=0)
    dirs = api.random_directions(model, seed=0, two=False)
    surface = api.sample_surface(model, data, dirs, Grid.parse("-1:1:3"), tmp_path / "s.h5", fidelity="on",
                                 progress=False)
    assert surface.fidelity is not None
    assert alive == [0]


def test_resident_channels_last_data_is_one_nhwc_copy_whose_batches_are_views():
    split = api.load_data("synthetic:shape=3x8x8,n=300", ("train",))["train"]
    batches = resident_batches(split, 64, torch.device("cpu"), torch.float64, channels_last=True)
    assert len({x.untyped_storage().data_ptr() for x, _ in batches}) == 1  # one allocation, not one per batch
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    assert torch.equal(torch.cat([x for x, _ in batches]), split.x.double())
    assert torch.equal(torch.cat([y for _, y in batches]), split.y)


@pytest.mark.gpu
@cuda
def test_a_stacked_cuda_pass_sets_its_coefficients_without_a_host_sync():
    data = api.load_data("digits", ("train",), 256)
    model = api.load_model("cnn", (1, 8, 8), 10, seed=0)
    configure_process(device="cuda", threads=1)
    with evaluator(model, data, api.random_directions(model, seed=1), device="cuda", points_per_pass=3) as ev:
        points = [(0.1, 0.2), (0.3, -0.1), (-0.2, 0.0)]
        ev.evaluate_many(points)  # warm-up (vmap, cuDNN plans)
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = ev._stacked(points)  # sums left on the device
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pending.is_cuda and pending.shape[1] == 3


def test_stacked_coefficients_are_the_points_in_the_weights_dtype():
    a, b = _coefficients([(0.1, -0.2), (0.3, 0.4)], torch.float32, torch.device("cpu"))
    assert torch.equal(a, torch.tensor([0.1, 0.3])) and torch.equal(b, torch.tensor([-0.2, 0.4]))


@pytest.mark.parametrize("k", [2, 4, 8, 16, 64])
def test_default_tiles_hold_whole_stacked_passes_except_at_the_right_and_bottom_edges(k):
    for x, y, ranks in [("0:1:51", "0:1:51", 4), ("0:1:51", "0:1:51", 1), ("0:1:200", None, 3), ("0:1:7", "0:1:9", 2),
                        ("0:1:33", "0:1:20", 8), ("0:1:101", "0:1:101", 16)]:
        grid = Grid.parse(x, y)
        ny, nx = grid.plane_shape
        tiles = grid.tiles(None, ranks, k, "contiguous")  # coarse-first blocks: test_library's tile tests
        assert all(t.size % k == 0 for t in tiles if t.i1 < nx and t.j1 < ny), (x, y, ranks)


def test_tiles_of_whole_passes_take_about_the_least_passes():
    """51 x 51 at 4 ranks: 650 points a tile was 4 rows (204 points: 12 passes of 16 and one of 12).
    Coarse-first, each of the 5 blocks ends in its own pass, and the last block's tiles may be smaller so
    that the ranks end together: at most 2 % more."""
    grid = Grid.parse("0:1:51", "0:1:51")
    passes = sum(-(-t.size // 16) for t in grid.tiles(None, 4, 16, "contiguous"))
    assert passes <= -(-grid.num_points // 16) + 1  # 164 (169 before), at least 163
    assert sum(-(-t.size // 16) for t in grid.tiles(None, 4, 16)) <= 1.02 * passes
    assert [(t.j1 - t.j0, t.i1 - t.i0) for t in grid.tiles(None, 4, 1, "contiguous")][:1] == [(4, 51)]  # K=1 as it was


def test_one_process_trains_a_curve_without_float64_copies_of_its_gradients():
    model = api.load_model("mlp", (1, 8, 8), 10, seed=0).eval()
    names, a = parameters_of(model)
    split = Split(torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    made: list[tuple[str, int]] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.numel() > 1:
                made.append((str(func), out.numel()))
            return out

    with Spy():
        train_curve(model, Curve.straight("bezier", names, a, [x + 0.1 for x in a], 1), split,
                    Training(epochs=1, batch_size=16), Progress(), loss_fn=resolve_loss("cross_entropy"))
    # the epoch's draws of t are float64; the per-step gradient buffer is made only to add the ranks' sums
    assert [f for f, _ in made if "rand" not in f] == []
