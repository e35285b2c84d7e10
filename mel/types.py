"""The data model: plain dataclasses that round-trip through JSON.

Mention    a span of a caption, with an optional image (path or URL).
Entity     a knowledge-base entry.
Candidate  an entity (the KB's row) with a score and the name of what produced it.
LinkResult what one linker says about one mention; `details` is the linker's own typed record:
           LinkDetails (bm25, dense, any linker without its own), ExactDetails, GemelDetails, DimDetails.
Example    a mention with its gold entity, as read from a dataset.

Text fidelity, at construction (so also for JSON read with from_json / from_dict):
- every text field is valid Unicode: a lone surrogate ("\\ud800": half of an emoji, or a byte
  that was not UTF-8) is refused with an InputError naming the field (check_unicode_text), not
  left to fail as a codec error when the record is written or stored;
- captions and names are stored in Unicode NFC, so a caption typed with "ë" (U+00EB) and a
  mention pasted as "e" + U+0308 match. Ids are kept exactly as given. Offsets given with a
  caption refer to the caption as given and are mapped to the NFC caption (see Mention).
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass

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
    """`caption[start:end]` is the mention (Python string offsets, i.e. code points).

    The caption is stored in NFC. `start`/`end` refer to the caption as given; when it is not
    NFC they are mapped onto the NFC caption, so `text` is the NFC form of what the caller
    selected. A span that cuts a character in two (a letter and the combining accent that
    follows it, as in "Zoe" of "Zoe\u0308") has no NFC equivalent and is refused.
    `id` and `image` are kept as given (checked to be valid Unicode).
    """

    caption: str
    start: int
    end: int
    image: str | None = None  # local path or URL; None means "no image"
    id: str | None = None

    def __post_init__(self):
        validate_span(self.caption, self.start, self.end)
        for what, value in (("mention id", self.id), ("mention image path", self.image)):
            if value is not None:
                _require_text(value, what)
        if not unicodedata.is_normalized("NFC", self.caption):
            self.caption, self.start, self.end = _nfc_span(self.caption, self.start, self.end)

    @property
    def text(self) -> str:
        return self.caption[self.start:self.end]

    @classmethod
    def from_text(cls, caption: str, mention: str, image: str | None = None, id: str | None = None) -> "Mention":
        """Locate `mention` in `caption` (exact first, then case-insensitive), whatever the Unicode
        normalisation of either (NFC "Zoë" matches NFD "Zoe\u0308"); the caption is stored in NFC."""
        check_caption(caption)  # an empty or oversized caption says so, not "the mention does not occur"
        if not isinstance(mention, str) or not mention.strip():
            raise InputError(f"the mention is empty (got {mention!r}): select it in the caption or type it")
        check_unicode_text(mention, "mention")
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
        check_unicode_text(self.id, "entity id")
        if not isinstance(self.name, str):
            raise InputError(f"entity {self.id}: the name must be text, got {type(self.name).__name__}")
        self.name = _nfc(_require_text(self.name, f"entity {self.id!r} name"))
        self.description = _nfc(_require_text(self.description, f"entity {self.id!r} description"))
        self.type = _nfc(_require_text(self.type, f"entity {self.id!r} type"))
        self.aliases = [_nfc(_require_text(a, f"entity {self.id!r} alias {i}")) for i, a in enumerate(self.aliases)]
        self.images = [_require_text(p, f"entity {self.id!r} image path {i}") for i, p in enumerate(self.images)]


@dataclass
class Candidate(_JSONMixin):
    """`entity` is the KB's row as stored (name, aliases, description, type, images): a caller that
    shows or saves a candidate has everything and need not query the KB again."""

    entity: Entity
    score: float
    source: str = ""
    # calibrated probability that this candidate is the right entity (mel.calibration); None when the
    # linker has no calibration. The probabilities of a result's candidates sum to at most 1: the rest is
    # the chance that the right entity is none of them (not returned, or not in the KB).
    probability: float | None = None

    def __post_init__(self):
        _require_text(self.source, "candidate source")
        if self.probability is not None:
            if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)) \
                    or not 0.0 <= self.probability <= 1.0:
                raise InputError(f"a candidate's probability must be a number in [0, 1] or None, "
                                 f"got {self.probability!r}")
            self.probability = float(self.probability)

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["entity"] = Entity.from_dict(data["entity"])
        return _from_dict(cls, data)


# -- what a linker says beyond its ranking ---------------------------------------------------------
# Records nested in the details. Plain fields only, so that `dataclasses.asdict` is their JSON.

@dataclass
class PromptDemonstration(_JSONMixin):
    """A labelled example GEMEL put in the prompt, with its retrieval similarity to the query."""

    caption: str
    mention: str
    gold_id: str
    gold_name: str  # the name the demonstration answers with (the KB's name of gold_id)
    similarity: float
    image: str | None = None
    sample_id: str = ""  # its key in the pool (DemonstrationPool.remove)


@dataclass
class Beam(_JSONMixin):
    """One name the LLM produced: a finished beam (rank="beam") or a scored candidate (rank="all")."""

    name: str
    logprob: float  # sequence log-probability of name + EOS
    score: float  # the ranking score: logprob / length ** length_penalty
    entity_ids: list[str] = field(default_factory=list)  # KB entities with that name, tie-break order
    not_a_kb_name: bool = False  # free generation wrote a text that is no KB name or alias


@dataclass
class Ambiguity(_JSONMixin):
    """One name, several KB entities: which one was chosen and by what rule."""

    name: str
    entity_ids: list[str]
    chosen: str
    rule: str


@dataclass
class CandidateScores(_JSONMixin):
    """One candidate's scores side by side: each retriever's, then (after the LLM) its sequence
    log-probability and the fused score. `llm_logprob`/`fused` are None before the LLM ran."""

    id: str
    name: str
    retrievers: dict[str, float] = field(default_factory=dict)  # source ("bm25", "dense", "dim") -> score
    llm_logprob: float | None = None
    fused: float | None = None

    @classmethod
    def _build(cls, data: dict):
        if "retrievers" in data:
            return _from_dict(cls, data)
        # written before the details were typed: the retriever scores sat next to id and name
        own = {"id", "name", "llm_logprob", "fused"}
        return cls(**{k: v for k, v in data.items() if k in own},
                   retrievers={k: v for k, v in data.items() if k not in own})


@dataclass
class Fusion(_JSONMixin):
    """The product of experts GEMEL ranked by (candidate mode)."""

    llm_weight: float
    temperatures: dict[str, float]  # retriever -> temperature of its softmax
    formula: str


@dataclass
class FeatureMask(_JSONMixin):
    """Which of DIM's inputs this mention had (a missing image also removes the cue)."""

    context: bool = True
    mention: bool = True
    image: bool = False
    cue: bool = False


