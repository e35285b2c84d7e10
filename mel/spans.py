"""From what a person gave (a caption, a typed mention, offsets, a browser selection) to a Mention.

One resolver for every front end: the CLI (`python -m mel link`), the app and its API, annotation
projects. `resolve_mention` checks the caption and the mention once and builds the Mention once.

    mention = resolve_mention(caption, "Collins", None, None, image="photo.jpg")   # typed: located
    mention = resolve_mention(caption, "Collins", 12, 19)                          # selected: checked
    start, end = span_from_selection(caption, s16, e16, selected)                  # a browser's offsets

A browser reports a text selection in UTF-16 code units (`selectionStart`/`selectionEnd`), while
Python indexes strings by code point: every character outside the Basic Multilingual Plane
(most emoji, some CJK ideographs) is 2 units in the browser and 1 in Python. So
"🚀 Falcon" has "Falcon" at [3, 9) in the browser and at [2, 8) in Python.

Unicode normalisation: a caption may hold "ë" as one code point (NFC, U+00EB) or as "e" + U+0308
(NFD, e.g. pasted from macOS), and the typed mention the other form. Matching ignores the
difference (mel.types.locate_mention compares in NFC). Every span returned here is in Python
offsets of the caption as given, never cuts a letter from its accent, and mel.types.Mention maps
it onto the NFC caption it stores.
"""
from __future__ import annotations

import difflib
import os
import unicodedata

from .errors import InputError, MELError
from .types import Mention, check_caption, check_typed_text, locate_mention, nfc_boundaries, validate_span


def utf16_to_index(text: str, offset: int) -> int:
    """The Python index of UTF-16 offset `offset` in `text`.

    An offset that falls inside a surrogate pair (half an emoji) is moved to the start of
    that character.
    """
    if offset < 0:
        raise InputError(f"negative selection offset {offset}")
    units = 0
    for i, ch in enumerate(text):
        if units >= offset:
            return i
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > offset:  # inside a surrogate pair
            return i
    if offset > units:
        raise InputError(f"selection offset {offset} is past the end of the caption ({units} UTF-16 units); "
                         f"select the mention again")
    return len(text)


def index_to_utf16(text: str, index: int) -> int:
    """The UTF-16 offset of Python index `index` (what a browser calls that position)."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text[:index])


def span_from_selection(caption: str, utf16_start: int, utf16_end: int, selected: str | None = None) -> tuple[int, int]:
    """Python (start, end) of a browser selection, checked against the selected text.

    `selected` is the text the browser says was selected; when it does not equal
    caption[start:end] (the caption changed since, or the offsets were already code points)
    the span is taken from where `selected` occurs instead. Surrounding spaces of a
    double-click selection are trimmed.
    """
    if utf16_end < utf16_start:
        utf16_start, utf16_end = utf16_end, utf16_start
    start, end = utf16_to_index(caption, utf16_start), utf16_to_index(caption, utf16_end)
    if selected is not None and caption[start:end] != selected:
        if caption[utf16_start:utf16_end] == selected:  # the offsets were code points already
            start, end = utf16_start, utf16_end
        else:
            span = locate_mention(caption, selected)
            if span is None:
                raise InputError(f"the selected text {selected!r} is not in the caption any more; "
                                 f"select the mention again")
            start, end = span
    # a double click selects the trailing space too; the mention is the word
    while start < end and caption[start].isspace():
        start += 1
    while end > start and caption[end - 1].isspace():
        end -= 1
    validate_span(caption, start, end)
    return _whole_characters(caption, start, end)


def _whole_characters(caption: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) widened to whole characters where it cuts a letter from the combining accent
    after it (only possible in a caption that is not NFC), as a half emoji is widened above."""
    if unicodedata.is_normalized("NFC", caption):
        return start, end
    cuts = sorted(nfc_boundaries(caption).values())
    return max(c for c in cuts if c <= start), min(c for c in cuts if c >= end)


def _same_text(a: str, b: str) -> bool:
    return unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)


def span_holds(caption, mention, start, end) -> bool:
    """Whether caption[start:end] is the mention (any Unicode form); False for anything that is not
    a caption, a mention and two offsets inside the caption."""
    if not isinstance(caption, str) or not isinstance(mention, str) or not mention.strip():
        return False
    try:
        s, e = int(start), int(end)
    except (TypeError, ValueError, OverflowError):
        return False
    return 0 <= s < e <= len(caption) and _same_text(caption[s:e], mention.strip())


MAX_MATCHED_MIDDLE = 4_000  # characters of follow_edit's changed middle, both texts together


