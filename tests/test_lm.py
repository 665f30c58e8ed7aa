"""Sequence models and language models: per-token metrics, Hugging Face models from disk, token
corpora, transformer directions, regenerated directions and bfloat16 weights.

Every number is checked against an independent computation (torch's own cross-entropy over all
tokens at once, transformers' ``labels=`` loss, a per-sequence ratio estimator in numpy).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, _env, lsurf, mpirun, requires_mpi
from lm_fixtures import sequence_loss, tiny_lm
from torch import nn

import lsurf as api
from lsurf.engine.data.splits import Split
from lsurf.engine.evaluation.evaluate import evaluator
from lsurf.engine.geometry.directions import SeededDirections, filter_axes, random_directions, target_tensors

transformers = pytest.importorskip("transformers")
F64 = torch.float64
PLANE = ["--x", "-1:1:3", "--y", "-1:1:3"]


def _env_with_tests() -> dict:
    return {"PYTHONPATH": f"{REPO / 'tests'}:{_env()['PYTHONPATH']}"}


def _values(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        assert f["done"][()].all()
        return {k: f[k][()] for k in f if k.startswith(("train_", "test_"))}


def _windows(corpus, name: str, seq_len: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows cut by hand from the file: an independent reading of the token layout."""
    tokens = np.fromfile(corpus / name, dtype=np.uint16).astype(np.int64)
    count = (len(tokens) - 1) // seq_len
    w = np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(count)])[:n]
    return torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])


# --- per-token metrics ---------------------------------------------------------------------------

