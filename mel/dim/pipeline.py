"""The steps the linker and the trainer share: candidate pools -> padded candidate tensors with
pair features, and the fusion head's scores for them.

Keeping these in one place means training sees exactly what inference sees.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..types import Mention
from .candidates import CandidatePool
from .features import FeatureExtractor, MentionFeatures
from .pairs import N_PAIR_FEATURES, EntityFacts, MentionContext, pair_features


@dataclass
class CandidateBatch:
    idxs: np.ndarray    # (b, c) int64 KB rows, -1 = padding
    valid: np.ndarray   # (b, c) bool
    pair: np.ndarray    # (b, c, N_PAIR_FEATURES) float32

    @property
    def width(self) -> int:
        return self.idxs.shape[1]


class EntityFactsCache:
    """Parsed EntityFacts by KB row; bounded so a 1M-entity KB cannot fill the memory."""

    def __init__(self, kb, max_size: int = 200_000):
        self.kb, self.max_size = kb, max_size
        self._facts: OrderedDict[int, EntityFacts] = OrderedDict()

    def get_many(self, idxs: Sequence[int]) -> dict[int, EntityFacts]:
        missing = sorted({int(i) for i in idxs if int(i) not in self._facts})
        if missing:
            for idx, entity in zip(missing, self.kb.entities_at(missing), strict=True):
                self._facts[idx] = EntityFacts.of(entity)
            while len(self._facts) > self.max_size:
                self._facts.popitem(last=False)
        return {int(i): self._facts[int(i)] for i in idxs}


def candidate_batch(mentions: Sequence[Mention], feats: MentionFeatures, pools: Sequence[Sequence[int] | CandidatePool],
                    extractor: FeatureExtractor, facts: EntityFactsCache, width: int | None = None) -> CandidateBatch:
    """Pad the pools to one width and compute every pair's features.

    A pool is a CandidatePool (KB rows + what BM25 and dense retrieval said about them) or a
    plain list of KB rows, whose retrieval features are then zero.
    """
    idx_lists = [list(p.idxs) if isinstance(p, CandidatePool) else [int(i) for i in p] for p in pools]
    c = width or max((len(p) for p in idx_lists), default=0)
    c = max(c, 1)
    b = len(mentions)
    idxs = np.full((b, c), -1, np.int64)
    valid = np.zeros((b, c), bool)
    pair = np.zeros((b, c, N_PAIR_FEATURES), np.float32)
    all_idxs = sorted({i for p in idx_lists for i in p[:c]})
    if not all_idxs:
        return CandidateBatch(idxs, valid, pair)
    facts_by_idx = facts.get_many(all_idxs)
    text = extractor.entity_text_features(all_idxs)
    row_of = {idx: row for row, idx in enumerate(all_idxs)}
    for i, (mention, idx_list, pool) in enumerate(zip(mentions, idx_lists, pools, strict=True)):
        idx_list = idx_list[:c]
        if not idx_list:
            continue
        rows = [row_of[idx] for idx in idx_list]
        cos_context = text[rows] @ feats.context[i]
        cos_mention = text[rows] @ feats.mention[i]
        ctx = MentionContext.of(mention.text, mention.caption)
        bm25 = pool.bm25 if isinstance(pool, CandidatePool) else {}
        dense = pool.dense if isinstance(pool, CandidatePool) else {}
        for j, idx in enumerate(idx_list):
            bm25_score, bm25_rank = bm25.get(idx, (0.0, None))
            dense_rank = dense[idx][1] if idx in dense else None
            pair[i, j] = pair_features(ctx, facts_by_idx[idx], bm25=bm25_score, bm25_rank=bm25_rank,
                                       dense_rank=dense_rank, cos_context=float(cos_context[j]),
                                       cos_mention=float(cos_mention[j]))
        idxs[i, :len(idx_list)] = idx_list
        valid[i, :len(idx_list)] = True
    return CandidateBatch(idxs, valid, pair)


def score(model, mention_tensors: dict, entity_text: torch.Tensor, entity_image: torch.Tensor,
          entity_image_mask: torch.Tensor, pair: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fusion-head scores (b, c) with -inf on padding, plus the two embeddings.

    entity_text (b, c, dt), entity_image (b, c, di), entity_image_mask / valid (b, c) bool,
    pair (b, c, f).
    """
    b, c = valid.shape
    m = model.encode_mentions(**mention_tensors)
    e = model.encode_entities(entity_text.reshape(b * c, -1), entity_image.reshape(b * c, -1),
                              entity_image_mask.reshape(b * c)).view(b, c, -1)
    scores = model.score_candidates(m, e, pair if model.pair_mlp is not None else None)
    return scores.masked_fill(~valid, float("-inf")), m, e
