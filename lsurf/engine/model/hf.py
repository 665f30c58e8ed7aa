"""Hugging Face models from disk: ``hf:DIR`` (a causal LM) and ``hf-seq-cls:DIR`` (a sequence classifier).

``DIR`` is a folder written by ``save_pretrained`` (``config.json`` and the weights). Nothing is
fetched from the Hub (``local_files_only=True``): a loss surface is computed on many ranks, often
on nodes without network access, and must not depend on what a remote repository holds today.

``transformers`` is an optional extra (``pip install 'lsurf[hf]'``) and is imported only when such a
model is loaded, so ``import lsurf`` works without it. Loading is quiet and leaves the process as it
was: transformers' logging verbosity and progress bars are restored afterwards. Every way the folder
can be wrong is a one-line :class:`~lsurf.errors.UserError` naming the spec, including a checkpoint
that lacks some of the model's tensors, which transformers would otherwise initialise at random
with no more than a log line.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lsurf.errors import UserError

# spec prefix -> the transformers Auto class that loads it
HF_KINDS = {"hf": "AutoModelForCausalLM", "hf-seq-cls": "AutoModelForSequenceClassification"}

# Attention: the default implementation (sdpa in transformers 5.23, torch 2.13) runs in float64 on
# CPU and agrees with "eager" to 2e-16 on GPT-2 logits, so no attn_implementation is forced.


def is_hf(spec: str) -> bool:
    """Whether a model spec names a Hugging Face folder (``hf:DIR`` or ``hf-seq-cls:DIR``)."""
    kind, sep, _ = spec.partition(":")
    return bool(sep) and kind in HF_KINDS


def load_hf(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a ``save_pretrained`` folder holds, in ``dtype``, in eval mode, without a KV cache.

    The dtype is applied while loading, so float64 weights keep their precision and bfloat16 ones
    never take float32 memory. ``use_cache`` is turned off: an evaluation never reads the cache,
    which would only cost memory.
    """
    path, transformers, auto = _auto_class(spec)
    kwargs: dict[str, Any] = {_dtype_keyword(transformers): dtype, "local_files_only": True,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    with _quiet(transformers):
        try:
            model, info = auto.from_pretrained(str(path), **kwargs)
        except (MemoryError, torch.OutOfMemoryError):
            raise  # the machine's limit, not the user's input: keep the traceback
        except Exception as e:
            raise UserError(f"model {spec!r}: cannot load {path} ({_first_line(e)})") from None
    _check_loading_info(spec, path, info)
    model.config.use_cache = False
    model.eval()
    return model


def build_hf(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a ``save_pretrained`` folder as its ``config.json`` describes it, in ``dtype``,
    in eval mode, without a KV cache — its weights not read (freshly initialised): for
    lsurf.engine.model.sharding, which builds it with its parameters on the meta device and reads each
    rank's rows of the folder's weights itself."""
    path, transformers, auto = _auto_class(spec)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            model = auto.from_config(config, **{_dtype_keyword(transformers): dtype})
        except Exception as e:
            raise UserError(f"model {spec!r}: cannot build it from {path / 'config.json'} ({_first_line(e)})") from None
    model.config.use_cache = False
    return model.eval()


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input token embedding, or None where it has none.

    Token data whose largest id is at least this would fail at the first batch holding it (or, on a
    GPU, read past the table), so it is refused before a run starts. Hugging Face models name their
    input embedding; for any other module it is the first ``nn.Embedding`` it holds.
    """
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except NotImplementedError:  # some architectures have no token embedding
            emb = None
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor):  # an embedding of another class (e.g. a scaled one)
            return int(weight.shape[0])
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def _auto_class(spec: str) -> tuple[Path, ModuleType, Any]:
    """The folder a spec names (checked), transformers, and the Auto class of the spec's kind."""
    kind, _, raw = spec.partition(":")
    if kind not in HF_KINDS:
        raise UserError(f"model {spec!r}: expected one of {', '.join(k + ':PATH' for k in HF_KINDS)}")
    path = _check_folder(spec, raw)
    transformers = _import_transformers(spec)
    return path, transformers, getattr(transformers, HF_KINDS[kind])


def _check_folder(spec: str, raw: str) -> Path:
    """The folder, checked before transformers sees it (whose messages for these cases speak of the Hub)."""
    if not raw:
        raise UserError(f"model {spec!r}: expected {spec.partition(':')[0]}:PATH, a folder written by save_pretrained")
    path = Path(raw).expanduser()
    if not path.exists():
        raise UserError(f"model {spec!r}: {path} does not exist (models are read from disk only: "
                        "a folder written by save_pretrained)")
    if not path.is_dir():
        raise UserError(f"model {spec!r}: {path} is not a folder (a folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise UserError(f"model {spec!r}: no config.json in {path} (a folder written by save_pretrained)")
    return path


def _import_transformers(spec: str) -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise UserError(f"model {spec!r} needs the transformers package: pip install 'lsurf[hf]'") from None
    return transformers


def _dtype_keyword(transformers: ModuleType) -> str:
    """``dtype=`` since transformers 4.56; ``torch_dtype=`` before (now deprecated, with a warning).
    Older versions would take ``dtype=`` silently as a config attribute and load float32."""
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """Silence transformers' log lines, progress bars and Python warnings while loading, then put
    its verbosity and progress-bar setting back: a library call leaves process state as it found it."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.logging.enable_progress_bar()


def _check_loading_info(spec: str, path: Path, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not fill the model: transformers would draw the missing or
    mis-shaped tensors at random and carry on, and the surface would be that of another model."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, have, want = mismatched[0]
        raise UserError(f"model {spec!r}: the weights in {path} do not fit its config.json: {key!r} has shape "
                        f"{tuple(have)}, the config makes it {tuple(want)}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(f"model {spec!r}: the weights in {path} lack {len(missing)} of the model's tensors, "
                        f"first {missing[0]!r} (saved from another kind of model?)")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
