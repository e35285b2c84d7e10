"""N-pair loss (Sohn, NeurIPS 2016), the loss DIM trains with.

For an anchor (the mention) with score s+ for its gold entity and s_i for N negatives:

    L = log(1 + sum_i exp(s_i - s+))  =  cross-entropy with the gold in slot 0

Two sources of negatives are combined by the trainer:
  in-batch  the other mentions' gold entities (cheap, random: teaches the embedding space);
  hard      KB neighbours of the gold (FTS/BM25 over names and aliases, and the candidates the
            generator proposes for the mention), i.e. the entities the linker must tell apart at
            test time. `mel.dim.candidates.hard_negatives` mines them; the gold is never among them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def n_pair_loss(positive: torch.Tensor, negatives: torch.Tensor, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """positive (b,), negatives (b, n) scores; negative_mask (b, n) bool, False for padding slots.

    A row whose negatives are all padding contributes log(1) = 0.
    """
    if negatives.dim() != 2 or positive.shape != negatives.shape[:1]:
        raise ValueError(f"expected positive (b,) and negatives (b, n); got {tuple(positive.shape)} "
                         f"and {tuple(negatives.shape)}")
    if negative_mask is not None:
        negatives = negatives.masked_fill(~negative_mask.bool(), float("-inf"))
    logits = torch.cat([positive[:, None], negatives], dim=1)
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def in_batch_n_pair_loss(scores: torch.Tensor, gold_ids: torch.Tensor) -> torch.Tensor:
    """scores (b, b): mention i against gold entity j; the diagonal holds the positives.

    Two mentions of the same entity in one batch are not negatives of each other: those
    off-diagonal slots are masked (`gold_ids` (b,) KB rows).
    """
    b = scores.shape[0]
    if scores.shape != (b, b) or gold_ids.shape != (b,):
        raise ValueError(f"expected scores (b, b) and gold_ids (b,); got {tuple(scores.shape)}, {tuple(gold_ids.shape)}")
    positive = scores.diagonal()
    same = gold_ids[:, None] == gold_ids[None, :]  # includes the diagonal
    off_diag = ~torch.eye(b, dtype=torch.bool, device=scores.device)
    negatives = scores.masked_select(off_diag).view(b, b - 1)
    mask = (~same).masked_select(off_diag).view(b, b - 1)
    return n_pair_loss(positive, negatives, mask)


def candidate_n_pair_loss(scores: torch.Tensor, gold_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """scores (b, c) over a candidate list, gold at column gold_pos (b,), valid (b, c) bool.

    Every other valid candidate is a (hard) negative. Rows whose gold is missing (gold_pos < 0)
    are skipped; the trainer inserts the gold, so that only happens with odd data.
    """
    keep = gold_pos >= 0
    if not bool(keep.any()):
        return scores.sum() * 0.0  # keeps the graph; nothing to learn from this batch
    scores, gold_pos, valid = scores[keep], gold_pos[keep], valid[keep]
    rows = torch.arange(len(scores), device=scores.device)
    positive = scores[rows, gold_pos]
    negative_mask = valid.clone()
    negative_mask[rows, gold_pos] = False
    return n_pair_loss(positive, scores, negative_mask)