@dataclass
class ApparentFace(_JSONMixin):
    """One face the person cue found in the photo. Gender and age are what a network guesses from
    pixels (apparent attributes), never facts about a person."""

    box: list[int]                            # left, top, right, bottom, in the photo's pixels
    score: float = 0.0                        # detector confidence
    gender: str | None = None                 # apparent: "female" / "male"; None without the age/gender model
    gender_probability: float | None = None   # the network's probability for `gender`
    age: float | None = None                  # apparent age in years
    age_range: list[int] | None = None        # the decade shown in the cue text, e.g. [30, 40]

    @classmethod
    def of(cls, face: dict) -> "ApparentFace":
        """From a face dict of the face models (extra keys such as the 128-d embedding are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in face.items() if k in names})


@dataclass
class ExpertCue(_JSONMixin):
    """The expert cue DIM used: a short text about the image, the provider that wrote it, the faces
    it found (the person cue; empty for other providers or when there is none) and why it fell back,
    when it did (e.g. the face models are missing and the cue is ImageNet labels)."""

    text: str
    provider: str = ""
    question: str = ""
    faces: list[ApparentFace] = field(default_factory=list)
    note: str = ""

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["faces"] = [ApparentFace.from_dict(f) for f in data.get("faces", [])]
        return _from_dict(cls, data)


@dataclass
class LinkDetails(_JSONMixin):
    """What a linker says beyond its ranking. Linkers with more to say extend it (ExactDetails,
    GemelDetails, DimDetails); bm25, dense and linkers registered without their own use it as is.

    JSON: one flat object, tagged with the class's `kind` (`to_dict`). `details_from_dict` reads it
    back into the class of its kind; a record without a kind (written before the details were typed)
    is read into the class of the linker that wrote it (`LinkResult.linker`). Keys the class has no
    field for (another version's, a plugin linker's own) are kept in `extra` and written back flat,
    so a round trip loses nothing.
    """

    kind: ClassVar[str] = "basic"
    # old keys -> field (None: derived from other fields, dropped when read)
    _renamed: ClassVar[dict[str, str | None]] = {}

    note: str = ""  # a sentence for the user: why NIL, why the image was not used...
    batch_size: int = 1  # mentions that shared the timings (batched linkers split a batch's cost evenly)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {"kind": self.kind, **{k: v for k, v in data.items() if k != "extra"}, **data["extra"]}

    @classmethod
    def _build(cls, data: dict):
        data = {k: v for k, v in data.items() if k != "kind"}
        for old, new in cls._renamed.items():
            if old in data:
                value = data.pop(old)
                if new is not None:
                    data.setdefault(new, value)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in names and k != "extra"}}
        return cls(**cls._records(known), extra=extra)

    @classmethod
    def _records(cls, fields: dict) -> dict:
        """`fields` with nested JSON objects turned into their record classes."""
        return fields


@dataclass
class ExactDetails(LinkDetails):
    kind: ClassVar[str] = "exact"

    n_exact_matches: int = 0  # entities whose name or alias equals the mention


@dataclass
class GemelDetails(LinkDetails):
    """What GEMEL did: its prompt's demonstrations, what the LLM generated, how that became entities."""

    kind: ClassVar[str] = "gemel"
    _renamed: ClassVar[dict[str, str | None]] = {"llm_ranking": "beams", "n_demos": None}

    mode: str = ""  # "whole-KB trie", "free generation (no trie)" or "<source> top-<k>"
    ranking: str = ""  # how the candidates were ranked, in words
    pool: str = ""  # where the demonstrations come from
    demonstrations: list[PromptDemonstration] = field(default_factory=list)  # least similar first
    demonstrations_note: str = ""  # why there are none (zero-shot, empty pool)
    visual_tokens: bool = False  # the query segment had visual tokens
    n_visual_segments: int = 0  # prompt segments (demonstrations + query) with visual tokens
    visual_note: str = ""
    prompt: str | None = None  # the prompt text (show_prompt=True)
    generated: str | None = None  # the LLM's first choice, as text (None: nothing finished)
    logprob: float | None = None  # its sequence log-probability
    beams: list[Beam] = field(default_factory=list)
    ambiguity: Ambiguity | None = None  # the prediction's name fits several entities
    not_a_kb_name: bool = False  # free generation: the first output is no KB name (a miss, NIL)
    retriever: list[CandidateScores] | None = None  # candidate mode: what the retriever(s) proposed
    fusion: Fusion | None = None  # candidate mode with fusion: the weights
    scores: list[CandidateScores] | None = None  # ... and every candidate's scores, best first
    decode: dict[str, Any] = field(default_factory=dict)  # decoder counters (DecodeStats.to_dict())

    @property
    def n_demos(self) -> int:
        return len(self.demonstrations)

    @classmethod
    def _records(cls, fields: dict) -> dict:
        rows: dict[str, type[_JSONMixin]] = {"demonstrations": PromptDemonstration, "beams": Beam,
                                             "retriever": CandidateScores, "scores": CandidateScores}
        for key, record in rows.items():
            if fields.get(key) is not None:
                fields[key] = [record.from_dict(row) for row in fields[key]]
        for key, record in (("ambiguity", Ambiguity), ("fusion", Fusion)):
            if fields.get(key) is not None:
                fields[key] = record.from_dict(fields[key])
        return fields


