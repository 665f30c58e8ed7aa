"""Peak memory per rank of a GPT-2-size language model's surface, measured in one run on the CPU.

A GPT-2 124M configuration (12 layers, 768 wide, 50 257 tokens; random weights, nothing is
downloaded) is saved once with ``save_pretrained`` in float32 and in bfloat16; then, each in a
fresh process, a 1-D curve of a few points on a few sequences of a token file is evaluated through
``lsurf surface`` with:

- ``float32`` weights and stored directions (θ*, d₁, d₂ beside the weights: 4P),
- ``float32`` with ``--regenerate`` (directions drawn again tensor by tensor: 2P),
- ``bfloat16`` weights, stored and regenerated (directions are float32: perturbed, then rounded).

The peak resident set (VmHWM) of each process is read by a wrapper that runs lsurf in-process; a
process that only imports gives the fixed cost, one that only loads the model what the weights
cost. From the regenerated bfloat16 run's bytes per parameter beyond the fixed cost, the
parameter count that fits an 80 GB GPU is estimated (activations and logits of the batch held as
measured here, a few sequences; bigger batches need more). By design the steady state is 16, 8, 12
and 4 bytes per parameter (float32 stored, regenerated; bfloat16 stored, regenerated); on the CPU the
peak adds the transients of the largest tensor (drawn and perturbed in float32) and what glibc keeps
of freed buffers, so the estimate is conservative.

Run: ``python bench/bench_lm_memory.py [--quick]`` (quick: a 6-layer model); the last line is JSON.
``--smoke``: a 1-layer, 64-wide model on 2 sequences of 16 tokens; float32 stored and bfloat16
regenerated runs only (the two code paths; seconds each; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}

# Runs in a fresh process: load (and, unless "load-only", sample), then print the peak RSS in bytes.
_PROBE = r"""
import sys, json
import lsurf
from lsurf.cli.main import main
mode, args = sys.argv[1], sys.argv[2:]
if mode == "import-only":
    import transformers
    params = None
elif mode == "load-only":
    import torch
    model = lsurf.load_model(args[0], None, None, dtype=getattr(torch, args[1]))
    params = sum(p.numel() for p in model.parameters())
else:
    rc = main(args)
    assert rc in (0, None), rc
    params = None
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak": peak, "params": params}))
"""


def make_models(folder: Path, layers: int, width: int = 768, heads: int = 12) -> None:
    """The same random GPT-2 saved in float32 and in bfloat16 (as large checkpoints are shipped)."""
    import torch
    import transformers

    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=50257, n_positions=1024)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder / "float32")
    model.to(torch.bfloat16).save_pretrained(folder / "bfloat16")


def probe(mode: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, *args], check=True, capture_output=True, text=True,
                         env=ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 6-layer model instead of GPT-2's 12")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (seconds)")
    a = ap.parse_args()
    layers = 1 if a.smoke else 6 if a.quick else 12
    if a.smoke:
        a.seq_len, a.sequences = 16, 2
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_models(d / "gpt2", layers, *((64, 2) if a.smoke else ()))
        (d / "corpus").mkdir()
        np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16).tofile(d / "corpus" / "train.bin")
        common = ["surface", "--data", f"tokens:{d / 'corpus'}", "--seq-len",
                  str(a.seq_len), "--subset", str(a.sequences), "--batch-size", "2", "--x", "-1:1:3",
                  "--threads", "2", "--no-progress", "--overwrite", "--out", str(d / "s.h5")]
        rows = {"python, torch, transformers": probe("import-only", [])}
        for dtype in ("float32", "bfloat16"):
            model = f"hf:{d / 'gpt2' / dtype}"
            if not (a.smoke and dtype == "bfloat16"):
                rows[f"{dtype} weights only"] = probe("load-only", [model, dtype])
            for regen in ((dtype == "bfloat16",) if a.smoke else (False, True)):
                got = probe("run", [*common, "--model", model, "--dtype", dtype] + (["--regenerate"] if regen else []))
                rows[f"{dtype} {'regenerated' if regen else 'stored'}"] = got
        params = rows["float32 weights only"]["params"]
    print(f"GPT-2 config, {layers} layers: {params / 1e6:.1f} M parameters; {a.sequences} sequences of "
          f"{a.seq_len} tokens, batch 2, 3 points")
    fixed = rows["python, torch, transformers"]["peak"]
    print(f"{'run':28s} {'peak RSS':>10s} {'beyond imports, bytes/param':>28s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['peak'] / 2**30:8.2f} GiB {(r['peak'] - fixed) / params:28.1f}")
    per_param = (rows["bfloat16 regenerated"]["peak"] - fixed) / params
    fits = 80e9 * 0.9 / per_param  # 10 % of the card kept for the CUDA context and fragmentation
    print(f"bfloat16 + --regenerate: {per_param:.1f} bytes per parameter beyond a fixed "
          f"{fixed / 2**30:.2f} GiB -> about {fits / 1e9:.1f} B parameters fit an 80 GB GPU")
    print(json.dumps({"params": params, "layers": layers, "peak_bytes": {k: v["peak"] for k, v in rows.items()},
                      "bf16_regenerated_bytes_per_param": per_param, "params_fitting_80GB": fits}))


if __name__ == "__main__":
    main()