def follow_edit(before: str, after: str, start: int, end: int) -> tuple[int, int] | None:
    """Where the span [start, end) of `before` is in `after`, the text after an edit (typing, a paste,
    a deletion, or a few of them in one step): kept when the edits came after it, shifted by those
    before it, None when one touched it."""
    prefix = len(os.path.commonprefix([before, after]))
    suffix = min(len(os.path.commonprefix([before[::-1], after[::-1]])), min(len(before), len(after)) - prefix)
    if end <= prefix:
        return start, end
    shift = len(after) - len(before)
    if start >= len(before) - suffix:
        return start + shift, end + shift
    # edits on both sides of it (two quick edits seen as one): the changed middle, matched block by block
    # (quadratic: only for a middle of a usual caption's size; a longer one counts as touched)
    old_middle, new_middle = before[prefix:len(before) - suffix], after[prefix:len(after) - suffix]
    if len(old_middle) + len(new_middle) > MAX_MATCHED_MIDDLE:
        return None
    middle = difflib.SequenceMatcher(None, old_middle, new_middle, autojunk=False)
    for i, j, n in middle.get_matching_blocks():
        if prefix + i <= start and end <= prefix + i + n:
            return start + j - i, end + j - i
    return None


def _whole_numbers(start, end) -> tuple[int, int]:
    try:
        s, e = int(start), int(end)
    except (TypeError, ValueError):
        raise InputError(f"start and end must be whole numbers, got {start!r} and {end!r}") from None
    def fractional(value, whole: int) -> bool:  # an int is whole even past a float's precision
        return not isinstance(value, int) and float(value) != whole
    if fractional(start, s) or fractional(end, e):
        raise InputError(f"start and end must be whole numbers, got {start!r} and {end!r}")
    return s, e


def resolve_mention(caption: str, mention: str | None, start=None, end=None, *, image: str | None = None,
                    id: str | None = None, strict: bool = False) -> Mention:
    """The Mention to link: `caption[start:end]` when the offsets are given and agree with the
    typed `mention` (or no mention is typed), else `mention` located in the caption (exact, then
    ignoring case). Both comparisons ignore Unicode normalisation (NFC "Zoë" matches NFD "Zoe\u0308").

    Offsets that disagree with the typed mention are ignored (a browser selection can be stale
    after the caption was edited), unless `strict`: then they are an InputError (the CLI, where a
    person typed both). The caption and the mention are checked once (too long, control
    characters, lone surrogates) and the Mention is built once, with `image` and `id`.
    """
    return _resolve(caption, mention, start, end, image, id, strict)[1]


def resolve_span(caption: str, mention: str | None, start, end, *, strict: bool = False) -> tuple[int, int]:
    """The span `resolve_mention` links, in offsets of `caption` as given (the Mention stores the
    NFC caption, whose offsets differ when the caption is not NFC)."""
    return _resolve(caption, mention, start, end, None, None, strict)[0]


def _resolve(caption, mention, start, end, image, id, strict) -> tuple[tuple[int, int], Mention]:
    if not isinstance(caption, str) or not caption.strip():
        raise InputError("the caption is empty: type or paste the text that goes with the image")
    check_caption(caption)  # too long: said before anything is searched in it
    check_typed_text(caption, "caption")
    if mention is not None and not isinstance(mention, str):
        raise InputError(f"the mention must be text, got {type(mention).__name__}")
    check_typed_text(mention or "", "mention")
    mention = (mention or "").strip()
    have_span = start is not None and end is not None and str(start) != "" and str(end) != ""
    if have_span:
        s, e = _whole_numbers(start, end)
        if strict or not mention:  # the offsets are what was asked for: any fault in them is said
            validate_span(caption, s, e)
            if mention and not _same_text(caption[s:e], mention):
                raise InputError(f"the mention {mention!r} and the offsets [{s}, {e}) ({caption[s:e]!r}) disagree; "
                                 f"give one of them")
            return (s, e), Mention(caption, s, e, image=image, id=id)  # raises when the span cuts a character
        if span_holds(caption, mention, s, e):
            try:
                return (s, e), Mention(caption, s, e, image=image, id=id)
            except MELError:
                pass  # e.g. "Zoe" of "Zoe\u0308": locate the typed mention instead
    if not mention:
        raise InputError("no mention: select it in the caption or type it in the Mention box")
    span = locate_mention(caption, mention)
    if span is None:
        raise InputError(f"the mention {mention!r} does not occur in the caption; select it in the caption or "
                         f"type it exactly as written there")
    return span, Mention(caption, span[0], span[1], image=image, id=id)