@dataclass
class DimDetails(LinkDetails):
    """What DIM's fusion head saw: the protocol, which inputs the mention had, its expert cue."""

    kind: ClassVar[str] = "dim"

    protocol: str = "whole-kb"  # or "candidate-list (gold usually included)"
    n_candidates: int = 0  # candidates the head scored
    feature_mask: FeatureMask = field(default_factory=FeatureMask)
    cue: ExpertCue | None = None  # None: no image, or the cue is turned off
    pool: list[str] | None = None  # every candidate's id (keep_pool=True: to measure candidate recall)

    @classmethod
    def _records(cls, fields: dict) -> dict:
        if fields.get("feature_mask") is not None:
            fields["feature_mask"] = FeatureMask.from_dict(fields["feature_mask"])
        if fields.get("cue") is not None:
            fields["cue"] = ExpertCue.from_dict(fields["cue"])
        return fields


DETAILS_KINDS: dict[str, type[LinkDetails]] = {cls.kind: cls for cls in (LinkDetails, ExactDetails, GemelDetails,
                                                                            DimDetails)}


def register_details(cls: type[LinkDetails]) -> type[LinkDetails]:
    """Make a linker's own details class readable from JSON (by its `kind`); usable as a decorator."""
    DETAILS_KINDS[cls.kind] = cls
    return cls


