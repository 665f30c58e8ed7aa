"""Language-model test helpers: a learnable token corpus, a tiny trained GPT-2 saved to disk, and a
plain-PyTorch transformer LM with a per-sequence loss for plug-in tests.

Import as ``from lm_fixtures import ...`` (tests/ is on ``sys.path`` under pytest, as for
``conftest``); as a CLI plug-in, ``--model lm_fixtures:tiny_lm --loss lm_fixtures:sequence_loss``
with tests/ on ``PYTHONPATH``. Every helper seeds its own generators and leaves torch's global RNG
as it found it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _markov_tokens(rng: np.random.Generator, n: int, successor: np.ndarray, stay: float) -> np.ndarray:
    """A chain where each token is followed by its fixed successor with probability ``stay``,
    else by a uniformly drawn token: next-token loss can fall from ln(vocab) to about 0.5."""
    vocab = len(successor)
    noise = rng.random(n) >= stay
    draws = rng.integers(0, vocab, n)
    out = np.empty(n, dtype=np.int64)
    out[0] = draws[0]
    for i in range(1, n):
        out[i] = draws[i] if noise[i] else successor[out[i - 1]]
    return out


def write_tokens(path_dir: str | Path, n_train: int = 4000, n_val: int = 1000, vocab: int = 64, seed: int = 0,
                 dtype: type | np.dtype = np.uint16) -> Path:
    """``train.bin`` and ``val.bin`` (nanoGPT's layout: flat little-endian token ids, no header) in
    ``path_dir``, drawn from one seeded Markov chain so a few training steps lower the loss."""
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab)
    little = np.dtype(dtype).newbyteorder("<")
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        _markov_tokens(rng, n, successor, stay=0.85).astype(little).tofile(path / name)
    return path


def tiny_gpt2(path_dir: str | Path, tokens_dir: str | Path, vocab: int = 64, steps: int = 30, seq_len: int = 16,
              seed: int = 0, token_dtype: type | np.dtype = np.uint16) -> Path:
    """A 2-layer GPT-2 (tied embeddings, as GPT-2 has) trained ``steps`` AdamW steps on random windows
    of ``tokens_dir/train.bin``, saved with ``save_pretrained(path_dir)``. Takes about a second."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokens = torch.from_numpy(np.fromfile(Path(tokens_dir) / "train.bin", dtype=token_dtype).astype(np.int64))
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)  # GPT-2's 50256 is outside this vocabulary
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            start = torch.randint(0, len(tokens) - seq_len - 1, (16,))
            ids = torch.stack([tokens[s: s + seq_len + 1] for s in start.tolist()])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = Path(path_dir)
    model.save_pretrained(path)
    return path


class TinyLM(nn.Module):
    """Token embedding, a causal 2-layer transformer encoder (no dropout), a linear head to logits."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, T, vocab) next-token logits."""
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)  # True: may not attend
        return self.head(self.encoder(self.embed(ids), mask=causal, is_causal=True))


def tiny_lm() -> nn.Module:
    """A ``TinyLM`` drawn from seed 0 without touching the caller's RNG (a ``--model`` plug-in)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyLM()


def sequence_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss: (B, T, V) logits and (B, T) targets -> (B,) mean token cross-entropy of each
    sequence, targets equal to -100 left out (a sequence with none counts 0)."""
    per_token = F.cross_entropy(out.transpose(1, 2), y, ignore_index=-100, reduction="none")
    valid = (y != -100).sum(1).clamp(min=1)
    return per_token.sum(1) / valid.to(per_token.dtype)
