"""Expert cues: a short text about what an image shows (DIM's "expert cue").

DIM asks BLIP-2 (blip2-opt-2.7b) `Question: Who are the characters in the picture? Answer:`
and encodes the answer with the CLIP text tower. Providers here:

    load_cue_provider("faces")                            offline: faces (count, apparent gender and age range
                                                          per face: dlib + face-api.js's age/gender network), and
                                                          the top ImageNet labels only when no face is found
    load_cue_provider("imagenet-labels")                  offline: top-5 ImageNet labels (packaged Lite0)
    load_cue_provider("blip2:Salesforce/blip2-opt-2.7b")  BLIP-2 through transformers (hub id or local dir);
                                                          float16 on CUDA, bfloat16 on CPU (3.7B parameters:
                                                          7.5 GB instead of 15 GB in float32)
    load_cue_provider("blip:Salesforce/blip-image-captioning-base")
                                                          BLIP (224M parameters, 0.9 GB in float32): a caption
                                                          of the image; a VQA checkpoint (blip-vqa-base) answers
                                                          DIM's question instead. The `small` preset's cue

Every provider caches its cues per (image content hash, provider, question): a small in-memory
dict plus one JSON file per cue under `cache_dir("cues")` (no pickle), so a cue is computed once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ..errors import CheckpointError, InputError
from ..imageio import image_sha256, load_image
from ..paths import cache_dir
from .hub import from_pretrained
from .image import _frozen, _split_spec, imagenet_top_labels
from .text import check_device as _check_device

log = logging.getLogger(__name__)

DIM_QUESTION = "Question: Who are the characters in the picture? Answer:"
CUE_CACHE_VERSION = 1


@dataclass
class Cue:
    text: str
    provider: str
    scores: list[tuple[str, float]] = field(default_factory=list)
    question: str = ""
    faces: list[dict] = field(default_factory=list)  # person cue: one dict per face (mel.backends.faces.Face.to_dict
                                                     # + "embedding"), largest first; apparent attributes only
    note: str = ""                                   # e.g. why the cue fell back to ImageNet labels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cue":
        return cls(
            text=str(d["text"]),
            provider=str(d["provider"]),
            scores=[(str(a), float(b)) for a, b in d.get("scores", [])],
            question=str(d.get("question", "")),
            faces=[dict(f) for f in d.get("faces", []) if isinstance(f, dict)],
            note=str(d.get("note", "")),
        )


@runtime_checkable
class CueProvider(Protocol):
    name: str

    def cue(self, image: Image.Image, question: str | None = None) -> Cue: ...


# -----------------------------------------------------------------------------
# cache


class CueCache:
    """In-memory LRU dict in front of a directory of small JSON files (one per cue)."""

    def __init__(self, directory: Path | None = None, max_memory: int = 4096):
        self.directory = Path(directory) if directory is not None else None
        self.max_memory = max_memory
        self._mem: OrderedDict[str, Cue] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image_hash: str, provider: str, question: str) -> str:
        raw = json.dumps([CUE_CACHE_VERSION, image_hash, provider, question], ensure_ascii=False)
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def _file(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Cue | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        path = self._file(key)
        if path is not None and path.is_file():
            try:
                cue = Cue.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged entry is just recomputed
                log.warning("ignoring unreadable cue cache file %s: %s", path, e)
            else:
                self._remember(key, cue)
                self.hits += 1
                return cue
        self.misses += 1
        return None

    def put(self, key: str, cue: Cue) -> None:
        self._remember(key, cue)
        path = self._file(key)
        if path is None:
            return
        try:  # atomic: write a temp file next to it, then rename
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(cue.to_dict(), f, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache must not break linking
            log.warning("could not write cue cache file %s: %s", path, e)

    def _remember(self, key: str, cue: Cue) -> None:
        self._mem[key] = cue
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_memory:
            self._mem.popitem(last=False)


class _CachedCueProvider:
    """Base: `cue()` looks in the cache, else calls `_compute()` and stores the result."""

    name: str = ""
    default_question: str = ""
    uses_question: bool = True

    def __init__(self, use_disk_cache: bool = True):
        self.cache = CueCache(cache_dir("cues") if use_disk_cache else None)

    def _compute(self, image: Image.Image, question: str) -> Cue:
        raise NotImplementedError

    def cue(self, image: Image.Image, question: str | None = None) -> Cue:
        q = (self.default_question if question is None else question) if self.uses_question else ""
        image_hash = image_sha256(image)  # a PIL image: its pixels; a path or bytes: the file
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            image = load_image(image)  # the usual checks and errors; any PIL mode converted faithfully
        key = CueCache.key(image_hash, self.name, q)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        cue = self._compute(image, q)
        self.cache.put(key, cue)
        return cue


# -----------------------------------------------------------------------------
# providers


class ImageNetLabelCueProvider(_CachedCueProvider):
    """Offline stand-in for BLIP-2: the top-k ImageNet labels of the packaged EfficientNet-Lite0,
    e.g. "tabby cat, Egyptian Mau, ...". The question is ignored (a classifier cannot answer one)."""

    uses_question = False

    def __init__(self, device: str = "cpu", k: int = 5, use_disk_cache: bool = True):
        super().__init__(use_disk_cache)
        self.device, self.k = device, k
        self.name = "imagenet-labels" if k == 5 else f"imagenet-labels@{k}"

    def _compute(self, image: Image.Image, question: str) -> Cue:
        scores = imagenet_top_labels(image, k=self.k, device=self.device)
        return Cue(text=", ".join(label for label, _ in scores), provider=self.name, scores=scores, question="")


_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MIN_GENDER_PROBABILITY = 0.6  # below this the cue names no gender ("a person")
MAX_FACES_DESCRIBED = 3


def describe_face(face: dict) -> str:
    """'a woman aged about 30-40' from a face dict; always phrased as an appearance."""
    gender, p, ages = face.get("gender"), face.get("gender_probability"), face.get("age_range")
    who = "a person"
    if gender in ("female", "male") and p is not None and p >= MIN_GENDER_PROBABILITY:
        who = "a woman" if gender == "female" else "a man"
    return f"{who} aged about {ages[0]}-{ages[1]}" if ages else who


PERSON_CUE_HEAD = "a photo of"   # how every person cue starts (the app tells a stored face cue by it)


def person_cue_text(faces: list[dict]) -> str:
    """The person cue: how many faces, and each face's apparent gender and age range, e.g.
    "a photo of one person, apparently a woman aged about 30-40". It says "apparently": it is what a
    network guesses from the photo, never a fact about who is shown."""
    n = len(faces)
    count = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    if n == 1:
        head = f"{PERSON_CUE_HEAD} one person"
    elif n <= MAX_FACES_DESCRIBED:
        head = f"{PERSON_CUE_HEAD} {count} people"
    else:
        head = f"{PERSON_CUE_HEAD} a group of {count} people"
    described = [describe_face(f) for f in faces[:MAX_FACES_DESCRIBED] if f.get("gender") or f.get("age_range")]
    if not described:
        return head + " (apparent age and gender not available)"
    listed = described[0] if len(described) == 1 else ", ".join(described[:-1]) + " and " + described[-1]
    if n > MAX_FACES_DESCRIBED:
        return f"{head}; the {len(described)} largest faces: apparently {listed}"
    return f"{head}, apparently {listed}"


class PersonCueProvider(_CachedCueProvider):
    """The offline preset's expert cue, person-aware: faces found by dlib's HOG detector, each with
    face-api.js's apparent gender and age, written as "a photo of one person, apparently a woman
    aged about 30-40"; when no face is found, the top ImageNet labels (as `imagenet-labels`).

    Missing optional parts never break linking: without dlib (or its models) every cue is the
    ImageNet labels, and without face-api's weights faces are counted without age/gender; the
    provider's name and each cue's `note` say which (the message names the install command).
    The face dicts (with 128-d dlib embeddings) travel in `Cue.faces` for DIM's face features."""

    uses_question = False

    def __init__(self, device: str = "cpu", k: int = 5, use_disk_cache: bool = True):
        super().__init__(use_disk_cache)
        from ..errors import ModelUnavailableError
        from .faces import load_face_analyzer

        self.device, self.k = device, k
        self.labels = ImageNetLabelCueProvider(device, k=k, use_disk_cache=False)
        self.note = ""
        self.analyzer: Any = None
        try:
            self.analyzer = load_face_analyzer(device)
        except ModelUnavailableError as e:
            self.note = f"no face detection, ImageNet labels instead: {e}"
            log.warning("person cue: %s", self.note)
        if self.analyzer is not None and self.analyzer.age_gender is None:
            self.note = f"faces counted without apparent age/gender: {self.analyzer.age_gender_error}"
        self.name = ("faces" if not self.note else
                     "faces (labels only)" if self.analyzer is None else "faces (no age/gender)")

    def _compute(self, image: Image.Image, question: str) -> Cue:
        if self.analyzer is None:
            labels = self.labels._compute(image, "")
            return Cue(text=labels.text, provider=self.name, scores=labels.scores, note=self.note)
        analysis = self.analyzer.analyze(image)
        if not analysis.faces:
            labels = self.labels._compute(image, "")
            return Cue(text=labels.text, provider=self.name, scores=labels.scores, note=self.note)
        faces = []
        for face in analysis.faces:
            d = face.to_dict()
            if face.embedding is not None:
                d["embedding"] = [round(float(x), 6) for x in face.embedding]
            faces.append(d)
        return Cue(text=person_cue_text(faces), provider=self.name, faces=faces, note=self.note)