def details_kind_of_linker(linker: str) -> str:
    """The details kind a built-in linker writes ("gemel+bm25" -> "gemel"): how a record written
    before the details carried a kind is read."""
    base = linker.split("+")[0].split("-")[0]  # gemel+dense, gemel-free
    return base if base in DETAILS_KINDS else LinkDetails.kind


def details_from_dict(data: dict, linker: str = "") -> LinkDetails:
    """The details record of `data` (see LinkDetails for the rule); an unknown kind is read as
    LinkDetails with every key, the kind too, kept in `extra`."""
    if not isinstance(data, dict):
        raise InputError(f"the details must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind") or details_kind_of_linker(linker)
    cls = DETAILS_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return LinkDetails(extra=dict(data))
    return cls.from_dict(data)


@dataclass
class LinkResult(_JSONMixin):
    """What one linker returned for one mention. `prediction` is None for NIL.

    `details` may be given as a plain dict (JSON written before the details were typed): it is read
    with `details_from_dict(details, linker)`.
    """

    linker: str
    mention: Mention
    prediction: Entity | None
    candidates: list[Candidate] = field(default_factory=list)
    score: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    preset: str = ""
    models: dict[str, str] = field(default_factory=dict)  # role -> model id / path
    details: LinkDetails = field(default_factory=LinkDetails)  # the linker's own record (GemelDetails...)

    def __post_init__(self):
        _require_text(self.linker, "linker name")
        _require_text(self.preset, "preset name")
        _check_tree(self.models, "models")
        if self.details is None:
            self.details = LinkDetails()
        elif isinstance(self.details, dict):
            self.details = details_from_dict(self.details, self.linker)
        elif not isinstance(self.details, LinkDetails):
            raise InputError(f"LinkResult.details must be a LinkDetails (or its JSON), got {type(self.details).__name__}")
        _check_tree(self.details.to_dict(), "details")

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["details"] = self.details.to_dict()  # with its kind, and `extra` flat
        return data

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
    # how a reader found the mention in its caption (a rule of LOCATE_RULES, "offsets" when the file gave
    # them, "context" when it was not found: the caption is then "<mention>: <caption>" and the span the
    # mention string, see mel.datasets.common.context_mention); "" when not said (not written to JSON)
    located: str = ""

    def __post_init__(self):
        _require_text(self.gold_id, "gold entity id")
        _require_text(self.located, "located rule")
        self.gold_name = _nfc(_require_text(self.gold_name, "gold entity name"))
        for what, value in (("sample id", self.sample_id), ("dataset name", self.dataset), ("split name", self.split)):
            _require_text(value, what)

    def to_dict(self) -> dict:
        data = super().to_dict()
        if not data["located"]:
            del data["located"]
        return data

    @classmethod
    def _build(cls, data: dict):
        data = dict(data)
        data["mention"] = Mention.from_dict(data["mention"])
        return _from_dict(cls, data)


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _require_text(value, what: str) -> str:
    """`value` if it is valid Unicode text, else an InputError naming `what`."""
    if not isinstance(value, str):
        raise InputError(f"the {what} must be text, got {type(value).__name__}")
    check_unicode_text(value, what)
    return value


