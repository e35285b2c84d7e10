"""Image encoders (and the CLIP text tower) behind one small interface.

    enc = load_image_encoder("efficientnet-lite0")           # packaged, offline, 1280-d
    enc = load_image_encoder("clip:openai/clip-vit-base-patch32")        # projected, 512-d (DIM)
    enc = load_image_encoder("clip-pooled:openai/clip-vit-large-patch14")  # pooler output, 1024-d (GEMEL)
    enc = load_image_encoder("open_clip:ViT-B-32/openai")    # optional; needs open_clip (+ torchvision)
    enc = load_image_encoder("conse")                        # packaged, offline: Lite0 ImageNet probabilities
                                                             # mapped into MiniLM's text space (384-d), see conse.py
    vecs = enc.encode([pil_image, ...])                      # float32 (n, enc.dim), L2-normalised

    txt = load_clip_text_encoder("clip:openai/clip-vit-base-patch32")
    txt.encode(["a photo of a cat"])                         # same space as the clip: images

After "clip:" / "clip-pooled:" comes a Hugging Face hub id or a local directory written by
save_pretrained; both go through the same from_pretrained code (a hub id: mel.backends.hub's
offline rule). Models are loaded once per (spec, device) into the one model cache
(mel.backends.cache; `clear_model_cache()` forgets them), put in eval mode with gradients off, and
run under torch.inference_mode.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, InputError, ModelUnavailableError
from ..imageio import load_image
from . import efficientnet_lite as lite
from .cache import cached_model, clear_model_cache
from .hub import OFFLINE_HINT, from_pretrained
from .text import TextEncoder, _progress
from .text import check_device as _check_device

__all__ = ["ImageEncoder", "TextEncoder", "Lite0ImageEncoder", "CLIPImageEncoder", "CLIPTextEncoder",
           "OpenCLIPImageEncoder", "load_image_encoder", "load_clip_text_encoder", "imagenet_top_labels",
           "from_pretrained", "clear_model_cache", "OFFLINE_HINT", "IMAGE_ENCODER_SPECS"]

log = logging.getLogger(__name__)


@runtime_checkable
class ImageEncoder(Protocol):
    name: str
    dim: int

    def encode(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray: ...


# -----------------------------------------------------------------------------
# helpers


def _l2_normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)


def _as_pil_list(images) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for im in images:
        # a path, bytes or a PIL image of any mode (16-bit, alpha, CMYK): the one faithful RGB conversion
        out.append(im if isinstance(im, Image.Image) and im.mode == "RGB" else load_image(im))
    return out


def _encode_images(images, batch_size: int, dim: int, encode_batch) -> np.ndarray:
    """(n, dim) float32 features: `encode_batch(list of PIL images)` over batches, without gradients."""
    images = _as_pil_list(images)
    if not images:
        return np.zeros((0, dim), dtype=np.float32)
    with torch.inference_mode():
        out = [encode_batch(batch) for batch in _batches(images, batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)


def _batches(items: list, batch_size: int):
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def _frozen(model: torch.nn.Module, device: str) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty encoder spec; expected e.g. 'efficientnet-lite0' or 'clip:openai/clip-vit-base-patch32'")
    kind, sep, ref = spec.strip().partition(":")
    return kind.strip().lower(), ref.strip() if sep else ""


# -----------------------------------------------------------------------------
# EfficientNet-Lite0 (packaged)


class Lite0ImageEncoder:
    """Pooled 1280-d features of the packaged EfficientNet-Lite0 (ImageNet-trained)."""

    name = "efficientnet-lite0 (packaged)"

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.model = lite.load_lite0(device)
        self.dim = self.model.config.head_channels

    def encode(self, images: list[Image.Image], batch_size: int = 16, normalize: bool = True) -> np.ndarray:
        def features(batch):
            feats = self.model.features(lite.preprocess(batch, self.model.config).to(self.device))
            return _l2_normalise(feats) if normalize else feats.float().cpu().numpy()
        return _encode_images(images, batch_size, self.dim, features)

    def logits(self, images: list[Image.Image]) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(lite.preprocess(_as_pil_list(images), self.model.config).to(self.device)).float().cpu()


def imagenet_top_labels(image, k: int = 5, device: str = "cpu") -> list[tuple[str, float]]:
    """Top-k ImageNet-1k labels of an image with softmax probabilities, by the packaged Lite0.

    `image`: a PIL image or anything `mel.imageio.load_image` accepts.
    """
    if not 1 <= k <= 1000:
        raise InputError(f"k must be between 1 and 1000, got {k}")
    enc = _cached_encoder("efficientnet-lite0", "", _check_device(device))
    probs = enc.logits([image]).softmax(-1)[0]
    # ImageNet has classes with the same name (two "missile", two "sunglasses"): add them up
    names, inverse = _unique_imagenet_names()
    merged = torch.zeros(len(names)).index_add_(0, inverse, probs)
    top = merged.topk(min(k, len(names)))
    return [(names[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@functools.lru_cache(maxsize=1)
def _unique_imagenet_names() -> tuple[list[str], torch.Tensor]:
    names: list[str] = []
    index: dict[str, int] = {}
    inverse = []
    for name in lite.imagenet_class_names():
        if name not in index:
            index[name] = len(names)
            names.append(name)
        inverse.append(index[name])
    return names, torch.tensor(inverse, dtype=torch.long)


# -----------------------------------------------------------------------------
# CLIP through transformers


@cached_model
def _load_clip(ref: str, device: str) -> torch.nn.Module:
    """One frozen CLIP per (ref, device), shared by the image and text encoders: a full
    `CLIPModel` (model_type "clip"), or a vision-only `CLIPVisionModelWithProjection` checkpoint."""
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    config = from_pretrained(AutoConfig, ref, f"CLIP config {ref}")
    model_type = getattr(config, "model_type", "")
    if model_type == "clip":
        cls = CLIPModel
    elif model_type == "clip_vision_model":
        cls = CLIPVisionModelWithProjection
    else:
        raise CheckpointError(f"{ref} is a {model_type or 'unknown'} model, not CLIP (expected model_type 'clip')")
    return _frozen(from_pretrained(cls, ref, f"CLIP model {ref}", config=config), device)


class CLIPImageEncoder:
    """CLIP image embeddings: projected (`clip:`, the space shared with CLIP text) or the vision
    tower's pooled output (`clip-pooled:`, e.g. 1024-d for ViT-L/14 as GEMEL uses)."""

    def __init__(self, ref: str, device: str = "cpu", pooled: bool = False):
        from transformers import AutoImageProcessor

        self.ref, self.device, self.pooled = ref, device, pooled
        self.name = ("clip-pooled:" if pooled else "clip:") + ref
        self.model = _load_clip(ref, device)
        self.processor = from_pretrained(AutoImageProcessor, ref, f"CLIP image processor {ref}")
        vision_cfg = getattr(self.model.config, "vision_config", self.model.config)
        if pooled:
            self.dim = int(vision_cfg.hidden_size)
        else:
            self.dim = int(self.model.visual_projection.out_features)

    def encode(self, images: list[Image.Image], batch_size: int = 16, normalize: bool = True) -> np.ndarray:
        """(n, dim) float32 embeddings; L2-normalised unless normalize=False (raw, e.g. for a
        learned mapper that wants the pooler output as it is)."""
        dtype = next(self.model.parameters()).dtype

        def features(batch):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, dtype)
            feats = self.model.vision_model(pixel_values=pixels).pooler_output
            if not self.pooled:
                feats = self.model.visual_projection(feats)
            return _l2_normalise(feats) if normalize else feats.float().cpu().numpy()
        return _encode_images(images, batch_size, self.dim, features)


