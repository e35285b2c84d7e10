"""Three baselines every other linker must beat.

exact  the mention equals an entity's name or alias (normalised). Ties are broken without
       popularity: name matches before alias matches, then the entity whose description shares
       the most words with the caption, then a fixed hash of the id. (Ordering by QID would
       favour old, popular Wikidata items: the popularity bias GEMEL's paper criticises.)
bm25   FTS5 BM25 of the mention words over names (x10), aliases (x5) and descriptions (x1).
dense  nearest entities by cosine of text embeddings ("name. description" vs the query).
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator

from ..types import ExactDetails, LinkDetails, LinkResult, Mention
from .base import BatchLinker, Linker, Stopwatch, check_k, check_mention


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.casefold()) if len(w) > 2}


def stable_hash(entity_id: str) -> str:
    return hashlib.sha1(entity_id.encode("utf-8")).hexdigest()


class ExactLinker(Linker):
    name = "exact"

    def _link(self, mention: Mention, k: int) -> LinkResult:
        check_mention(mention)
        check_k(k)
        sw = Stopwatch()
        with sw("lookup"):
            matches = self.kb.lookup_name(mention.text)
            entities = self.kb.entities_at([idx for idx, _ in matches])
            context = _words(mention.caption) - _words(mention.text)
            keyed = []
            for (idx, kind), entity in zip(matches, entities, strict=True):
                overlap = len(context & _words(entity.description))
                keyed.append(((kind != "name", -overlap, stable_hash(entity.id)), idx, overlap, kind))
            keyed.sort()
            # score: 1 for a name match, 0.5 for an alias, plus a small context bonus
            ranked = [(idx, (1.0 if kind == "name" else 0.5) + 0.01 * overlap) for _, idx, overlap, kind in keyed[:k]]
        return self.result(mention, ranked, source="exact", timings=sw.total(),
                           details=ExactDetails(n_exact_matches=len(matches)))


class BM25Linker(Linker):
    name = "bm25"

    def _link(self, mention: Mention, k: int) -> LinkResult:
        check_mention(mention)  # k is checked by kb.search_bm25
        sw = Stopwatch()
        with sw("fts5"):
            ranked = self.kb.search_bm25(mention.text, k=k)
        return self.result(mention, ranked, source="bm25", timings=sw.total())


class DenseLinker(BatchLinker):
    """`query="mention"` embeds the mention string; `"mention+caption"` adds the caption."""

    name = "dense"

    def __init__(self, kb, preset, query: str = "mention"):
        super().__init__(kb, preset)
        if query not in ("mention", "mention+caption"):
            raise ValueError("query must be 'mention' or 'mention+caption'")
        self.query = query
        _, meta = kb.dense("text")
        self.spec = preset.text_encoder
        built_with = meta.get("encoder")
        self.encoder = preset.backend("text_encoder")
        if built_with and built_with != self.encoder.name:
            from ..errors import KBError
            raise KBError(f"{kb.path.name} was embedded with {built_with!r} but preset {preset.name!r} uses "
                          f"{self.encoder.name!r}; rebuild the KB with this preset or pick the KB's preset")

    def models(self):
        return {"text_encoder": self.spec}

    def query_text(self, mention: Mention) -> str:
        return mention.text if self.query == "mention" else f"{mention.text}. {mention.caption}"


    def _link_batch(self, mentions: list[Mention], k: int) -> Iterator[LinkResult]:
        t0 = time.perf_counter()
        vectors = self.encoder.encode([self.query_text(m) for m in mentions])
        t1 = time.perf_counter()
        scores, ids = self.kb.search_dense(vectors, k=k)
        t2 = time.perf_counter()
        n = len(mentions)  # batch cost is shared evenly: per-mention latency is amortised
        timings = {"encode": (t1 - t0) * 1000 / n, "search": (t2 - t1) * 1000 / n, "total": (t2 - t0) * 1000 / n}
        for mention, row_scores, row_ids in zip(mentions, scores, ids, strict=True):
            found = [(i, s) for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
                     if i >= 0]  # -1: padding
            yield self.result(mention, found, source="dense",
                              timings=dict(timings), details=LinkDetails(batch_size=n))