def _check_tree(value, what: str, depth: int = 0) -> None:
    """Every string (key or value) in nested dicts / lists is valid Unicode text."""
    if isinstance(value, str):
        check_unicode_text(value, what)
    elif isinstance(value, dict) and depth < 32:
        for key, item in value.items():
            if isinstance(key, str):
                check_unicode_text(key, f"{what} key")
            _check_tree(item, f"{what}[{key!r}]" if isinstance(key, str) and key.isprintable() else what, depth + 1)
    elif isinstance(value, (list, tuple)) and depth < 32:
        for item in value:
            _check_tree(item, what, depth + 1)


def check_unicode_text(text: str, what: str = "caption") -> None:
    """Refuse a lone (unpaired) surrogate, U+D800-U+DFFF: not valid Unicode, so it cannot be
    written as UTF-8 (JSON files, SQLite, the network) and would fail later as a codec error.

    Such text comes from half of an emoji (a UTF-16 pair split by a program), from JSON with a
    "\\ud800" escape, or from bytes that are not UTF-8 (Python holds each as U+DC80-U+DCFF
    when it decodes command-line arguments and file names). The message names `what`.
    Every text field of the data model goes through this; so does check_typed_text.
    """
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError as e:
        pos = e.start
    code = ord(text[pos])
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, decoded by Python with "surrogateescape"
        raw = text.encode("utf-8", "surrogateescape") if _escapes_only(text) else None
        try:
            decoded = raw.decode("utf-8", "surrogatepass") if raw is not None else None
        except UnicodeDecodeError:
            raise InputError(
                f"the {what} contains a lone surrogate (U+{code:04X}) at position {pos}, which is not valid Unicode "
                f"text: it stands for the byte 0x{code - 0xDC00:02X}, which is not UTF-8 (text saved in another "
                f"encoding, such as Latin-1, or a file name that is not UTF-8); give it as UTF-8 (rename such a "
                f"file) and try again") from None
        if decoded is not None:  # UTF-8 bytes of a surrogate itself (what bash makes of $'\ud800')
            pos = next(i for i, ch in enumerate(decoded) if 0xD800 <= ord(ch) <= 0xDFFF)
            code = ord(decoded[pos])
    raise InputError(
        f"the {what} contains a lone surrogate (U+{code:04X}) at position {pos}, which is not valid Unicode text: "
        f"half of an emoji or symbol whose other half is missing; type or paste that character again")


def _escapes_only(text: str) -> bool:
    """Every surrogate in `text` is a surrogateescape'd byte (U+DC80-U+DCFF)."""
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)


def check_caption(caption: str) -> None:
    """The caption is text, valid Unicode (check_unicode_text), not empty and at most
    MAX_CAPTION_CHARS long (else InputError)."""
    if not isinstance(caption, str):
        raise InputError(f"the caption must be text, got {type(caption).__name__}")
    check_unicode_text(caption, "caption")
    if not caption.strip():
        raise InputError("the caption is empty: type or paste the text that goes with the image")
    if len(caption) > MAX_CAPTION_CHARS:
        raise InputError(
            f"the caption has {len(caption):,} characters, more than the limit of {MAX_CAPTION_CHARS:,}; "
            f"keep only the sentence around the mention")


def check_typed_text(text: str, what: str = "caption") -> None:
    """Refuse characters nobody types: control characters other than tab, newline and carriage
    return (U+0000-U+001F, U+007F-U+009F), and lone surrogates (half an emoji; check_unicode_text).

    For text a person gives the app, the API or the CLI; emoji and every other script are fine.
    Dataset readers keep what their files hold and do not call this.
    """
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    for i, ch in enumerate(text):
        if ch in "\t\n\r":
            continue
        if unicodedata.category(ch) == "Cc":
            raise InputError(
                f"the {what} contains the control character U+{ord(ch):04X} at position {i}; control characters "
                f"are not text (copying from a terminal or a PDF can bring them along): remove them and try again")
    check_unicode_text(text, what)


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


