"""The data model: plain dataclasses that round-trip through JSON.

Mention    a span of a caption, with an optional image (path or URL).
Entity     a knowledge-base entry.
Candidate  an entity with a score and the name of what produced it.
LinkResult what one linker says about one mention.
Example    a mention with its gold entity, as read from a dataset.
"""
from __future__ import annotations

import dataclasses
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

MAX_CAPTION_CHARS = 20_000  # longer captions are almost certainly pasted by mistake
NIL = "NIL"  # entity id used when the mention has no entity in the KB


def _from_dict(cls, data: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise InputError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; expected {sorted(names)}")
    return cls(**data)


class _JSONMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"not a JSON {cls.__name__}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict):
        """Rebuild from `to_dict()` output; a record with missing or mistyped fields is an InputError."""
        if not isinstance(data, dict):
            raise InputError(f"a {cls.__name__} record must be a JSON object, got {type(data).__name__}")
        try:
            return cls._build(data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"not a valid {cls.__name__} record ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _build(cls, data: dict):
        return _from_dict(cls, data)


@dataclass
class Mention(_JSONMixin):
    """`caption[start:end]` is the mention (Python string offsets, i.e. code points)."""

    caption: str
    start: int
    end: int
    image: str | None = None  # local path or URL; None means "no image"
    id: str | None = None

    def __post_init__(self):
        validate_span(self.caption, self.start, self.end)

    @property
    def text(self) -> str:
        return self.caption[self.start:self.end]

    @classmethod
    def from_text(cls, caption: str, mention: str, image: str | None = None, id: str | None = None) -> "Mention":
        """Locate `mention` in `caption` (exact first, then case-insensitive)."""
        check_caption(caption)  # an empty or oversized caption says so, not "the mention does not occur"
        if not isinstance(mention, str) or not mention.strip():
            raise InputError(f"the mention is empty (got {mention!r}): select it in the caption or type it")
        span = locate_mention(caption, mention)
        if span is None:
            raise InputError(
                f"the mention {mention!r} does not occur in the caption; select it in the caption "
                f"or type it exactly as it is written there")
        return cls(caption, span[0], span[1], image=image, id=id)


@dataclass
class Entity(_JSONMixin):
    id: str
    name: str
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    type: str = ""
    images: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id.strip():
            raise InputError(f"an entity needs a non-empty id, got {self.id!r}")
        if not isinstance(self.name, str):
            raise InputError(f"entity {self.id}: the name must be text, got {type(self.name).__name__}")


@dataclass
class Candidate(_JSONMixin):
    entity: Entity
    score: float
    source: str = ""

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["entity"] = Entity.from_dict(data["entity"])
        return _from_dict(cls, data)


@dataclass
class LinkResult(_JSONMixin):
    """What one linker returned for one mention. `prediction` is None for NIL."""

    linker: str
    mention: Mention
    prediction: Entity | None
    candidates: list[Candidate] = field(default_factory=list)
    score: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    preset: str = ""
    models: dict[str, str] = field(default_factory=dict)  # role -> model id / path
    details: dict[str, Any] = field(default_factory=dict)  # linker-specific (generated text, demos, cue...)

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["mention"] = Mention.from_dict(data["mention"])
        if data.get("prediction") is not None:
            data["prediction"] = Entity.from_dict(data["prediction"])
        data["candidates"] = [Candidate.from_dict(c) for c in data.get("candidates", [])]
        return _from_dict(cls, data)

    def ranked_ids(self) -> list[str]:
        return [c.entity.id for c in self.candidates]


@dataclass
class Example(_JSONMixin):
    """A labelled mention from a dataset. `gold_id` is the KB id, or NIL."""

    mention: Mention
    gold_id: str
    gold_name: str = ""
    sample_id: str = ""
    dataset: str = ""
    split: str = ""

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["mention"] = Mention.from_dict(data["mention"])
        return _from_dict(cls, data)


def check_caption(caption: str) -> None:
    """The caption is text, not empty and at most MAX_CAPTION_CHARS long (else InputError)."""
    if not isinstance(caption, str):
        raise InputError(f"the caption must be text, got {type(caption).__name__}")
    if not caption.strip():
        raise InputError("the caption is empty: type or paste the text that goes with the image")
    if len(caption) > MAX_CAPTION_CHARS:
        raise InputError(
            f"the caption has {len(caption):,} characters, more than the limit of {MAX_CAPTION_CHARS:,}; "
            f"keep only the sentence around the mention")


def check_typed_text(text: str, what: str = "caption") -> None:
    """Refuse characters nobody types: control characters other than tab, newline and carriage
    return (U+0000-U+001F, U+007F-U+009F), and unpaired UTF-16 surrogates (half an emoji).

    For text a person gives the app, the API or the CLI; emoji and every other script are fine.
    Dataset readers keep what their files hold and do not call this.
    """
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    for i, ch in enumerate(text):
        if ch in "\t\n\r":
            continue
        kind = unicodedata.category(ch)
        if kind == "Cc":
            raise InputError(
                f"the {what} contains the control character U+{ord(ch):04X} at position {i}; control characters "
                f"are not text (copying from a terminal or a PDF can bring them along): remove them and try again")
        if kind == "Cs":
            raise InputError(
                f"the {what} contains half of an emoji or symbol (the unpaired surrogate U+{ord(ch):04X} at "
                f"position {i}); type or paste that character again")


def validate_span(caption: str, start: int, end: int) -> None:
    check_caption(caption)
    if isinstance(start, bool) or isinstance(end, bool) or not isinstance(start, int) or not isinstance(end, int):
        raise InputError(f"span offsets must be integers, got start={start!r}, end={end!r}")
    if not 0 <= start < end <= len(caption):
        raise InputError(
            f"the span [{start}, {end}) is outside the caption (length {len(caption)}) or empty; "
            f"select a non-empty part of the caption")
    if not caption[start:end].strip():
        raise InputError(f"the span [{start}, {end}) holds only whitespace; select a word of the caption")


def locate_mention(caption: str, mention: str) -> tuple[int, int] | None:
    """Character span of `mention` in `caption`: exact match first, then case-insensitive."""
    mention = mention.strip()
    if not mention:
        return None
    i = caption.find(mention)
    if i >= 0:
        return i, i + len(mention)
    # casefold can change lengths (ß -> ss); lower() keeps them for nearly all scripts, check anyway
    low_caption, low_mention = caption.lower(), mention.lower()
    if len(low_caption) == len(caption):
        i = low_caption.find(low_mention)
        if i >= 0:
            return i, i + len(low_mention)
    return None
