"""ConSE: a text-aligned image vector without CLIP, from packaged models only.

Norouzi et al. (ICLR 2014), "Zero-Shot Learning by Convex Combination of Semantic Embeddings":
an image's vector is the probability-weighted mean of the text embeddings of its top-k class names.
Here the classifier is the packaged EfficientNet-Lite0 (ImageNet-1k) and the text encoder is the
preset's sentence encoder (all-MiniLM-L6-v2 offline), so the image vector lives in the same space
as entity texts and captions: it can be scored against `name. description` directly, where the
papers use CLIP's image embedding.

    enc = load_image_encoder("conse")            # = "conse:minilm", 384-d, L2-normalised
    enc.encode([pil_image])                      # (1, 384)

Limits (measured, see the README of #13): ImageNet has no "person" class, so a portrait comes out
as "suit, military uniform, ..." and ConSE cannot tell two people apart; that is what the face
features are for.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from PIL import Image

from ..paths import atomic_write, cache_dir
from .cache import cached_model
from .image import _as_pil_list, _batches, _cached_encoder, _unique_imagenet_names

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "minilm"
TOP_K = 10


class ConSEImageEncoder:
    """ImageEncoder: EfficientNet-Lite0 top-k ImageNet probabilities x label-name text embeddings."""

    def __init__(self, text_spec: str = DEFAULT_TEXT_ENCODER, device: str = "cpu", k: int = TOP_K, text_encoder=None):
        """`text_encoder`: an already loaded text encoder (its `.name` then names the space)."""
        from . import get_backend

        self.device, self.k = device, int(k)
        self.text_encoder = text_encoder if text_encoder is not None else get_backend("text_encoder", text_spec, device)
        self.text_spec = text_spec if text_encoder is None else str(getattr(text_encoder, "name", text_spec))
        self.name = f"conse:{self.text_spec}" + ("" if self.k == TOP_K else f"@{self.k}")
        self.classifier = _cached_encoder("efficientnet-lite0", "", device)
        self.dim = int(self.text_encoder.dim)
        self.label_names, self._inverse = _unique_imagenet_names()
        self.label_vectors = torch.from_numpy(self._label_embeddings())

    def _label_embeddings(self) -> np.ndarray:
        """(n_unique_labels, dim) L2-normalised embeddings of the ImageNet class names, encoded once
        and cached on disk per (text encoder, label list)."""
        digest = hashlib.sha256(("\n".join(self.label_names) + "|" + self.text_encoder.name).encode()).hexdigest()[:16]
        path = cache_dir("conse") / f"labels-{digest}.npy"
        if path.is_file():
            try:
                vecs = np.load(path, allow_pickle=False)
                if vecs.shape == (len(self.label_names), self.dim):
                    return vecs.astype(np.float32)
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable ConSE label cache %s: %s", path, e)
        vecs = np.asarray(self.text_encoder.encode(list(self.label_names)), np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
        try:
            with atomic_write(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, vecs, allow_pickle=False)
        except OSError as e:  # a read-only cache only costs the encoding next time
            log.warning("could not cache ConSE label embeddings at %s: %s", path, e)
        return vecs

    def label_probabilities(self, images) -> torch.Tensor:
        """(n, n_unique_labels) ImageNet probabilities, classes of the same name added up."""
        images = _as_pil_list(images)
        if not images:
            return torch.zeros((0, len(self.label_names)))
        probs = self.classifier.logits(images).softmax(-1)
        merged = torch.zeros(len(images), len(self.label_names))
        return merged.index_add_(1, self._inverse, probs)

    def encode(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
        images = _as_pil_list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for batch in _batches(images, batch_size):
            probs = self.label_probabilities(batch)
            top = probs.topk(min(self.k, probs.shape[1]), dim=1)
            weights = top.values / top.values.sum(dim=1, keepdim=True).clamp_min(1e-12)
            vecs = torch.einsum("nk,nkd->nd", weights, self.label_vectors[top.indices])
            out.append(torch.nn.functional.normalize(vecs, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def top_labels(self, image, k: int | None = None) -> list[tuple[str, float]]:
        probs = self.label_probabilities([image])[0]
        top = probs.topk(k or self.k)
        return [(self.label_names[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@cached_model
def load_conse_encoder(text_spec: str = DEFAULT_TEXT_ENCODER, device: str = "cpu") -> ConSEImageEncoder:
    return ConSEImageEncoder(text_spec or DEFAULT_TEXT_ENCODER, device)