class Blip2CueProvider(_CachedCueProvider):
    """BLIP-2 (transformers `Blip2ForConditionalGeneration` + `Blip2Processor`) answering a
    question about the image; DIM's question and 20 new tokens by default, greedy decoding."""

    def __init__(
        self,
        ref: str,
        device: str = "cpu",
        question: str = DIM_QUESTION,
        max_new_tokens: int = 20,
        use_disk_cache: bool = True,
    ):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        super().__init__(use_disk_cache)
        self.ref, self.device = ref, device
        self.default_question = question
        self.max_new_tokens = int(max_new_tokens)
        self.name = f"blip2:{ref}" + ("" if self.max_new_tokens == 20 else f"@{self.max_new_tokens}")
        # float16 on CUDA; bfloat16 on CPU, which halves the 15 GB of the float32 checkpoint
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
        model = from_pretrained(Blip2ForConditionalGeneration, ref, f"BLIP-2 model {ref}", dtype=dtype)
        self.model: Any = _frozen(model, device)  # a transformers model (generate, config...)
        self.processor = from_pretrained(Blip2Processor, ref, f"BLIP-2 processor {ref}")
        self.tokenizer = self.processor.tokenizer
        self._sync_image_tokens()

    def _sync_image_tokens(self) -> None:
        """transformers 5 BLIP-2 puts the query-token outputs where `input_ids` hold the image
        token, so the processor must insert exactly `num_query_tokens` of them and the token id
        must be the model's `image_token_index`. Older saved processors/configs lack one or the
        other: fill them in from each other, and refuse a real mismatch."""
        cfg = self.model.config
        n_query = int(cfg.num_query_tokens)
        if self.processor.num_query_tokens != n_query:
            if self.processor.num_query_tokens is not None:
                log.warning(
                    "BLIP-2 %s: processor num_query_tokens=%s but the model has %s; using the model's",
                    self.ref, self.processor.num_query_tokens, n_query,
                )
            self.processor.num_query_tokens = n_query
        image_token = getattr(self.processor.image_token, "content", self.processor.image_token)
        token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise CheckpointError(f"BLIP-2 {self.ref}: the tokenizer has no image token {image_token!r}")
        if cfg.image_token_index is None:
            embeddings = self.model.get_input_embeddings().num_embeddings
            if token_id >= embeddings:
                self.model.language_model.resize_token_embeddings(len(self.tokenizer))
            cfg.image_token_index = token_id
        elif int(cfg.image_token_index) != int(token_id):
            raise CheckpointError(
                f"BLIP-2 {self.ref}: the model's image_token_index is {cfg.image_token_index} but the "
                f"tokenizer's {image_token!r} is id {token_id}; the processor and model do not belong together"
            )

    def _compute(self, image: Image.Image, question: str) -> Cue:
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            if question:
                inputs = self.processor(images=image, text=question, return_tensors="pt")
            else:  # plain captioning: the model prepends image tokens + BOS itself
                inputs = self.processor(images=image, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        seq = out[0]
        prompt = inputs.get("input_ids")
        if prompt is not None:
            n = prompt.shape[1]
            if seq.shape[0] >= n and torch.equal(seq[:n].to(prompt.device), prompt[0]):
                seq = seq[n:]  # generate returned prompt + answer: keep the answer
        text = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
        if question and text.startswith(question.strip()):
            text = text[len(question.strip()) :].strip()
        return Cue(text=text, provider=self.name, scores=[], question=question)


def plain_question(question: str) -> str:
    """DIM's BLIP-2 prompt "Question: X Answer:" as the bare question X that BLIP's VQA model was
    trained on ("who are the characters in the picture?")."""
    q = question.strip()
    if q.lower().startswith("question:"):
        q = q[len("question:"):]
    if q.lower().endswith("answer:"):
        q = q[: -len("answer:")]
    return q.strip()


class BlipCueProvider(_CachedCueProvider):
    """BLIP through transformers, a cue model a CPU can hold and run: 224M parameters for
    Salesforce/blip-image-captioning-base and 361M for Salesforce/blip-vqa-base, against BLIP-2's
    3.7B. The checkpoint's config says which it is:

    captioning (BlipForConditionalGeneration)  a caption of the image ("a man in a suit standing at a
        podium"); the question is not used: a captioning model's text input is the start of the
        caption, not a question, so every question gets the same cue.
    VQA (BlipForQuestionAnswering)  the answer to DIM's question, asked as BLIP was trained
        ("who are the characters in the picture?", see plain_question).

    Weights in float16 on CUDA and float32 on CPU (0.9 GB for the captioning base); greedy decoding,
    at most 20 new tokens by default."""

    def __init__(
        self,
        ref: str,
        device: str = "cpu",
        question: str = DIM_QUESTION,
        max_new_tokens: int = 20,
        use_disk_cache: bool = True,
    ):
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipProcessor

        super().__init__(use_disk_cache)
        self.ref, self.device = ref, device
        self.max_new_tokens = int(max_new_tokens)
        config = from_pretrained(AutoConfig, ref, f"BLIP config {ref}")
        if getattr(config, "model_type", "") != "blip":
            raise CheckpointError(f"{ref} is a {getattr(config, 'model_type', '') or 'unknown'} model, not BLIP "
                                  f"(expected model_type 'blip'; BLIP-2 checkpoints take 'blip2:{ref}')")
        self.vqa = "BlipForQuestionAnswering" in (getattr(config, "architectures", None) or [])
        self.uses_question = self.vqa
        self.default_question = question if self.vqa else ""
        self.name = f"blip:{ref}" + ("" if self.max_new_tokens == 20 else f"@{self.max_new_tokens}")
        cls = BlipForQuestionAnswering if self.vqa else BlipForConditionalGeneration
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        model = from_pretrained(cls, ref, f"BLIP model {ref}", config=config, dtype=dtype)
        self.model: Any = _frozen(model, device)  # a transformers model (generate, config...)
        self.processor = from_pretrained(BlipProcessor, ref, f"BLIP processor {ref}")

    def _compute(self, image: Image.Image, question: str) -> Cue:
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            if self.vqa:
                inputs = self.processor(images=image, text=plain_question(question), return_tensors="pt")
            else:
                inputs = self.processor(images=image, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        text = self.processor.tokenizer.decode(out[0], skip_special_tokens=True).strip()
        return Cue(text=text, provider=self.name, scores=[], question=question if self.vqa else "")


# -----------------------------------------------------------------------------
# factory

CUE_PROVIDER_SPECS = ("faces", "imagenet-labels", "blip:<hub id or dir>", "blip2:<hub id or dir>")


def load_cue_provider(spec: str, device: str = "cpu", *, use_disk_cache: bool = True, **kwargs) -> CueProvider:
    """A CueProvider for `spec` (see CUE_PROVIDER_SPECS). Extra keyword arguments go to the
    provider (blip, blip2: question, max_new_tokens; imagenet-labels and faces: k)."""
    kind, ref = _split_spec(spec)
    device = _check_device(device)
    if kind in ("imagenet-labels", "imagenet"):
        if ref:
            raise InputError(f"'imagenet-labels' takes no argument; got {spec!r}")
        return ImageNetLabelCueProvider(device, use_disk_cache=use_disk_cache, **kwargs)
    if kind in ("faces", "person"):
        if ref:
            raise InputError(f"'faces' takes no argument; got {spec!r}")
        return PersonCueProvider(device, use_disk_cache=use_disk_cache, **kwargs)
    if kind == "blip2":
        if not ref:
            raise InputError(f"cue spec {spec!r} needs a model, e.g. 'blip2:Salesforce/blip2-opt-2.7b'")
        return Blip2CueProvider(ref, device, use_disk_cache=use_disk_cache, **kwargs)
    if kind == "blip":
        if not ref:
            raise InputError(f"cue spec {spec!r} needs a model, e.g. 'blip:Salesforce/blip-image-captioning-base'")
        return BlipCueProvider(ref, device, use_disk_cache=use_disk_cache, **kwargs)
    raise InputError(f"unknown cue provider {spec!r}; expected one of {', '.join(CUE_PROVIDER_SPECS)}")
