"""The caption with its mention highlighted, for the app; spans themselves are the library's.

Turning what a person gave (offsets, a browser selection, a typed mention) into a span is
`mel.spans`, shared with the CLI and annotation projects; its names are re-exported here for
the app's modules.
"""
from __future__ import annotations

import html

from mel.spans import index_to_utf16, resolve_mention, resolve_span, span_from_selection, utf16_to_index

__all__ = ["highlight_html", "index_to_utf16", "resolve_mention", "resolve_span", "span_from_selection",
           "utf16_to_index"]


def highlight_html(caption: str, start: int, end: int, label: str = "") -> str:
    """The caption as HTML with the mention in <mark>; every piece of text is escaped."""
    before, mention, after = caption[:start], caption[start:end], caption[end:]
    tag = f'<span class="mel-label">{html.escape(label)}</span>' if label else ""
    return (f'<div class="mel-caption">{html.escape(before)}<mark class="mel-mention">{html.escape(mention)}{tag}</mark>'
            f"{html.escape(after)}</div>")