# How a mention given without offsets was found in its caption (mel.datasets counts each rule):
#   exact     the mention as written
#   nfc       the same after Unicode NFC normalisation of both ("Zoe" + U+0308 vs "Zoë")
#   casefold  ignoring case (after NFC)
#   words     its words in order, whole words, ignoring case, with at most MAX_SKIPPED_PER_GAP
#             particles or initials ("von", "of", "de la", "J.") and a little punctuation between
#             two of them: "Otto Bismarck" in "Otto von Bismarck", "James Hamilton 1st Duke Abercorn"
#             in "James Hamilton, 1st Duke of Abercorn"; the span is the caption's whole phrase
#   context   not located: linked by its mention string, with the caption as context (mel.datasets)
LOCATE_RULES = ("exact", "nfc", "casefold", "words")
NOT_LOCATED = "context"
MAX_SKIPPED_PER_GAP = 2  # particles skipped between two words of the mention ("de la", "van ... tot")
MAX_SKIPPED_CHARS = 3  # a skipped word is lower case and at most this long ("von", "of"), or one capital ("J.")
MAX_PUNCT_CHARS = 4  # non-word characters between two words (", ", " - ")
_GAP = (rf"(\W{{1,{MAX_PUNCT_CHARS}}}(?:\w{{1,{MAX_SKIPPED_CHARS}}}\W{{1,{MAX_PUNCT_CHARS}}}){{0,{MAX_SKIPPED_PER_GAP}}})")


def locate_mention(caption: str, mention: str, *, words_in_order: bool = False) -> tuple[int, int] | None:
    """Character span of `mention` in `caption`: exact match first, then case-insensitive;
    with `words_in_order`, then its words in order (the `words` rule of LOCATE_RULES).

    Unicode normalisation does not matter: both are compared in NFC ("Zoë" typed as U+00EB is
    found in a caption holding "Zoe" + U+0308, and the other way round). The span refers to
    `caption` as given, and never cuts a character of it in two.
    """
    found = locate_mention_rule(caption, mention, words_in_order=words_in_order)
    return None if found is None else found[0]


def locate_mention_rule(caption: str, mention: str, *,
                        words_in_order: bool = True) -> tuple[tuple[int, int], str] | None:
    """(span, rule) of `mention` in `caption`, the rule being the first of LOCATE_RULES that
    finds it (see there); None when none does. The span refers to `caption` as given."""
    mention = mention.strip()
    if not mention:
        return None
    i = caption.find(mention)
    if i >= 0 and (unicodedata.is_normalized("NFC", caption) or _safe_cut(caption, i, i + len(mention))):
        return (i, i + len(mention)), "exact"
    mention = _nfc(mention)
    if unicodedata.is_normalized("NFC", caption):
        nfc_caption, bounds = caption, None
    else:
        bounds = nfc_boundaries(caption)  # NFC offset -> offset in caption, where a cut is safe
        nfc_caption = unicodedata.normalize("NFC", caption)
    found = _locate(nfc_caption, mention, bounds)
    if found is None and words_in_order:
        span = _find_words(nfc_caption, mention, bounds)
        found = None if span is None else (span, "words")
    if found is None:
        return None
    (start, end), rule = found
    if bounds is not None:
        start, end = bounds[start], bounds[end]
    return (start, end), rule


def _safe_cut(caption: str, start: int, end: int) -> bool:
    bounds = set(nfc_boundaries(caption).values())
    return start in bounds and end in bounds


