"""Shared pieces of the dataset readers: the report, the split container, JSON loading that
names the file and record on failure, mention location, split aliases and the dev carve."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DatasetFormatError, InputError
from ..types import NIL, NOT_LOCATED, Entity, Example, Mention, locate_mention_rule, validate_span

CAPTION_PREFIX_CHARS = 60  # how much of a caption the report keeps for an unlocated mention
MAX_LISTED_IN_SUMMARY = 3
MAX_RULE_SAMPLES = 5  # mentions kept per locating rule (other than exact) in report.located_samples
CONTEXT_SEPARATOR = ": "  # an unlocated mention is linked as "<mention>: <caption>", span = the mention
UNLOCATED_POLICIES = ("context", "skip")

# Split names that mean the same thing across dataset releases.
SPLIT_ALIASES = {
    "dev": ("val", "valid", "validation"),
    "val": ("dev", "valid", "validation"),
    "valid": ("dev", "val", "validation"),
    "validation": ("dev", "val", "valid"),
}

_MISSING = object()


@dataclass
class ReadReport:
    """What a reader saw. Invariants (checked by the tests):

    n_mentions == n_with_span + n_located (every rule) + n_unlocated + n_invalid
    n_located == n_located_exact + n_located_casefold + n_located_words
    n_located_nfc <= n_located_exact   (exact up to Unicode normalisation; of which n_located_nfc
                                        matched only once both were NFC: rule_counts splits them)
    len(examples) == n_with_span + n_located + n_unlocated   (unlocated="context")
    len(examples) == n_with_span + n_located                 (unlocated="skip", the default)
    n_records == n_with_image + n_missing_image   (images are counted per record)

    An unlocated mention (no rule of mel.types.LOCATE_RULES finds it) is listed in `unlocated`; with
    load_dataset(..., unlocated="context") it is also an example, linked by its mention string with the
    caption as context (context_mention, Example.located == "context").
    """

    n_records: int = 0
    n_mentions: int = 0
    n_with_span: int = 0  # offsets given by the file (jsonl)
    n_located_exact: int = 0
    n_located_nfc: int = 0  # of n_located_exact: equal only once both are in Unicode NFC
    n_located_casefold: int = 0
    n_located_words: int = 0  # its words in order, particles/punctuation skipped ("Otto Bismarck")
    n_unlocated: int = 0  # found by no rule: linked by the mention string, caption as context (or skipped)
    unlocated_policy: str = "context"  # "context": unlocated mentions are examples; "skip": left out (load_dataset)
    # rule -> a few (sample_id, mention, what the caption says there) to check the rule by eye
    located_samples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    unlocated: list[tuple[str, str, str]] = field(default_factory=list)  # (sample_id, mention, caption prefix)
    n_invalid: int = 0  # mentions whose caption or span fails validate_span
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (sample_id, reason)
    n_with_image: int = 0
    n_missing_image: int = 0
    n_nil: int = 0  # examples whose gold is NIL
    notes: list[str] = field(default_factory=list)

    @property
    def n_located(self) -> int:
        return self.n_located_exact + self.n_located_casefold + self.n_located_words

    @property
    def n_examples(self) -> int:
        return self.n_with_span + self.n_located + (self.n_unlocated if self.unlocated_policy == "context" else 0)

    def rule_counts(self) -> dict[str, int]:
        """How many mentions each rule located: offsets (given by the file), exact, nfc, casefold,
        words, context (not located, linked by the mention string; 0 when skipped)."""
        return {"offsets": self.n_with_span, "exact": self.n_located_exact - self.n_located_nfc, "nfc": self.n_located_nfc,
                "casefold": self.n_located_casefold, "words": self.n_located_words,
                NOT_LOCATED: self.n_unlocated if self.unlocated_policy == "context" else 0}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["unlocated"] = [list(t) for t in self.unlocated]
        data["invalid"] = [list(t) for t in self.invalid]
        data["located_samples"] = {k: [list(t) for t in v] for k, v in self.located_samples.items()}
        data["n_examples"] = self.n_examples
        data["rule_counts"] = self.rule_counts()
        return data

    def rules_line(self) -> str:
        """One line: how many mentions each rule located (what `mel eval` and `mel data info` print)."""
        counts = self.rule_counts()
        parts = [f"{rule} {n:,}" for rule, n in counts.items() if n or rule in ("exact", NOT_LOCATED)]
        skipped = (f"; {self.n_unlocated:,} unlocated skipped" if self.unlocated_policy == "skip"
                   and self.n_unlocated else "")
        invalid = f"; {self.n_invalid:,} invalid skipped" if self.n_invalid else ""
        return (f"located by rule: {', '.join(parts)} (of {self.n_mentions:,} mentions, "
                f"{self.n_examples:,} examples{skipped}{invalid})")

    def summary(self) -> str:
        parts = [f"{self.n_records:,} records, {self.n_mentions:,} mentions -> {self.n_examples:,} examples"]
        how = []
        if self.n_with_span:
            how.append(f"{self.n_with_span:,} with offsets from the file")
        if self.n_located_exact:
            nfc = f", {self.n_located_nfc:,} of them after Unicode NFC" if self.n_located_nfc else ""
            how.append(f"{self.n_located_exact:,} located exactly{nfc}")
        if self.n_located_casefold:
            how.append(f"{self.n_located_casefold:,} located ignoring case")
        if self.n_located_words:
            how.append(f"{self.n_located_words:,} located by their words in order")
        if self.n_unlocated and self.unlocated_policy == "context":
            how.append(f"{self.n_unlocated:,} not located, linked by the mention string with the caption as context")
        if how:
            parts[0] += f" ({', '.join(how)})"
        if self.n_unlocated:
            shown = "; ".join(f"{sid}: {_clip(m)!r}" for sid, m, _ in self.unlocated[:MAX_LISTED_IN_SUMMARY])
            what = ("kept as '<mention>: <caption>' examples" if self.unlocated_policy == "context"
                    else "skipped (unlocated='skip')")
            parts.append(f"{self.n_unlocated:,} mentions not found in their caption, {what} "
                         f"(listed in report.unlocated, e.g. {shown})")
        else:
            parts.append("every mention was found in its caption")
        if self.n_invalid:
            shown = ", ".join(sid for sid, _ in self.invalid[:MAX_LISTED_IN_SUMMARY])
            parts.append(f"{self.n_invalid:,} mentions skipped for an invalid caption or span "
                         f"(listed in report.invalid, e.g. {shown})")
        parts.append(f"images: {self.n_with_image:,} records with one, {self.n_missing_image:,} without")
        if self.n_nil:
            parts.append(f"{self.n_nil:,} examples have a NIL gold")
        text = "; ".join(parts) + "."
        if self.notes:
            text += " " + " ".join(n if n.endswith(".") else n + "." for n in self.notes)
        return text


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


@dataclass
class DatasetSplit:
    """The examples of one split, with the report of how they were read.

    `image_urls` maps Example.sample_id to the image URL the dataset gives (WikiDiverse
    `img-url`, GEMEL `img_url`). Mention.image only ever holds a local file that exists, so
    nothing downstream reaches for the network by accident.
    """

    examples: list[Example]
    report: ReadReport
    format: str
    split: str
    path: str
    image_urls: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ---------------------------------------------------------------------------------------------
# Files


def expand_user(path: str | Path) -> Path:
    """Path(path) with ~ expanded; '~someone' for a user this machine does not know stays as written."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        return Path(path)


