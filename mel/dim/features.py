"""DIM's frozen features, batched, with masks for what a mention or entity lacks.

Mention side (one vector each, from the preset's encoders):
    context   `mention [SEP] sentence`            text encoder
    mention   the mention alone                   text encoder
    image     the mention's image                 image encoder   (masked when there is none)
    cue       the expert cue about the image      cue provider -> text encoder (masked likewise)
Entity side:
    text      `name. description` (the KB's `entity_text`), read from the KB's stored dense text
              index when the KB was embedded with the same encoder, so ranking against 18,880
              entities re-encodes nothing
    image     the entity image from the KB's image index (masked when there is none)

A missing image or cue gives a zero vector AND a False mask bit; the fusion head masks it in
attention, so the zeros are never read (the tests check that any values give the same output).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, KBError
from ..kb import entity_text
from ..types import Mention

log = logging.getLogger(__name__)

SEP = " [SEP] "


def context_text(mention: Mention) -> str:
    """DIM's `mention [SEP] sentence`."""
    return f"{mention.text}{SEP}{mention.caption}"


@dataclass
class MentionFeatures:
    context: np.ndarray      # (n, text_dim)
    mention: np.ndarray      # (n, text_dim)
    image: np.ndarray        # (n, image_dim), zeros where image_mask is False
    image_mask: np.ndarray   # (n,) bool
    cue: np.ndarray          # (n, text_dim), zeros where cue_mask is False
    cue_mask: np.ndarray     # (n,) bool
    cues: list[dict | None] = field(default_factory=list)   # {"text", "provider", "question"} per mention
    notes: list[str | None] = field(default_factory=list)   # why an image was not used, per mention

    def __len__(self) -> int:
        return len(self.context)

    def rows(self, idx) -> "MentionFeatures":
        idx = np.asarray(idx)
        return MentionFeatures(self.context[idx], self.mention[idx], self.image[idx], self.image_mask[idx],
                               self.cue[idx], self.cue_mask[idx],
                               [self.cues[i] for i in idx] if self.cues else [],
                               [self.notes[i] for i in idx] if self.notes else [])

    def tensors(self, device="cpu") -> dict:
        import torch
        return {"context": torch.from_numpy(self.context).to(device), "mention": torch.from_numpy(self.mention).to(device),
                "image": torch.from_numpy(self.image).to(device), "cue": torch.from_numpy(self.cue).to(device),
                "image_mask": torch.from_numpy(self.image_mask).to(device),
                "cue_mask": torch.from_numpy(self.cue_mask).to(device)}


