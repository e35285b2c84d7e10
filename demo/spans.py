"""Mention spans from the browser, and the caption with its mention highlighted.

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

import html
import unicodedata

from mel.errors import InputError, MELError
from mel.types import Mention, check_caption, check_typed_text, locate_mention, nfc_boundaries, validate_span


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


def resolve_span(caption: str, mention: str | None, start, end) -> tuple[int, int]:
    """The span to link: (start, end) when given and they match `mention`, else `mention` located.

    This is what the Link button and the API use: offsets from a selection win; a typed
    mention is located (exact, then ignoring case); both checked against each other. Both
    comparisons ignore Unicode normalisation (NFC "Zoë" matches NFD "Zoe\u0308"); the span is in
    offsets of `caption` as given.
    """
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
        try:
            s, e = int(start), int(end)
        except (TypeError, ValueError):
            raise InputError(f"start and end must be whole numbers, got {start!r} and {end!r}") from None
        if float(start) != s or float(end) != e:
            raise InputError(f"start and end must be whole numbers, got {start!r} and {end!r}")
        if 0 <= s < e <= len(caption) and (not mention or _same_text(caption[s:e], mention)):
            if not mention:
                Mention(caption, s, e)  # raises with the reason (an empty span, one that cuts a character...)
                return s, e
            try:
                Mention(caption, s, e)
                return s, e
            except MELError:
                pass  # e.g. "Zoe" of "Zoe\u0308": locate the typed mention instead
        if not mention:
            validate_span(caption, s, e)  # raises with the reason
    if not mention:
        raise InputError("no mention: select it in the caption or type it in the Mention box")
    span = locate_mention(caption, mention)
    if span is None:
        raise InputError(f"the mention {mention!r} does not occur in the caption; select it in the caption or "
                         f"type it exactly as written there")
    return span


def highlight_html(caption: str, start: int, end: int, label: str = "") -> str:
    """The caption as HTML with the mention in <mark>; every piece of text is escaped."""
    before, mention, after = caption[:start], caption[start:end], caption[end:]
    tag = f'<span class="mel-label">{html.escape(label)}</span>' if label else ""
    return (f'<div class="mel-caption">{html.escape(before)}<mark class="mel-mention">{html.escape(mention)}{tag}</mark>'
            f"{html.escape(after)}</div>")