def dataset_dir(path: str | Path, fmt: str, layout: str) -> Path:
    """The dataset directory; a file inside it is accepted too (its folder is used)."""
    p = expand_user(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise DatasetFormatError(p, f"no such directory; the {fmt} layout is {layout}")
    return p.resolve()


def require_file(root: Path, name: str, fmt: str, layout: str) -> Path:
    p = root / name
    if not p.is_file():
        raise DatasetFormatError(p, f"file not found; the {fmt} layout expects {layout}")
    return p


def load_json(path: Path, expect: type | tuple[type, ...] | None = None) -> Any:
    """Parse a JSON file; any failure is a DatasetFormatError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(path, f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise DatasetFormatError(path, "not a dataset file: its JSON is nested too deeply to read") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetFormatError(path, f"cannot be read: {e.strerror or e}") from None
    if expect is not None and not isinstance(data, expect):
        raise DatasetFormatError(path, f"the top level must be {_type_names(expect)}, got {_type_name(data)}")
    return data


def load_str_map(path: Path, what: str) -> dict[str, str]:
    """A JSON object of strings ({QID: name}, {QID: description}...)."""
    data = load_json(path, dict)
    for key, value in data.items():
        if not isinstance(value, str):
            raise DatasetFormatError(path, f"each {what} must be a string, got {_type_name(value)}", key)
    return data


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSON-lines file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetFormatError(path, f"not valid JSON: {e.msg} at column {e.colno}",
                                             f"line {n}") from None
                except RecursionError:
                    raise DatasetFormatError(path, "not a dataset record: its JSON is nested too deeply to read",
                                             f"line {n}") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetFormatError(path, f"cannot be read: {e.strerror or e}") from None


def load_split_ids(path: Path) -> dict[str, list[str]]:
    """A splits file {split: [ids]}; ids become text (WikiDiverse stores integers)."""
    data = load_json(path, dict)
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise DatasetFormatError(path, "each split must be a list of sample ids", name)
    return {name: [str(i) for i in ids] for name, ids in data.items()}


def load_records(path: Path) -> list[tuple[str, Any]]:
    """Records of a file that is either one JSON array or JSON lines, as (record id, object).

    The record id is the line number for JSON lines and the index for an array; readers
    replace it with the record's own id where it has one.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):  # BOM
        head = head[3:].lstrip()
    if head.startswith(b"["):
        return [(str(i), rec) for i, rec in enumerate(load_json(path, list))]
    return [(f"line {n}", rec) for n, rec in iter_jsonl(path)]


def records_of_split(ids: list[str], samples: dict[str, Any], out: "ExampleBuilder", *, split_name: str,
                     ids_file: str, data_file: str) -> Iterator[tuple[str, Any]]:
    """(id, record) for each id a split file lists, once each, in order; ids missing from the data
    file and repeated ids are skipped and counted in `out`'s notes."""
    absent, repeats, seen = 0, 0, set()
    for sid in ids:
        if sid in seen:  # a repeated id would give two examples with one sample_id
            repeats += 1
            continue
        seen.add(sid)
        rec = samples.get(sid)
        if rec is None:
            absent += 1
            continue
        yield sid, rec
    if absent:
        out.note(f"{absent:,} of the {len(ids):,} ids that {ids_file} lists for {split_name!r} "
                 f"are not in {data_file} and were skipped")
    if repeats:
        out.note(f"{repeats:,} repeated ids in {ids_file}[{split_name!r}] were read once")


def image_index(folder: Path) -> set[str]:
    """File names in `folder` (one listing instead of one stat per record)."""
    try:
        return {e.name for e in os.scandir(folder) if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def _type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _type_names(types) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _as_tuple(types))


def get_field(rec: Any, key: str, types, path: Path, record_id, default=_MISSING):
    """rec[key], checked against `types`; DatasetFormatError naming file and record otherwise."""
    if not isinstance(rec, dict):
        raise DatasetFormatError(path, f"a record must be an object, got {_type_name(rec)}", record_id)
    if key not in rec:
        if default is not _MISSING:
            return default
        raise DatasetFormatError(path, f"missing required key {key!r} (keys present: {sorted(rec)})", record_id)
    value = rec[key]
    # bool is an int in Python; never accept it where a number or text is expected
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise DatasetFormatError(path, f"{key!r} must be {_type_names(types)}, got {_type_name(value)}", record_id)
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def as_str_list(value, key: str, path: Path, record_id) -> list[str]:
    """A field that may be one string or a list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise DatasetFormatError(path, f"{key!r} must be a string or a list of strings", record_id)
    return items


def make_entity(path: Path, record_id, **fields) -> Entity:
    """Entity(**fields); a field the data model refuses (a lone surrogate from a "\\ud800" escape...)
    is a DatasetFormatError naming the file and the record, like any other malformed record."""
    try:
        return Entity(**fields)
    except InputError as e:
        raise DatasetFormatError(path, str(e), record_id) from None


def parse_gold_id(value: str, path: Path, record_id) -> str:
    """A gold id from a file: 'nil' in any case means NIL; empty is an error."""
    value = value.strip()
    if not value:
        raise DatasetFormatError(path, "empty gold entity id", record_id)
    return NIL if value.lower() == "nil" else value


def mention_record(rec: Any, path: Path, record_id, *, caption: str = "sentence", mentions: str = "mentions",
                   names: str = "entities", answers: str = "answer") -> tuple[str, list[tuple[str, str, str]]]:
    """Caption and (mention, gold id, gold name) triples of a MELBench-style record, whose
    mention/name/answer fields are parallel lists or single strings. Names are optional."""
    text = get_field(rec, caption, str, path, record_id)
    ms = as_str_list(get_field(rec, mentions, (str, list), path, record_id), mentions, path, record_id)
    golds = as_str_list(get_field(rec, answers, (str, list), path, record_id), answers, path, record_id)
    ns = get_field(rec, names, (str, list), path, record_id, default=None)
    ns = [""] * len(golds) if ns is None else as_str_list(ns, names, path, record_id)
    if not len(ms) == len(golds) == len(ns):
        raise DatasetFormatError(path, f"{mentions!r}, {names!r} and {answers!r} differ in length "
                                       f"({len(ms)}, {len(ns)}, {len(golds)})", record_id)
    return text, [(m, parse_gold_id(g, path, record_id), n) for m, g, n in zip(ms, golds, ns, strict=True)]


# ---------------------------------------------------------------------------------------------
# Splits


def resolve_split(split: str, available: Iterable[str], fmt: str, root: Path) -> str:
    """The name under which `split` is stored ('dev' finds 'val' and vice versa)."""
    available = list(available)
    if split in available:
        return split
    for alias in SPLIT_ALIASES.get(split, ()):
        if alias in available:
            return alias
    raise InputError(f"{fmt} dataset at {root} has no split {split!r}; splits present: "
                     f"{', '.join(available) or 'none'}")


def stable_hash(seed: int, key: str) -> str:
    """Hash that is the same on every machine and run (unlike hash(), which is salted)."""
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def carve_dev(ids: Iterable[str], dev_fraction: float, seed: int) -> set[str]:
    """The ids held out as dev: the round(n * dev_fraction) ids with the smallest stable hash."""
    if not isinstance(dev_fraction, (int, float)) or isinstance(dev_fraction, bool) or not 0 < dev_fraction < 1:
        raise InputError(f"dev_fraction must be a number strictly between 0 and 1, got {dev_fraction!r}")
    ids = sorted(set(ids))
    k = round(len(ids) * dev_fraction)
    return set(sorted(ids, key=lambda i: (stable_hash(seed, i), i))[:k])


# ---------------------------------------------------------------------------------------------
# Building examples


class ExampleBuilder:
    """Turns records into Examples, one per mention, and keeps the report's counts honest."""

    def __init__(self, fmt: str, split: str, path: Path):
        self.fmt, self.split, self.path = fmt, split, path
        self.examples: list[Example] = []
        self.report = ReadReport()
        self.image_urls: dict[str, str] = {}
        self._record_ids: set[str] = set()
        self._renamed = 0

    def add_record(self, sample_id: str, caption: str, mentions: list[tuple[str, str, str]],
                   image: str | None, image_url: str | None = None) -> None:
        """One record: `mentions` holds (mention text, gold id, gold name) without offsets."""
        r = self.report
        r.n_records += 1
        r.n_mentions += len(mentions)
        self._count_image(image)
        if sample_id in self._record_ids:  # keep Example.sample_id unique, deterministically
            sample_id = f"{sample_id}@{r.n_records - 1}"
            self._renamed += 1
        self._record_ids.add(sample_id)
        reason = _caption_problem(caption)
        used_end: dict[str, int] = {}
        for i, (text, gid, gname) in enumerate(mentions):
            sid = f"{sample_id}#{i}"
            if reason:
                self._invalid(sid, reason)
                continue
            located = _locate(caption, text, used_end)
            try:  # Mention and Example refuse text that is not valid Unicode (a "\\ud800" escape in a file)
                if located is None:
                    r.n_unlocated += 1
                    r.unlocated.append((sid, text, caption[:CAPTION_PREFIX_CHARS]))
                    mention, rule = context_mention(caption, text, image=image, id=sid), NOT_LOCATED
                else:
                    (start, end), rule = located
                    mention = Mention(caption, start, end, image=image, id=sid)
                example = Example(mention, gid, gname, sid, self.fmt, self.split, located=rule)
            except InputError as e:
                if located is None:  # counted as invalid, not as unlocated
                    r.n_unlocated -= 1
                    r.unlocated.pop()
                self._invalid(sid, str(e))
                continue
            if rule != NOT_LOCATED:
                r.n_located_exact += rule == "nfc"  # exact up to NFC; n_located_nfc says how many needed it
                field_name = f"n_located_{rule}"
                setattr(r, field_name, getattr(r, field_name) + 1)
                if rule != "exact":
                    samples = r.located_samples.setdefault(rule, [])
                    if len(samples) < MAX_RULE_SAMPLES:
                        samples.append((sid, text, mention.text))
            self._append(example, image_url)

    def add_example(self, example: Example, image_url: str | None = None) -> None:
        """A record that already is an Example with offsets (the jsonl format)."""
        r = self.report
        r.n_records += 1
        r.n_mentions += 1
        r.n_with_span += 1
        self._count_image(example.mention.image)
        self._append(example, image_url)

    def add_invalid_record(self, sample_id: str, reason: str, image: str | None = None) -> None:
        r = self.report
        r.n_records += 1
        r.n_mentions += 1
        self._count_image(image)
        self._invalid(sample_id, reason)

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def build(self) -> DatasetSplit:
        if self._renamed:
            self.note(f"{self._renamed:,} records repeat an id already used; they are named <id>@<position>")
        if self.report.n_nil:
            self.note(f"{self.report.n_nil:,} examples have gold {NIL} (no entity in the KB)")
        return DatasetSplit(self.examples, self.report, self.fmt, self.split, str(self.path), self.image_urls)

    def _append(self, example: Example, image_url: str | None) -> None:
        self.examples.append(example)
        if example.gold_id == NIL:
            self.report.n_nil += 1
        if image_url:
            self.image_urls[example.sample_id] = image_url

    def _count_image(self, image: str | None) -> None:
        if image:
            self.report.n_with_image += 1
        else:
            self.report.n_missing_image += 1

    def _invalid(self, sid: str, reason: str) -> None:
        self.report.n_invalid += 1
        self.report.invalid.append((sid, reason))


def _caption_problem(caption: str) -> str | None:
    try:
        validate_span(caption, 0, len(caption))
    except InputError as e:
        return str(e)
    return None


def context_mention(caption: str, text: str, image: str | None = None, id: str | None = None) -> Mention:
    """A mention that is not in its caption, as a Mention every linker takes: the caption becomes
    "<mention>: <caption>" and the span is the mention string, so exact/bm25/dense read the mention
    and DIM/GEMEL still see the caption as context. InputError for an empty mention."""
    text = text.strip()
    if not text:
        raise InputError("the mention is empty")
    return Mention(f"{text}{CONTEXT_SEPARATOR}{caption}", 0, len(text), image=image, id=id)


def _locate(caption: str, text: str, used_end: dict[str, int]) -> tuple[tuple[int, int], str] | None:
    """locate_mention_rule (every rule, the words in order too), except that a mention repeated
    within one record takes the next occurrence after the previous one when there is one
    ("Smith and Smith")."""
    key = unicodedata.normalize("NFC", text.strip()).lower()
    found = None
    if key in used_end:
        start = used_end[key]
        rest = locate_mention_rule(caption[start:], text)
        if rest is not None:
            (a, b), rule = rest
            found = (start + a, start + b), rule
    if found is None:
        found = locate_mention_rule(caption, text)
    if found is not None:
        used_end[key] = found[0][1]
    return found
