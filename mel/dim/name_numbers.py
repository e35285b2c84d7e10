"""Name-number features (issue #15): does a candidate carry the regnal or title number the caption gives?

Royal and noble names differ by a number only: "William V" and "William VII, Landgrave of Hesse-Kassel", "Rupert
II, Elector Palatine" and "Rupert, Count Palatine of Veldenz", "Johannes, 11th Prince of Thurn and Taxis". A
frozen sentence encoder barely sees the difference, and the mention itself often holds no number ("Hesse-Kassel"
in "William V, a member of the House of Hesse, was Landgrave of Hesse-Kassel"). A number is read as a pair
(anchor word, value): a Roman numeral after a capitalised word ("William V" -> (william, 5)) or an English
ordinal before one ("11th Prince" -> (prince, 11)). For a (caption, entity) pair:

    number_agree     a (word, number) of the entity's name or an alias is in the caption
    number_clash     not agree, and the caption gives another number to a word the name numbers
    number_missing   not agree, and the caption numbers a word of the name that the name leaves unnumbered

All three are 0 for a caption without numbers, so the term (a linear one, bias 0: `DimFusion.numbers`) adds
exactly 0 there and every such mention scores as with the base head.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence, Set

import numpy as np

from ..kb import normalize_name

NUMBER_FEATURES = ("number_agree", "number_clash", "number_missing")
N_NUMBER_FEATURES = len(NUMBER_FEATURES)

_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|\d+(?:st|nd|rd|th)\b|\d+", re.UNICODE)
_POSSESSIVE = re.compile(r"['’]s$")
_ROMAN = re.compile(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})")
_ORDINAL = re.compile(r"(\d{1,3})(?:st|nd|rd|th)", re.I)
_ROMAN_VALUE = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
_MAX_NUMBER = 100  # no regnal or title number goes higher; "Washington, DC" (600) and "Baltimore, MD" are places
# capitalised words that are not numbered: "Then I", "World War II", "Part V", "4th July", "19th Century"
_NOT_ANCHORS = {"and", "or", "the", "when", "then", "as", "if", "so", "part", "vol", "volume", "chapter", "phase",
                "type", "class", "grade", "level", "world", "war", "act", "section", "appendix", "figure", "table",
                "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
                "november", "december", "century"}
# after "I", these words make it the pronoun ("In Paris I met", "Today I think")
_PRONOUN_VERBS = {"am", "have", "had", "think", "thought", "met", "saw", "went", "do", "did", "will", "would", "can",
                  "could", "feel", "felt", "love", "like", "know", "knew", "believe", "want", "got", "took", "made",
                  "said", "say", "see", "remember", "hope"}


def roman_value(token: str) -> int | None:
    """The value of an upper-case Roman numeral (I to MMMCMXCIX), else None."""
    if not token or not _ROMAN.fullmatch(token):
        return None
    values = [_ROMAN_VALUE[ch] for ch in token]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _regnal_value(text: str, matches: list, i: int) -> int | None:
    """The number that word i is, when it numbers the capitalised word before it ("William V", "Henry VIII's",
    "Elizabeth I."), else None: an initial ("Louis V. Gerstner", "Klaus M."), the pronoun ("Paris I met"), a
    two-letter abbreviation ("Long Island, LI"), something over _MAX_NUMBER, or punctuation in between."""
    word = _POSSESSIVE.sub("", matches[i].group())
    if not i or not text[matches[i - 1].end():matches[i].start()].isspace():
        return None
    before = matches[i - 1].group()
    if not before[:1].isupper() or before.isupper() or normalize_name(before) in _NOT_ANCHORS:
        return None
    value = roman_value(word)
    if value is None or value > _MAX_NUMBER or (len(word) <= 2 and not set(word) <= set("IVX")):
        return None
    after = matches[i + 1].group() if i + 1 < len(matches) else ""
    gap = text[matches[i].end():matches[i + 1].start()] if after else ""
    if len(word) == 1 and gap.startswith(".") and after[:1].isupper():
        return None  # an initial: "Louis V. Gerstner"
    if word == "I" and gap.isspace() and after in _PRONOUN_VERBS:
        return None
    return value


def _anchor(word: str) -> str:
    """The normalised word a number belongs to; of a hyphenated one its last part ("Hesse-Kassel" -> "kassel"), a
    word of the name as `EntityFacts.name_tokens` splits it."""
    parts = normalize_name(word).split()
    return parts[-1] if parts else ""


def numbered_words(text: str) -> set[tuple[str, int]]:
    """The (normalised anchor word, number) pairs of `text`: "William V" -> ("william", 5), "Ruprecht II." ->
    ("ruprecht", 2), "Henry VIII's" -> ("henry", 8), "11th Prince" -> ("prince", 11)."""
    text = text or ""
    matches = list(_WORD.finditer(text))
    found: set[tuple[str, int]] = set()
    for i, m in enumerate(matches):
        value = _regnal_value(text, matches, i)
        if value is not None:
            found.add((_anchor(matches[i - 1].group()), value))
            continue
        ordinal = _ORDINAL.fullmatch(m.group())
        if ordinal and i + 1 < len(matches) and text[m.end():matches[i + 1].start()].isspace():
            after = matches[i + 1].group()
            anchor = _anchor(after)
            if after[:1].isupper() and anchor and anchor not in _NOT_ANCHORS and int(ordinal.group(1)) <= _MAX_NUMBER:
                found.add((anchor, int(ordinal.group(1))))
    return found


def number_values(caption_numbers: set[tuple[str, int]], entity_numbers: Set[tuple[str, int]],
                  name_words: Iterable[str]) -> np.ndarray:
    """(N_NUMBER_FEATURES,) for one candidate: `caption_numbers` = numbered_words(caption), `entity_numbers` those
    of its name and aliases, `name_words` the normalised words of its name."""
    out = np.zeros(N_NUMBER_FEATURES, np.float32)
    if not caption_numbers:
        return out
    if entity_numbers & caption_numbers:
        out[0] = 1.0
        return out
    numbered = {word for word, _ in entity_numbers}
    caption_words = {word for word, _ in caption_numbers}
    out[1] = float(bool(numbered & caption_words))
    out[2] = float(bool((set(name_words) - numbered) & caption_words))
    return out


def number_pair_features(caption_numbers: Sequence[set[tuple[str, int]]], facts: Mapping, idxs: np.ndarray,
                         valid: np.ndarray) -> np.ndarray:
    """(b, c, N_NUMBER_FEATURES) for padded candidate rows (-1 = padding, zero there): `caption_numbers` is
    numbered_words(caption) of each mention, `facts` maps each KB row of `idxs` to its `mel.dim.pairs.EntityFacts`."""
    b, c = idxs.shape
    out = np.zeros((b, c, N_NUMBER_FEATURES), np.float32)
    for i, numbers in enumerate(caption_numbers):
        if not numbers:
            continue
        for j in np.flatnonzero(valid[i]):
            e = facts[int(idxs[i, j])]
            out[i, j] = number_values(numbers, e.name_numbers, e.name_tokens)
    return out
