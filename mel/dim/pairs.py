"""Pair features: cheap evidence about one (mention, candidate entity) pair. Beyond the paper.

DIM scores a pair by the cosine of two fused embeddings. Frozen sentence embeddings are weak at
exactly what short MEL mentions need: "Norris in 1976" names a surname and a year, and the
entity descriptions are attribute summaries ("Sex: male. Birth: 1940, Ryan. Occupation: actor").
These scalars give the re-ranker that evidence directly; a small MLP in the fusion head turns
them into a score added to the cosine. Every feature is in [0, 1] or a small range, so no
normaliser has to be fitted and stored.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..kb import normalize_name
from ..types import Entity
from .name_numbers import numbered_words

PAIR_FEATURES = (
    "bm25",               # name/alias BM25 score divided by the best score for this mention
    "bm25_rrank",         # 1 / (1 + rank) in the BM25 list, 0 when BM25 did not retrieve it
    "dense_rrank",        # 1 / (1 + rank) in the dense list, 0 when dense did not retrieve it
    "cos_context",        # frozen-encoder cosine: "mention [SEP] sentence" vs "name. description"
    "cos_mention",        # frozen-encoder cosine: the mention alone vs "name. description"
    "name_exact",         # the mention is the entity's name (normalised)
    "alias_exact",        # the mention is one of its aliases
    "mention_in_name",    # share of mention tokens found among the name/alias tokens
    "name_in_mention",    # share of name tokens found in the mention
    "name_in_caption",    # share of name tokens found anywhere in the caption
    "last_token",         # mention and name end with the same token (surnames)
    "first_token",        # ... start with the same token
    "char_sim",           # Dice overlap of the character trigrams of the normalised mention and name
    "has_birth",          # the description gives a birth year
    "caption_year",       # the caption holds a year
    "before_birth",       # a caption year lies before the birth year
    "age",                # (caption year - birth year) / 100, clipped to [-1, 1.5]
    "after_death",        # every caption year is more than 5 years after the death year
    "sex_agree",          # the caption's gendered words agree with "Sex: ..."
    "sex_disagree",       # ... contradict it
    "desc_overlap",       # share of caption content words found in the description
    "desc_len",           # log length of the description (richer KB entries), / 8
)
N_PAIR_FEATURES = len(PAIR_FEATURES)

_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})s?\b")
_BIRTH = re.compile(r"Birth:\s*(-?\d{1,4})")
_DEATH = re.compile(r"Death:\s*(-?\d{1,4})")
_SEX = re.compile(r"Sex:\s*(male|female)", re.I)
_FEMALE = {"she", "her", "hers", "herself", "actress", "woman", "women", "girl", "miss", "mrs", "ms", "queen",
           "princess", "duchess", "countess", "lady", "wife", "mother", "daughter", "sister", "empress",
           "baroness", "dame", "madame"}
_MALE = {"he", "his", "him", "himself", "actor", "man", "men", "boy", "mr", "king", "prince", "duke", "count",
         "lord", "husband", "father", "son", "brother", "emperor", "baron", "sir", "earl"}
_STOP = {"the", "and", "for", "with", "from", "this", "that", "his", "her", "was", "were", "are", "has", "had",
         "its", "their", "into", "during", "after", "before", "at", "in", "on", "of", "to", "a", "an", "as", "by",
         "is", "be", "or", "photo", "photograph", "image", "picture", "left", "right", "circa", "ca"}


def tokens(text: str) -> list[str]:
    return normalize_name(text).split()


def trigrams(norm: str) -> frozenset[str]:
    padded = f" {norm} "
    return frozenset(padded[i:i + 3] for i in range(len(padded) - 2))


@dataclass
class MentionContext:
    """What the pair features need from the mention side, computed once per mention."""

    mention_norm: str
    mention_tokens: list[str]
    mention_trigrams: frozenset[str]
    caption_tokens: set[str]
    content_words: set[str]
    years: list[int]
    sex_hint: str  # "male", "female" or ""

    @classmethod
    def of(cls, mention_text: str, caption: str) -> "MentionContext":
        caption_tokens = tokens(caption)
        mention_tokens = tokens(mention_text)
        words = set(caption_tokens)
        content = {w for w in words - set(mention_tokens) - _STOP if len(w) > 2 and not w.isdigit()}
        female, male = len(words & _FEMALE), len(words & _MALE)
        sex = "female" if female > male else "male" if male > female else ""
        years = [int(y) for y in _YEAR.findall(caption)]
        norm = " ".join(mention_tokens)
        return cls(norm, mention_tokens, trigrams(norm), words, content, years, sex)


@dataclass
class EntityFacts:
    """What the pair features need from an entity, parsed once (the linker caches these)."""

    name_norm: str
    name_tokens: list[str]
    name_trigrams: frozenset[str]
    alias_norms: set[str]
    all_name_tokens: set[str]
    description_words: set[str]
    birth: int | None
    death: int | None
    sex: str
    desc_len: float
    name_numbers: frozenset[tuple[str, int]] = frozenset()  # (word, number) of the name and aliases (name_numbers)

    @classmethod
    def of(cls, entity: Entity) -> "EntityFacts":
        name_tokens = tokens(entity.name)
        alias_norms = {normalize_name(a) for a in entity.aliases} - {""}
        all_tokens = set(name_tokens)
        for alias in alias_norms:
            all_tokens.update(alias.split())
        desc = entity.description or ""
        birth, death, sex = _BIRTH.search(desc), _DEATH.search(desc), _SEX.search(desc)
        norm = " ".join(name_tokens)
        numbers = frozenset().union(*(numbered_words(n) for n in (entity.name, *entity.aliases) if n))
        return cls(norm, name_tokens, trigrams(norm), alias_norms, all_tokens, set(tokens(desc)),
                   int(birth.group(1)) if birth else None, int(death.group(1)) if death else None,
                   sex.group(1).lower() if sex else "", math.log1p(len(desc)) / 8.0, numbers)


def pair_features(m: MentionContext, e: EntityFacts, *, bm25: float = 0.0, bm25_rank: int | None = None,
                  dense_rank: int | None = None, cos_context: float = 0.0, cos_mention: float = 0.0) -> list[float]:
    """One row of PAIR_FEATURES (same order). Ranks are 0-based; None = not retrieved by that source."""
    mt = m.mention_tokens
    mention_in_name = sum(t in e.all_name_tokens for t in mt) / len(mt) if mt else 0.0
    name_in_mention = sum(t in mt for t in e.name_tokens) / len(e.name_tokens) if e.name_tokens else 0.0
    name_in_caption = (sum(t in m.caption_tokens for t in e.name_tokens) / len(e.name_tokens)
                       if e.name_tokens else 0.0)
    last = float(bool(mt and e.name_tokens and mt[-1] == e.name_tokens[-1]))
    first = float(bool(mt and e.name_tokens and mt[0] == e.name_tokens[0]))
    a, b = m.mention_trigrams, e.name_trigrams
    char_sim = 2 * len(a & b) / (len(a) + len(b)) if a and b else 0.0

    has_birth = float(e.birth is not None)
    before_birth = age = after_death = 0.0
    if m.years and e.birth is not None:
        before_birth = float(min(m.years) < e.birth - 1)
        age = min(max((min(m.years) - e.birth) / 100.0, -1.0), 1.5)
    if m.years and e.death is not None:
        after_death = float(min(m.years) > e.death + 5)
    sex_agree = float(bool(m.sex_hint and e.sex and m.sex_hint == e.sex))
    sex_disagree = float(bool(m.sex_hint and e.sex and m.sex_hint != e.sex))
    overlap = len(m.content_words & e.description_words) / len(m.content_words) if m.content_words else 0.0
    return [
        bm25, 1.0 / (1 + bm25_rank) if bm25_rank is not None else 0.0,
        1.0 / (1 + dense_rank) if dense_rank is not None else 0.0,
        cos_context, cos_mention,
        float(m.mention_norm == e.name_norm), float(m.mention_norm in e.alias_norms),
        mention_in_name, name_in_mention, name_in_caption, last, first, char_sim,
        has_birth, float(bool(m.years)), before_birth, age, after_death, sex_agree, sex_disagree,
        overlap, e.desc_len,
    ]


# -- visual pair features (beyond the paper): what the photo says about a candidate ---------------
# Kept apart from PAIR_FEATURES so that heads trained before them load unchanged: a head lists the
# groups it uses in `FusionConfig.visual_feature_names`, and each group has its own mask (False when
# the photo, its faces or the entity's attribute is missing; the head then adds exactly 0).
VISUAL_FEATURES = (
    "image_text_cos",   # ConSE image vector . entity text vector (same text space)
    "image_text_rel",   # ... minus the best of this mention's candidates (0 for the best)
    "face_sex_match",   # 2 p - 1, p = the highest apparent probability, over the photo's faces, of the entity's Sex
    "face_age_gap",     # min over faces and caption years |apparent age - (year - birth year)| / 50, clipped to 1.5
    "face_sim",         # 0.6 - the smallest dlib distance between the photo's faces and the entity image's faces
)
VISUAL_GROUPS = {
    "image_text": ("image_text_cos", "image_text_rel"),   # needs the image (use_image)
    "face_sex": ("face_sex_match",),                      # needs a face with apparent gender (use_cue) and Sex:
    "face_age": ("face_age_gap",),                        # needs a face with apparent age (use_cue), Birth: and a caption year
    "face_sim": ("face_sim",),                            # needs faces in the photo (use_image) and in the entity image
}
N_VISUAL_FEATURES = len(VISUAL_FEATURES)
FACE_SAME_PERSON = 0.6  # dlib's usual threshold; used only to centre the feature


def visual_columns(group: str) -> list[int]:
    return [VISUAL_FEATURES.index(name) for name in VISUAL_GROUPS[group]]


def face_sex_match(faces: list[dict], sex: str) -> float | None:
    """2 p - 1 where p is the highest apparent probability of `sex` among the faces; None if unknown."""
    probs = []
    for f in faces:
        g, p = f.get("gender"), f.get("gender_probability")
        if g in ("male", "female") and p is not None and sex in ("male", "female"):
            probs.append(float(p) if g == sex else 1.0 - float(p))
    return 2.0 * max(probs) - 1.0 if probs else None


def face_age_gap(faces: list[dict], years: list[int], birth: int | None) -> float | None:
    """The smallest |apparent age - (caption year - birth year)| / 50 over faces and years; None if unknown."""
    ages = [float(f["age"]) for f in faces if f.get("age") is not None]
    if not ages or birth is None or not years:
        return None
    gap = min(abs(a - (y - birth)) for a in ages for y in years)
    return min(gap / 50.0, 1.5)
