"""Hugging Face models from disk (``hf:DIR``, ``hf-seq-cls:DIR``): what loads equals transformers'
own loading, the loss is the shift-by-one cross-entropy, every bad folder is one line, and loading
leaves transformers' logging as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, _env
from lm_fixtures import TinyLM, tiny_lm
from torch import nn

from lsurf.engine.model.hf import HF_KINDS, is_hf, load_hf, vocabulary_size
from lsurf.engine.model.models import DigitsCNN
from lsurf.errors import UserError

transformers = pytest.importorskip("transformers")
F64 = torch.float64


def _val_windows(corpus, length: int, n: int = 12) -> torch.Tensor:
    tokens = np.fromfile(corpus / "val.bin", dtype=np.uint16).astype(np.int64)
    return torch.from_numpy(tokens[: n * length].reshape(n, length))


def test_is_hf_recognises_the_two_prefixes_only():
    assert set(HF_KINDS) == {"hf", "hf-seq-cls"}
    assert is_hf("hf:/models/gpt2") and is_hf("hf-seq-cls:rel/dir") and is_hf("hf:")
    assert not any(map(is_hf, ["resnet20", "lm_fixtures:tiny_lm", "hfx:/a", "hf", "/models/hf:x"]))


def test_round_trip_equals_transformers_own_loading(gpt2, corpus):
    model = load_hf(f"hf:{gpt2}", F64)
    ref = transformers.GPT2LMHeadModel.from_pretrained(gpt2, local_files_only=True).to(F64).eval()
    ids = _val_windows(corpus, 16)
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert got.dtype == F64 and got.shape == (12, 16, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert model.config.use_cache is False and not model.training
    params, state = list(model.parameters()), model.state_dict()
    assert all(p.dtype == F64 for p in params)
    assert len(params) == 28 and len(state) == len(params) + 1  # lm_head.weight is wte.weight: one parameter
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loaded_dtype_follows_the_request(gpt2):
    for dtype in (torch.float32, torch.bfloat16):
        assert {p.dtype for p in load_hf(f"hf:{gpt2}", dtype).parameters()} == {dtype}


def test_centre_loss_is_the_shift_by_one_cross_entropy(gpt2, corpus):
    model = load_hf(f"hf:{gpt2}", F64)
    w = _val_windows(corpus, 17)  # windows of T + 1 tokens, T = 16
    with torch.no_grad():
        own = model(input_ids=w, labels=w).loss.item()
        logits = model(input_ids=w).logits
    # by hand: position t predicts token t + 1; the mean over all predicted tokens
    logp = torch.log_softmax(logits[:, :-1].to(F64), dim=-1)
    by_hand = -logp.gather(-1, w[:, 1:, None]).mean().item()
    assert own == pytest.approx(by_hand, abs=1e-6)
    assert own < np.log(64) - 1  # the corpus is learnable and the fixture learned it


def test_sequence_classifier_loads_through_hf_seq_cls(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=3,
                                     pad_token_id=0, bos_token_id=63, eos_token_id=63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    model = load_hf(f"hf-seq-cls:{tmp_path}", F64)
    assert isinstance(model, transformers.GPT2ForSequenceClassification) and model.config.use_cache is False
    with torch.no_grad():
        logits = model(input_ids=torch.randint(1, 64, (5, 9))).logits
    assert logits.shape == (5, 3) and logits.dtype == F64


def _one_line_error(spec: str) -> str:
    with pytest.raises(UserError) as info:
        load_hf(spec)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message
    return message


def test_bad_folders_are_one_line_errors(tmp_path, gpt2):
    assert "does not exist" in _one_line_error(f"hf:{tmp_path / 'nowhere'}")
    assert "expected hf:PATH" in _one_line_error("hf:")
    (tmp_path / "empty").mkdir()
    assert "no config.json in" in _one_line_error(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _one_line_error(f"hf:{tmp_path / 'file'}")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("not json {")
    assert "not a valid JSON file" in _one_line_error(f"hf:{tmp_path / 'garbage'}")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert "no-such-architecture" in _one_line_error(f"hf:{tmp_path / 'alien'}")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_bytes((gpt2 / "config.json").read_bytes())
    assert "model.safetensors" in _one_line_error(f"hf:{tmp_path / 'bare'}")  # config without weights
    (tmp_path / "bare" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load" in _one_line_error(f"hf:{tmp_path / 'bare'}")


def test_weights_that_do_not_fill_the_model_are_refused(tmp_path, gpt2):
    from safetensors.torch import load_file, save_file

    # a causal LM's folder has no classification head: transformers would draw it at random
    assert "lack 1 of the model's tensors, first 'score.weight'" in _one_line_error(f"hf-seq-cls:{gpt2}")
    state = load_file(gpt2 / "model.safetensors")
    (tmp_path / "config.json").write_bytes((gpt2 / "config.json").read_bytes())
    del state["transformer.h.1.ln_2.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "first 'transformer.h.1.ln_2.bias'" in _one_line_error(f"hf:{tmp_path}")
    state["transformer.h.1.ln_2.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "'transformer.h.1.ln_2.bias' has shape (5,), the config makes it (32,)" in _one_line_error(f"hf:{tmp_path}")


def test_without_transformers_the_error_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from lsurf.engine.model.hf import load_hf\n"
            "from lsurf.errors import UserError\n"
            f"try:\n    load_hf({'hf:' + str(tmp_path)!r})\n"
            "except UserError as e:\n    print(e)\n")
    (tmp_path / "config.json").write_text("{}")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"model 'hf:{tmp_path}' needs the transformers package: pip install 'lsurf[hf]'"


def test_vocabulary_size_is_the_input_embedding_rows(gpt2):
    assert vocabulary_size(load_hf(f"hf:{gpt2}")) == 64
    assert vocabulary_size(tiny_lm()) == 64 and vocabulary_size(TinyLM(vocab=17)) == 17
    assert vocabulary_size(nn.Sequential(nn.Linear(3, 4), nn.Embedding(9, 2), nn.Embedding(5, 2))) == 9
    assert vocabulary_size(DigitsCNN()) is None


def test_loading_is_quiet_and_leaves_logging_as_it_was(gpt2, tmp_path, capfd):
    log = transformers.logging
    before, bars_before = log.get_verbosity(), log.is_progress_bar_enabled()
    (tmp_path / "config.json").write_text("not json {")
    try:
        for verbosity, bars in [(log.INFO, True), (log.WARNING, False)]:
            log.set_verbosity(verbosity)
            (log.enable_progress_bar if bars else log.disable_progress_bar)()
            filters = list(warnings.filters)
            capfd.readouterr()
            load_hf(f"hf:{gpt2}")
            with pytest.raises(UserError):
                load_hf(f"hf:{tmp_path}")  # and after a failure inside transformers
            assert log.get_verbosity() == verbosity and log.is_progress_bar_enabled() == bars
            assert warnings.filters == filters
            out, err = capfd.readouterr()
            assert out == "" and err == ""  # no log lines, no progress bars
    finally:
        log.set_verbosity(before)
        (log.enable_progress_bar if bars_before else log.disable_progress_bar)()
