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

Visual pair features (only for heads that list them in `visual_feature_names`; see
`mel.dim.pairs.VISUAL_GROUPS`): the ConSE image vector (`mel.backends.conse`, in the text encoder's
space) scored against each candidate's text; the photo's faces (from the person cue, or dlib when
the cue is another provider) with their apparent gender vs `Sex:` and apparent age vs `Birth:` and
the caption's years; face embeddings vs the faces in the entity's KB image. Each group has its own
mask; `use_image=False` masks image_text and face_sim, `use_cue=False` masks face_sex and face_age,
and `disabled_visual` switches single groups off for ablations.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, KBError
from ..kb import entity_text
from ..types import Mention
from .pairs import (
    FACE_SAME_PERSON,
    N_VISUAL_FEATURES,
    VISUAL_FEATURES,
    VISUAL_GROUPS,
    EntityFacts,
    MentionContext,
    face_age_gap,
    face_sex_match,
)

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
    conse: np.ndarray | None = None        # (n, text_dim) ConSE image vectors (visual features only)
    conse_mask: np.ndarray | None = None   # (n,) bool
    faces: list = field(default_factory=list)  # per mention: list of face dicts, or None when not looked at

    def __len__(self) -> int:
        return len(self.context)

    def rows(self, idx) -> "MentionFeatures":
        idx = np.asarray(idx)
        return MentionFeatures(self.context[idx], self.mention[idx], self.image[idx], self.image_mask[idx],
                               self.cue[idx], self.cue_mask[idx],
                               [self.cues[i] for i in idx] if self.cues else [],
                               [self.notes[i] for i in idx] if self.notes else [],
                               self.conse[idx] if self.conse is not None else None,
                               self.conse_mask[idx] if self.conse_mask is not None else None,
                               [self.faces[i] for i in idx] if self.faces else [])

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
                 image_dim: int | None = None, text_encoder=None, visual_features: Sequence[str] = ()):
        self.kb, self.preset = kb, preset
        self.use_image, self.use_cue, self.cue_question = use_image, use_cue, cue_question
        self.visual_features = tuple(visual_features)  # the visual groups the head expects
        self.disabled_visual: set[str] = set()           # groups switched off (ablations)
        self._conse = None
        self._face_analyzer = None
        self._face_error = ""
        self._entity_faces: dict[int, np.ndarray | None] = {}
        self._facts: dict[int, EntityFacts] = {}
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

    @property
    def conse_encoder(self):
        """The ConSE image encoder on this extractor's text encoder (vectors comparable with entity text)."""
        if self._conse is None:
            from ..backends.conse import ConSEImageEncoder
            self._conse = ConSEImageEncoder(device=self.preset.device, text_encoder=self.text_encoder)
        return self._conse

    def face_analyzer(self):
        """dlib + face-api, or None (and a note) when they are not installed."""
        if self._face_analyzer is None and not self._face_error:
            from ..backends.faces import load_face_analyzer
            from ..errors import ModelUnavailableError
            try:
                self._face_analyzer = load_face_analyzer(self.preset.device)
            except ModelUnavailableError as e:
                self._face_error = f"face features not used: {e}"
                log.warning("%s", self._face_error)
        return self._face_analyzer

    def active_visual_groups(self) -> list[str]:
        """The head's visual groups that this extractor computes (use_image / use_cue / disabled_visual)."""
        allowed = {"image_text": self.use_image, "face_sim": self.use_image,
                   "face_sex": self.use_cue, "face_age": self.use_cue}
        return [g for g in self.visual_features if allowed.get(g) and g not in self.disabled_visual]

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

        active = set(self.active_visual_groups())
        conse = np.zeros((n, self.text_dim), np.float32)
        conse_mask = np.zeros(n, bool)
        faces: list = [None] * n
        with_image = [i for i, m in enumerate(mentions) if m.image] if (self.use_image or self.use_cue or active) else []
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
                cues[i] = {"text": c.text, "provider": c.provider, "question": c.question,
                           "note": getattr(c, "note", "")}
                if getattr(c, "faces", None) or str(c.provider) == "faces":
                    cues[i]["faces"] = list(c.faces)  # the person cue looked for faces (an empty list: none)
                if getattr(c, "note", "") and notes[i] is None:
                    notes[i] = c.note  # e.g. the face models are missing and the cue fell back to labels
            with_text = [i for i in rows if cues[i]["text"].strip()]
            if with_text:
                cue[with_text] = self.encode_texts([cues[i]["text"] for i in with_text], batch_size)
                cue_mask[with_text] = True
        if loaded and "image_text" in active:
            rows = list(loaded)
            conse[rows] = self.conse_encoder.encode([loaded[i] for i in rows])
            conse_mask[rows] = True
        if loaded and active & {"face_sex", "face_age", "face_sim"}:
            for i in loaded:
                faces[i] = self._faces_of(loaded[i], cues[i])
                if faces[i] is None and self._face_error and notes[i] is None:
                    notes[i] = self._face_error
        return MentionFeatures(vectors[:n], vectors[n:], image, image_mask, cue, cue_mask, cues, notes,
                               conse, conse_mask, faces)

    def _faces_of(self, image, cue: dict | None) -> list[dict] | None:
        """The photo's faces: from the person cue when it ran, else dlib here; None when unavailable."""
        if cue is not None and "faces" in cue:
            return cue["faces"]
        analyzer = self.face_analyzer()
        if analyzer is None:
            return None
        out = []
        for face in analyzer.analyze(image).faces:
            d = face.to_dict()
            if face.embedding is not None:
                d["embedding"] = face.embedding.tolist()
            out.append(d)
        return out

    # -- visual pair features ----------------------------------------------------------------------
    def _entity_facts(self, idxs: Sequence[int]) -> dict[int, EntityFacts]:
        missing = sorted({int(i) for i in idxs if int(i) not in self._facts})
        if missing:
            if len(self._facts) > 200_000:
                self._facts.clear()
            for idx, entity in zip(missing, self.kb.entities_at(missing), strict=True):
                self._facts[idx] = EntityFacts.of(entity)
        return {int(i): self._facts[int(i)] for i in idxs}

    def entity_face_embeddings(self, idx: int) -> np.ndarray | None:
        """(k, 128) dlib embeddings of the faces in the entity's first KB image; None without one."""
        idx = int(idx)
        if idx not in self._entity_faces:
            result = None
            entity = self.kb.entities_at([idx])[0]
            analyzer = self.face_analyzer() if entity.images else None
            if analyzer is not None:
                try:
                    found = analyzer.analyze(entity.images[0]).embeddings()
                    result = found if len(found) else None
                except InputError as e:  # a missing or unreadable entity image: no face feature
                    log.warning("entity %s: image not used for face features: %s", entity.id, e)
            self._entity_faces[idx] = result
        return self._entity_faces[idx]

    def visual_pair_features(self, mentions: Sequence[Mention], feats: MentionFeatures, idxs: np.ndarray,
                             valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, c, N_VISUAL_FEATURES) values and (b, c, len(VISUAL_GROUPS)) bool masks for the padded
        candidate rows `idxs` (-1 = padding). Only the active groups are computed; the rest stay masked."""
        from ..backends.faces import face_distance

        b, c = idxs.shape
        values = np.zeros((b, c, N_VISUAL_FEATURES), np.float32)
        mask = np.zeros((b, c, len(VISUAL_GROUPS)), bool)
        active = set(self.active_visual_groups())
        if not active or not valid.any():
            return values, mask
        col = {name: i for i, name in enumerate(VISUAL_FEATURES)}
        gi = {g: i for i, g in enumerate(VISUAL_GROUPS)}
        unique = sorted({int(x) for x in idxs[valid]})
        row_of = {idx: r for r, idx in enumerate(unique)}
        facts = self._entity_facts(unique) if active & {"face_sex", "face_age"} else {}
        text = self.entity_text_features(unique) if "image_text" in active else None
        for i, mention in enumerate(mentions):
            cand = [int(x) for x in idxs[i][valid[i]]]
            if not cand:
                continue
            n_c = len(cand)
            if text is not None and feats.conse_mask is not None and feats.conse_mask[i]:
                cos = text[[row_of[x] for x in cand]] @ feats.conse[i]
                values[i, :n_c, col["image_text_cos"]] = cos
                values[i, :n_c, col["image_text_rel"]] = cos - cos.max()
                mask[i, :n_c, gi["image_text"]] = True
            faces = feats.faces[i] if feats.faces else None
            if not faces:
                continue
            years = MentionContext.of(mention.text, mention.caption).years if "face_age" in active else []
            mention_emb = np.asarray([f["embedding"] for f in faces if f.get("embedding") is not None], np.float32)
            for j, idx in enumerate(cand):
                if "face_sex" in active and facts[idx].sex:
                    v = face_sex_match(faces, facts[idx].sex)
                    if v is not None:
                        values[i, j, col["face_sex_match"]] = v
                        mask[i, j, gi["face_sex"]] = True
                if "face_age" in active:
                    v = face_age_gap(faces, years, facts[idx].birth)
                    if v is not None:
                        values[i, j, col["face_age_gap"]] = v
                        mask[i, j, gi["face_age"]] = True
                if "face_sim" in active and len(mention_emb):
                    ent = self.entity_face_embeddings(idx)
                    if ent is not None:
                        values[i, j, col["face_sim"]] = FACE_SAME_PERSON - float(face_distance(mention_emb, ent).min())
                        mask[i, j, gi["face_sim"]] = True
        return values, mask

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