class CLIPTextEncoder(TextEncoder):
    """CLIP text embeddings (projected), in the same space as `clip:` image embeddings."""

    def __init__(self, ref: str, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.ref, self.device = ref, device
        self.name = "clip-text:" + ref
        self.model = _load_clip(ref, device)
        if not hasattr(self.model, "text_model"):
            raise CheckpointError(f"{ref} is a vision-only CLIP checkpoint: it has no text tower")
        self.tokenizer = from_pretrained(AutoTokenizer, ref, f"CLIP tokenizer {ref}")
        self.dim = int(self.model.text_projection.out_features)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        n_batches = -(-len(texts) // max(batch_size, 1))
        with torch.inference_mode():
            for batch in _progress(_batches(texts, batch_size), n_batches, show_progress, f"encoding ({self.name})"):
                tok = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
                pooled = self.model.text_model(**tok).pooler_output
                out.append(_l2_normalise(self.model.text_projection(pooled)))
        return np.concatenate(out).astype(np.float32, copy=False)


# -----------------------------------------------------------------------------
# open_clip (optional)


class OpenCLIPImageEncoder:
    """open_clip image embeddings (`open_clip:<arch>/<pretrained>`, e.g. ViT-B-32/openai).

    Optional: open_clip imports torchvision, which is not available everywhere."""

    def __init__(self, ref: str, device: str = "cpu"):
        try:
            import open_clip  # noqa: PLC0415
        except Exception as e:  # ImportError, or torchvision failing inside it  # noqa: BLE001
            raise ModelUnavailableError(
                f"open_clip is not importable here ({type(e).__name__}: {e}); it needs torchvision. "
                f"Use the transformers backend instead, e.g. 'clip:openai/clip-vit-base-patch32', or {OFFLINE_HINT}"
            ) from e
        arch, _, pretrained = ref.partition("/")
        if not arch or not pretrained:
            raise InputError(f"open_clip spec must be 'open_clip:<arch>/<pretrained>', e.g. 'open_clip:ViT-B-32/openai'; got {ref!r}")
        self.name = f"open_clip:{arch}/{pretrained}"
        self.device = device
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        except Exception as e:  # noqa: BLE001
            raise ModelUnavailableError(f"open_clip could not load {arch}/{pretrained}: {e}. {OFFLINE_HINT}") from e
        self.model = _frozen(model, device)
        self.preprocess = preprocess
        with torch.inference_mode():
            probe = self.model.encode_image(preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(device))
        self.dim = int(probe.shape[-1])

    def encode(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
        return _encode_images(images, batch_size, self.dim, lambda batch: _l2_normalise(
            self.model.encode_image(torch.stack([self.preprocess(im) for im in batch]).to(self.device))))


# -----------------------------------------------------------------------------
# factories

IMAGE_ENCODER_SPECS = (
    "efficientnet-lite0",
    "clip:<hub id or dir>",
    "clip-pooled:<hub id or dir>",
    "open_clip:<arch>/<pretrained>",
    "conse[:<text encoder spec>]",
)


@cached_model
def _cached_encoder(kind: str, ref: str, device: str):
    if kind in ("efficientnet-lite0", "lite0", "efficientnet_lite0"):
        return Lite0ImageEncoder(device)
    if kind == "clip":
        return CLIPImageEncoder(ref, device, pooled=False)
    if kind == "clip-pooled":
        return CLIPImageEncoder(ref, device, pooled=True)
    if kind in ("open_clip", "open-clip", "openclip"):
        return OpenCLIPImageEncoder(ref, device)
    raise AssertionError(kind)


def load_image_encoder(spec: str, device: str = "cpu") -> ImageEncoder:
    """An ImageEncoder for `spec` (see IMAGE_ENCODER_SPECS). Loaded once per (spec, device)."""
    kind, ref = _split_spec(spec)
    if kind in ("efficientnet-lite0", "lite0", "efficientnet_lite0"):
        if ref:
            raise InputError(f"'efficientnet-lite0' takes no argument; got {spec!r}")
    elif kind == "conse":  # a text-aligned image vector from packaged models (default text encoder: minilm)
        from .conse import load_conse_encoder
        return load_conse_encoder(ref, _check_device(device))
    elif kind in ("clip", "clip-pooled", "open_clip", "open-clip", "openclip"):
        if not ref:
            raise InputError(f"encoder spec {spec!r} needs a model after the colon, e.g. '{kind}:openai/clip-vit-base-patch32'")
    else:
        raise InputError(f"unknown image encoder {spec!r}; expected one of {', '.join(IMAGE_ENCODER_SPECS)}")
    return _cached_encoder(kind, ref, _check_device(device))


@cached_model
def _cached_text_encoder(ref: str, device: str) -> CLIPTextEncoder:
    return CLIPTextEncoder(ref, device)


def load_clip_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """The CLIP text tower for `clip:<hub id or dir>` (a bare id/dir works too)."""
    kind, ref = _split_spec(spec)
    if not ref:  # bare "openai/clip-vit-base-patch32" or a path without a colon
        ref = spec.strip()
    elif kind not in ("clip", "clip-pooled", "clip-text"):
        if Path(spec).exists():  # a Windows-style path such as C:\models\clip
            ref = spec
        else:
            raise InputError(f"CLIP text encoder spec must be 'clip:<hub id or dir>', got {spec!r}")
    return _cached_text_encoder(ref, _check_device(device))