class FeatureExtractor:
    """Computes DIM's features with a preset's frozen encoders.

    `use_image` / `use_cue` switch the visual features off (they are then always masked).
    The image encoder and the cue provider are loaded on first need, i.e. never for a text-only
    batch, except that `image_dim` (when not given) asks the image encoder for its size.
    """

    def __init__(self, kb, preset, *, use_image: bool = True, use_cue: bool = True, cue_question: str | None = None,
                 image_dim: int | None = None, text_encoder=None):
        self.kb, self.preset = kb, preset
        self.use_image, self.use_cue, self.cue_question = use_image, use_cue, cue_question
        self.text_encoder = text_encoder if text_encoder is not None else preset.backend("text_encoder")
        self._image_encoder = None
        self._cue_provider = None
        self.image_dim = int(image_dim) if image_dim else self.image_encoder.dim
        self._entity_text_index = None
        self._entity_image_rows: dict[int, int] | None = None
        self._entity_image_vectors = None

    # -- lazily loaded models --------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.dim)

    @property
    def image_encoder(self):
        if self._image_encoder is None:
            self._image_encoder = self.preset.backend("image_encoder")
        return self._image_encoder

    @property
    def cue_provider(self):
        if self._cue_provider is None:
            self._cue_provider = self.preset.backend("cue")
        return self._cue_provider

    def encoder_names(self) -> dict:
        return {"text_encoder": self.text_encoder.name,
                "image_encoder": self.preset.image_encoder, "cue_provider": self.preset.cue}

    # -- mention side ------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.text_dim), np.float32)
        return np.asarray(self.text_encoder.encode(list(texts), batch_size=batch_size), dtype=np.float32)

    def mention_features(self, mentions: Sequence[Mention], batch_size: int = 128) -> MentionFeatures:
        n = len(mentions)
        # one encoder call for both texts of every mention: the encoder batches them
        texts = [context_text(m) for m in mentions] + [m.text for m in mentions]
        vectors = self.encode_texts(texts, batch_size)
        image = np.zeros((n, self.image_dim), np.float32)
        image_mask = np.zeros(n, bool)
        cue = np.zeros((n, self.text_dim), np.float32)
        cue_mask = np.zeros(n, bool)
        cues: list[dict | None] = [None] * n
        notes: list[str | None] = [None] * n

        with_image = [i for i, m in enumerate(mentions) if m.image] if (self.use_image or self.use_cue) else []
        loaded = {}
        for i in with_image:
            try:
                from ..imageio import load_image
                loaded[i] = load_image(mentions[i].image)
            except InputError as exc:  # an unreadable image leaves the mention text-only, and says so
                notes[i] = f"image not used: {exc}"
        if loaded and self.use_image:
            rows = list(loaded)
            vecs = np.asarray(self.image_encoder.encode([loaded[i] for i in rows]), np.float32)
            if vecs.shape[1] != self.image_dim:
                raise KBError(f"the image encoder gives {vecs.shape[1]}-d vectors but the fusion head expects "
                              f"{self.image_dim}-d; use the preset the head was trained with")
            image[rows] = vecs
            image_mask[rows] = True
        if loaded and self.use_cue:
            rows = list(loaded)
            for i in rows:
                c = self.cue_provider.cue(loaded[i], question=self.cue_question)
                cues[i] = {"text": c.text, "provider": c.provider, "question": c.question}
            with_text = [i for i in rows if cues[i]["text"].strip()]
            if with_text:
                cue[with_text] = self.encode_texts([cues[i]["text"] for i in with_text], batch_size)
                cue_mask[with_text] = True
        return MentionFeatures(vectors[:n], vectors[n:], image, image_mask, cue, cue_mask, cues, notes)

    # -- entity side -------------------------------------------------------------------------------
    def kb_text_index_matches(self) -> bool:
        if not self.kb.has_dense("text"):
            return False
        _, meta = self.kb.dense("text")
        return meta.get("encoder") == self.text_encoder.name

    def entity_text_features(self, idxs: Sequence[int]) -> np.ndarray:
        """(n, text_dim): from the KB's stored index when it matches the encoder, else encoded now."""
        idxs = [int(i) for i in idxs]
        if self._entity_text_index is None and self.kb_text_index_matches():
            index, _ = self.kb.dense("text")
            if not np.array_equal(index.ids, np.arange(len(index.ids))):
                raise KBError(f"{self.kb.path.name}: the text index does not cover every entity in order; "
                              f"rebuild the KB")
            self._entity_text_index = index.vectors
        if self._entity_text_index is not None:
            return self._entity_text_index[idxs]
        # a KB embedded with another encoder (or none): encode the candidates' text on the fly
        return self.encode_texts([entity_text(e) for e in self.kb.entities_at(idxs)])

    def entity_image_features(self, idxs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(n, image_dim) vectors and (n,) mask, from the KB's image index (same encoder only)."""
        n = len(idxs)
        vectors, mask = np.zeros((n, self.image_dim), np.float32), np.zeros(n, bool)
        if not self.use_image:
            return vectors, mask
        if self._entity_image_rows is None:
            self._entity_image_rows = {}
            if self.kb.has_dense("image"):
                index, meta = self.kb.dense("image")
                if index.dim == self.image_dim and meta.get("encoder") in (None, self.image_encoder_name()):
                    self._entity_image_vectors = index.vectors
                    self._entity_image_rows = {int(idx): row for row, idx in enumerate(index.ids.tolist())}
                else:
                    log.warning("%s: entity images were embedded with %s, not %s; they are not used",
                                self.kb.path.name, meta.get("encoder"), self.image_encoder_name())
        for i, idx in enumerate(idxs):
            row = self._entity_image_rows.get(int(idx))
            if row is not None:
                vectors[i] = self._entity_image_vectors[row]
                mask[i] = True
        return vectors, mask

    def image_encoder_name(self) -> str:
        return self.image_encoder.name