def _find_words(caption: str, mention: str, ok: dict[int, int] | None) -> tuple[int, int] | None:
    """The first phrase of `caption` holding the words of `mention` in order (the `words` rule)."""
    words = re.findall(r"\w+", mention)
    if not words:
        return None
    pattern = r"(?<!\w)" + _GAP.join(re.escape(w) for w in words) + r"(?!\w)"
    for match in re.finditer(pattern, caption, re.IGNORECASE):
        if all(_skippable(gap) for gap in match.groups()):
            start, end = match.span()
            if ok is None or (start in ok and end in ok):
                return start, end
    return None


# short lower-case words that join two names rather than belong to one ("Bush and Obama")
NOT_PARTICLES = frozenset({"and", "or", "nor", "but", "und", "et", "ou", "is", "was", "by", "at", "in", "on", "to",
                           "for", "as"})


def _skippable(gap: str) -> bool:
    """Words between two words of the mention may be skipped when they are particles ("von",
    "de", "of": lower case, short, not a conjunction or preposition of NOT_PARTICLES) or
    initials ("J."); a digit or a capitalised word is not."""
    return all((w.isalpha() and w.islower() and w not in NOT_PARTICLES) or (len(w) == 1 and w.isalpha() and w.isupper())
               for w in re.findall(r"\w+", gap))


def _locate(caption: str, mention: str, ok: dict[int, int] | None) -> tuple[tuple[int, int], str] | None:
    span = _find(caption, mention, ok)
    if span is not None:
        return span, "nfc"
    # casefold can change lengths (ß -> ss); lower() keeps them for nearly all scripts, check anyway
    low_caption, low_mention = caption.lower(), mention.lower()
    if len(low_caption) == len(caption):
        span = _find(low_caption, low_mention, ok)
        if span is not None:
            return span, "casefold"
    return None


def _find(text: str, needle: str, ok: dict[int, int] | None) -> tuple[int, int] | None:
    """The first occurrence of `needle` in `text` that starts and ends at offsets in `ok` (any, if None)."""
    i = text.find(needle)
    while i >= 0:
        if ok is None or (i in ok and i + len(needle) in ok):
            return i, i + len(needle)
        i = text.find(needle, i + 1)
    return None


def nfc_boundaries(text: str) -> dict[int, int]:
    """{offset in NFC(text): offset in text} for every place where `text` can be cut without
    changing its NFC form (NFC(a) + NFC(b) == NFC(a + b)); always holds 0 and the ends.

    Cuts are tried before each character that cannot combine with the one before it (not a
    combining mark, not a Hangul jamo that composes, ...); the result is checked as a whole, so
    an offset in the map is always safe, and a script this rule does not know only loses cuts.
    """
    whole = unicodedata.normalize("NFC", text)
    cuts = [0]
    for i in range(1, len(text)):
        ch = text[i]
        if ch < "\u0300" and text[i - 1] < "\u0300":  # Latin-1 and the like: never composes
            cuts.append(i)
        elif not unicodedata.combining(ch):
            piece = text[cuts[-1]:i]  # since the last cut
            if unicodedata.normalize("NFC", piece + ch) == unicodedata.normalize("NFC", piece) + _nfc(ch):
                cuts.append(i)
    cuts.append(len(text))
    pieces = [unicodedata.normalize("NFC", text[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    if "".join(pieces) != whole:
        return {0: 0, len(whole): len(text)}
    mapping, pos = {0: 0}, 0
    for b, piece in zip(cuts[1:], pieces, strict=True):
        pos += len(piece)
        mapping[pos] = b
    return mapping


def _nfc_span(caption: str, start: int, end: int) -> tuple[str, int, int]:
    """The NFC caption and the span [start, end) of `caption` mapped onto it; InputError when the
    span cuts a character (a letter and the combining mark after it) in two."""
    to_nfc = {orig: new for new, orig in nfc_boundaries(caption).items()}
    for offset in (start, end):
        if offset not in to_nfc:
            raise InputError(
                f"the span [{start}, {end}) cuts the character {caption[max(offset - 1, 0):offset + 1]!r} in two at "
                f"offset {offset}: a letter and the accent or mark that follows it (U+{ord(caption[offset]):04X}) "
                f"are one character; select whole characters")
    return unicodedata.normalize("NFC", caption), to_nfc[start], to_nfc[end]