class _DictLM(nn.Module):
    """A tiny LM returning a dict, as Hugging Face models do (``logits`` among other entries)."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(ids)
        return {"hidden": h, "logits": self.head(torch.tanh(h))}


def _padded_tokens(n: int = 40, t: int = 7, vocab: int = 11) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.randint(0, vocab, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    y[torch.arange(t)[None, :] >= lengths[:, None]] = -100  # right padding, different per sequence
    return Split(x, y)


def test_token_metrics_are_token_weighted_with_per_sequence_errors():
    torch.manual_seed(0)
    model = _DictLM().double()
    split = _padded_tokens()
    dirs = random_directions(model, seed=1)
    with evaluator(model, {"train": split}, dirs, dtype=F64, batch_size=6) as ev:
        got = ev.evaluate(0.3, -0.2)
        ev.set_point(0.3, -0.2)
        logits = model(split.x)["logits"]
    # independent: torch's own mean over all valid tokens at once
    want = F.cross_entropy(logits.flatten(0, 1), split.y.flatten(), ignore_index=-100)
    valid = split.y != -100
    acc = ((logits.argmax(-1) == split.y) & valid).sum().double() / valid.sum()
    assert got["train_loss"] == pytest.approx(want.item(), abs=1e-10)
    assert got["train_ppl"] == pytest.approx(math.exp(want.item()), rel=1e-10)
    assert got["train_acc"] == pytest.approx(100 * acc.item(), abs=1e-10)
    # the per-sequence ratio estimator, from per-sequence sums in numpy
    per_token = F.cross_entropy(logits.transpose(1, 2), split.y, ignore_index=-100, reduction="none").detach()
    s, n = per_token.sum(1).numpy(), valid.sum(1).numpy().astype(float)
    mean = s.sum() / n.sum()
    se = np.sqrt(((s - mean * n) ** 2).sum() / (len(s) * (len(s) - 1))) / n.mean()
    assert got["train_loss_stderr"] == pytest.approx(se, rel=1e-8)
    assert list(ev.quantities) == ["train_loss", "train_loss_stderr", "train_ppl", "train_acc", "train_acc_stderr"]


def test_output_names_an_entry_and_a_missing_one_is_one_line():
    model, split = _DictLM().double(), _padded_tokens()
    dirs = random_directions(model, seed=1, two=False)
    squares = lambda o, y: o.square().mean((1, 2))  # noqa: E731  # a per-sequence loss of the hidden states
    with evaluator(model, {"train": split}, dirs, dtype=F64, output="hidden", loss=squares) as ev:
        got = ev.evaluate(0.0)
    assert got["train_loss"] == pytest.approx(model.emb(split.x).square().mean().item(), rel=1e-10)
    with pytest.raises(api.UserError, match=r"no 'scores' entry \(it has hidden, logits\)"):
        with evaluator(model, {"train": split}, dirs, dtype=F64, output="scores") as ev:
            ev.evaluate(0.0)


# --- Hugging Face models, token files, MPI ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_surface(gpt2, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "one.h5"
    args = ["surface", "--model", f"hf:{gpt2}", "--data", f"tokens:{corpus}", "--seq-len", "16", "--subset", "24",
            "--split", "train,test", "--dtype", "float64", "--batch-size", "5", *PLANE, "--no-progress"]
    lsurf(*args, "--out", out, check=True)
    return args, out


@pytest.mark.mpi
@requires_mpi
def test_hf_gpt2_surface_on_two_ranks_equals_one_process(hf_surface, tmp_path):
    args, one = hf_surface
    mpirun(2, *args, "--out", tmp_path / "two.h5", check=True, timeout=400)
    a, b = _values(one), _values(tmp_path / "two.h5")
    assert set(a) == {f"{s}_{q}" for s in ("train", "test") for q in ("loss", "loss_stderr", "ppl", "acc",
                                                                       "acc_stderr")}
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.mark.cli
def test_streamed_token_windows_give_the_resident_numbers(hf_surface, tmp_path):
    args, one = hf_surface
    out = tmp_path / "streamed.h5"
    lsurf(*args, "--resident", "never", "--workers", "1", "--out", out, check=True)
    with h5py.File(out) as f:
        assert f.attrs["streamed"] == "train,test"
    a, b = _values(one), _values(out)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.mark.cli
def test_hf_centre_loss_equals_transformers_own_labels_loss(hf_surface, gpt2, corpus):
    _, one = hf_surface
    with h5py.File(one) as f:
        centre = f["test_loss"][()].reshape(3, 3)[1, 1]
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True).double()
    x, y = _windows(corpus, "val.bin", 16)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:24].sort().values  # --subset 24
    w = torch.cat([x[idx], y[idx][:, -1:]], 1)  # the windows of T + 1 tokens
    with torch.no_grad():
        own = model(input_ids=w, labels=w).loss.item()
    assert centre == pytest.approx(own, abs=1e-6)


@pytest.mark.cli
def test_plugin_transformer_lm_with_a_per_sequence_loss(corpus, tmp_path):
    out = tmp_path / "plugin.h5"
    lsurf("surface", "--model", "lm_fixtures:tiny_lm", "--loss", "lm_fixtures:sequence_loss",
          "--data", f"tokens:{corpus}", "--seq-len", "16", "--subset", "20", "--dtype", "float64", "--x", "-1:1:3",
          "--no-progress", "--out", out, check=True, env=_env_with_tests())
    model = tiny_lm().double().eval()
    x, y = _windows(corpus, "train.bin", 16)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20].sort().values
    with torch.no_grad():
        want = sequence_loss(model(x[idx]), y[idx]).mean().item()  # each sequence weighs one
    with h5py.File(out) as f:
        assert f["train_loss"][1] == pytest.approx(want, abs=1e-9)
        assert "train_ppl" in f and 0 <= f["train_acc"][1] <= 100


# --- directions for transformer parameters ---------------------------------------------------------

def test_filter_normalisation_of_transformer_tensors():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    lm = nn.ModuleDict({"emb": nn.Embedding(20, 16), "enc": model, "norm": nn.LayerNorm(16), "rms": nn.RMSNorm(16),
                        "head": nn.Linear(16, 20)})
    dirs = random_directions(lm, seed=0)
    names, targets = target_tensors(lm, "weights")
    for name, d, w in zip(names, dirs.x, targets):
        if w.dim() == 1:  # biases and LayerNorm gains: ignored with biasbn
            assert torch.count_nonzero(d) == 0, name
        else:  # each row (an output unit, a token's embedding, a q/k/v in-projection row) has its weight's norm
            torch.testing.assert_close(d.norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-6, msg=name)
    assert any("in_proj_weight" in n for n in names) and {"emb.weight", "rms.weight", "norm.weight"} <= set(names)


def test_gpt2_conv1d_filters_are_columns_and_tied_weights_get_one_direction(gpt2):
    model = api.load_model(f"hf:{gpt2}", None, None)
    for dir_type in ("weights", "states"):
        names, targets = target_tensors(model, dir_type)
        assert "lm_head.weight" not in names and "transformer.wte.weight" in names  # tied: listed once
    names, targets = target_tensors(model, "weights")
    axes = dict(zip(names, filter_axes(model, names)))
    assert axes["transformer.h.0.attn.c_attn.weight"] == 1 and axes["transformer.wte.weight"] == 0
    dirs = random_directions(model, seed=2)
    d = dirs.x[names.index("transformer.h.0.attn.c_attn.weight")]
    w = targets[names.index("transformer.h.0.attn.c_attn.weight")]
    torch.testing.assert_close(d.norm(dim=0), w.norm(dim=0), rtol=1e-5, atol=1e-6)  # (in, out): out units are columns


def test_a_direction_file_refuses_a_model_with_other_names(tmp_path):
    a = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    b = nn.ModuleDict({"first": nn.Linear(3, 4), "second": nn.Linear(4, 2)})
    api.save_directions(random_directions(a, seed=0), tmp_path / "d.h5")
    names, targets = target_tensors(b, "weights")
    with pytest.raises(api.UserError, match=r"is for another model: tensor 0 is '0.weight' there, 'first.weight'"):
        api.load_directions(tmp_path / "d.h5", names, targets, True)


# --- regenerated directions and bfloat16 weights ------------------------------------------------------

@pytest.mark.parametrize("dtype,norm,same", [(torch.float32, "filter", False), (F64, "layer", False),
                                             (torch.float32, "none", True)])
def test_regenerated_directions_are_bitwise_the_stored_ones(gpt2, dtype, norm, same):
    model = api.load_model(f"hf:{gpt2}", None, None, dtype=dtype)
    stored = random_directions(model, seed=7, norm=norm, ignore="none", same_dir=same)
    seeded = random_directions(model, seed=7, norm=norm, ignore="none", same_dir=same, regenerate=True)
    assert isinstance(seeded, SeededDirections)
    for a, b in zip(stored.x + stored.y, list(seeded.x) + list(seeded.y)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert seeded.sha256() == stored.sha256()


def test_regenerated_surface_equals_stored_and_keeps_no_directions(gpt2, corpus, tmp_path):
    split = api.load_data(f"tokens:{corpus}", ("train",), 12, seq_len=16)
    values = []
    for regenerate in (False, True):
        model = api.load_model(f"hf:{gpt2}", None, None)
        dirs = random_directions(model, seed=3, regenerate=regenerate)
        with evaluator(model, split, dirs, batch_size=4) as ev:
            assert (ev.d1 is None) == regenerate
            values.append([ev.evaluate(a, b) for a, b in [(0.5, -0.25), (-1.0, 1.0)]])
    assert values[0] == values[1]  # the same bits: regenerated draws equal the stored directions


def test_bfloat16_weights_are_perturbed_in_float32(gpt2, corpus):
    split = api.load_data(f"tokens:{corpus}", ("train",), 8, seq_len=16)
    model = api.load_model(f"hf:{gpt2}", None, None, dtype=torch.bfloat16)
    centre = [p.detach().clone() for p in model.parameters()]
    dirs = random_directions(model, seed=5, regenerate=True)
    assert all(d.dtype == torch.float32 for d in list(dirs.x)[:3])
    with evaluator(model, split, dirs, dtype=torch.bfloat16, batch_size=4) as ev:
        ev.set_point(0.3, -0.7)
        moved = [p.detach().clone() for p in model.parameters()]
        got = ev.evaluate(0.3, -0.7)
    for i, (c, m) in enumerate(zip(centre, moved)):
        want = (c.float().add(dirs.tensor(0, i), alpha=0.3).add(dirs.tensor(1, i), alpha=-0.7)).to(torch.bfloat16)
        assert torch.equal(m, want), i
    assert all(torch.equal(a, b) for a, b in zip(centre, model.parameters()))  # handed back as it came
    assert math.isfinite(got["train_loss"]) and got["train_ppl"] > 1


# --- bad input: one line, exit 2 -------------------------------------------------------------------

def _bad(tmp_path, corpus, gpt2, case: str) -> list:
    if case == "no config":
        (tmp_path / "empty").mkdir()
        return ["--model", f"hf:{tmp_path / 'empty'}", "--data", f"tokens:{corpus}", "--seq-len", "8"]
    if case == "odd bytes":
        (tmp_path / "odd").mkdir()
        (tmp_path / "odd" / "train.bin").write_bytes(b"\x01\x00" * 50 + b"\x01")
        return ["--model", f"hf:{gpt2}", "--data", f"tokens:{tmp_path / 'odd'}", "--seq-len", "8"]
    if case == "long window":
        return ["--model", f"hf:{gpt2}", "--data", f"tokens:{corpus}", "--seq-len", "100000"]
    (tmp_path / "big").mkdir()
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "big" / "train.bin")  # ids up to 199, vocabulary 64
    return ["--model", f"hf:{gpt2}", "--data", f"tokens:{tmp_path / 'big'}", "--seq-len", "8"]


@pytest.mark.cli
@pytest.mark.parametrize("case,message", [
    ("no config", r"no config\.json"), ("odd bytes", r"not a whole number of uint16 tokens"),
    ("long window", r"--seq-len 100000 is longer than"), ("vocabulary", r"token id 199, but the model's vocabulary"),
])
def test_bad_language_model_input_is_one_line(case, message, tmp_path, corpus, gpt2):
    out = tmp_path / "s.h5"
    p = lsurf("surface", *_bad(tmp_path, corpus, gpt2, case), "--x", "-1:1:3", "--out", out, "--no-progress")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), p.stderr
    assert not out.exists()


# --- the README's language-model example runs ------------------------------------------------------

@pytest.mark.cli
@requires_mpi
def test_readme_language_model_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- lm-example -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README lacks the language-model example"
    script = block.group(1).replace("pip install 'lsurf[hf]'", "true")
    env = _env({"PATH": f"{sys.executable.rsplit('/', 1)[0]}:{_env()['PATH']}", "MPLBACKEND": "Agg"})
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=500)
    assert p.returncode == 0, p.stdout + p.stderr
    with h5py.File(tmp_path / "lm.h5") as f:
        assert f["done"][()].all() and np.isfinite(f["test_loss"][()]).all()
    assert list(tmp_path.glob("*.png")) or list(tmp_path.glob("*.pdf"))
