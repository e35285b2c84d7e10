"""Link-prior pair features (issue #15): what a dataset's TRAIN annotations say about a (mention, entity) pair.

The classic entity-linking prior (p(e|m) and popularity from annotated links, as anchor statistics from
Wikipedia are used), counted by `python -m mel kb prior` into the KB (`mel.kb.build_link_prior`):

    prior_pair     log1p(count(m, e))        how often this mention string was linked to this entity
    prior_pem      count(m, e) / count(m)    p(e | m), 0 when the string was never linked
    prior_entity   log1p(count(e))           how often the entity was linked at all (popularity)

m is `mel.kb.link_prior_key(mention text)`. A head lists the features it uses in `FusionConfig.prior_feature_names`
(a linear term, `DimFusion.prior_scores`); the mask is False for every candidate when the KB has no link prior,
and the head then adds exactly 0, so a KB without the table (the demo KB, a user KB) scores as before.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..kb import link_prior_key

PRIOR_FEATURES = ("prior_pair", "prior_pem", "prior_entity")
N_PRIOR_FEATURES = len(PRIOR_FEATURES)


def prior_columns(names: Sequence[str]) -> list[int]:
    return [PRIOR_FEATURES.index(n) for n in names]


def prior_values(pair_counts: Mapping[int, int], entity_counts: Callable[[int], int], idxs: Sequence[int]) -> np.ndarray:
    """(len(idxs), N_PRIOR_FEATURES) for one mention: `pair_counts` {idx: count(m, idx)} of its string,
    `entity_counts(idx)` = count(idx)."""
    total = sum(pair_counts.values())
    out = np.zeros((len(idxs), N_PRIOR_FEATURES), np.float32)
    for j, idx in enumerate(idxs):
        c = pair_counts.get(int(idx), 0)
        out[j] = (math.log1p(c), c / total if total else 0.0, math.log1p(max(entity_counts(int(idx)), 0)))
    return out


def prior_pair_features(kb, mention_texts: Sequence[str], idxs: np.ndarray, valid: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(b, c, N_PRIOR_FEATURES) values and (b, c) bool mask for padded candidate rows (-1 = padding), read from
    the KB's link prior; everything masked (and zero) when the KB has none."""
    b, c = idxs.shape
    values = np.zeros((b, c, N_PRIOR_FEATURES), np.float32)
    mask = np.zeros((b, c), bool)
    if not kb.has_link_prior():
        return values, mask
    keys = [link_prior_key(t) for t in mention_texts]
    counts = kb.link_prior_counts(keys)
    entity = kb.link_prior_entity_counts()
    for i, key in enumerate(keys):
        n = int(valid[i].sum())
        if n:
            values[i, :n] = prior_values(counts.get(key, {}), lambda x: entity.get(x, 0), idxs[i, :n])
            mask[i, :n] = True
    return values, mask
