"""Candidate generation for the whole-KB protocol, hard-negative mining, and DIM's candidate lists.

Whole-KB protocol (MIMIC, KDD 2023; what `mel eval` reports): the re-ranker only sees what the
generator proposes, so a gold the generator misses is a miss. The generator is

    FTS5 BM25 over entity names and aliases (top n_bm25)  UNION  dense top n_dense

and `candidate_recall` reports how often the gold is in the pool, separately from Hits@k.

Candidate-list protocol (the DIM code's): each mention comes with a fixed list of N candidates
that contains the gold. `candidate_lists` builds such lists (gold + the generator's N-1 best
non-gold entities, shuffled with a fixed seed) so the two protocols can be compared; numbers
on it are inflated by construction and must be labelled as such.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, require_whole
from ..kb import BM25_WEIGHTS
from ..paths import atomic_write

# the FTS5 columns the name search may match (descriptions are left out on purpose: a surname
# that occurs in someone else's "Spouse: ..." is not a name match)
NAME_COLUMNS = "{name aliases_text}"


MAX_POOL = 10_000  # candidates one source may propose per mention (DIM: 100); more only costs memory


def pool_size(label: str, value) -> int:
    """`value` if it is a whole number of candidates in [0, MAX_POOL] (0: that source is off), else an
    InputError naming `label`."""
    require_whole(label, value, 0)
    if value > MAX_POOL:
        raise InputError(f"{label} must be at most {MAX_POOL:,} candidates, got {value!r}")
    return value


@dataclass
class CandidateConfig:
    n_bm25: int = 64     # BM25 over names/aliases
    n_dense: int = 64    # dense top-k with the "mention [SEP] sentence" embedding
    n_dense_mention: int = 16  # dense top-k with the mention-alone embedding (short surnames)

    def __post_init__(self):
        for name in ("n_bm25", "n_dense", "n_dense_mention"):
            pool_size(f"candidates.{name}", getattr(self, name))


@dataclass
class CandidatePool:
    """The candidates of one mention, in first-seen order, with what each source said."""

    idxs: list[int] = field(default_factory=list)
    bm25: dict[int, tuple[float, int]] = field(default_factory=dict)   # idx -> (normalised score, rank)
    dense: dict[int, tuple[float, int]] = field(default_factory=dict)  # idx -> (cosine, rank)

    def __post_init__(self):
        self._seen: set[int] = set(self.idxs)

    def add(self, idx: int) -> None:
        if idx not in self._seen:
            self._seen.add(idx)
            self.idxs.append(idx)

    def sources(self, idx: int) -> list[str]:
        return [name for name, table in (("bm25", self.bm25), ("dense", self.dense)) if idx in table]


def fts_name_query(text: str) -> str:
    """FTS5 expression: any word of `text`, matched in the name or alias columns only."""
    words = re.findall(r"\w+", text)
    if not words:
        return ""
    return NAME_COLUMNS + " : (" + " OR ".join('"' + w.replace('"', '""') + '"' for w in words) + ")"


def bm25_names(kb, query: str, k: int) -> list[tuple[int, float]]:
    """BM25 over names and aliases: [(idx, score)], higher is better."""
    match = fts_name_query(query)
    if not match or k <= 0:
        return []
    weights = ", ".join(str(w) for w in BM25_WEIGHTS)
    rows = kb.db.execute(f"SELECT rowid, bm25(entities_fts, {weights}) FROM entities_fts WHERE entities_fts MATCH ? "
                         f"ORDER BY bm25(entities_fts, {weights}) LIMIT ?", (match, int(k))).fetchall()
    return [(int(idx), -float(score)) for idx, score in rows]  # FTS5's bm25 is lower-is-better


class CandidateGenerator:
    def __init__(self, kb, config: CandidateConfig | None = None):
        self.kb = kb
        self.config = config or CandidateConfig()

    def generate(self, mention_texts: Sequence[str], context_vectors: np.ndarray | None,
                 mention_vectors: np.ndarray | None = None) -> list[CandidatePool]:
        """One pool per mention. The vectors are the frozen text encoder's (n, d) embeddings in the
        KB's text space; None skips dense retrieval (a KB built without embeddings)."""
        c = self.config
        pools = [CandidatePool() for _ in mention_texts]
        for pool, text in zip(pools, mention_texts, strict=True):
            hits = bm25_names(self.kb, text, c.n_bm25)
            best = max((s for _, s in hits), default=1.0) or 1.0
            for rank, (idx, score) in enumerate(hits):
                pool.bm25[idx] = (score / best, rank)
                pool.add(idx)
        queries = []  # (vectors, k): both searched with one matrix product
        if context_vectors is not None and c.n_dense > 0:
            queries.append((np.asarray(context_vectors, np.float32), c.n_dense))
        if mention_vectors is not None and c.n_dense_mention > 0:
            queries.append((np.asarray(mention_vectors, np.float32), c.n_dense_mention))
        dense_lists = []
        if queries and self.kb.has_dense("text"):
            scores, ids = self.kb.search_dense(np.concatenate([q for q, _ in queries]), k=max(k for _, k in queries))
            start = 0
            for q, k in queries:
                dense_lists.append((scores[start:start + len(q), :k], ids[start:start + len(q), :k]))
                start += len(q)
        for scores, ids in dense_lists:
            for pool, row_scores, row_ids in zip(pools, scores, ids, strict=True):
                for rank, (idx, score) in enumerate(zip(row_ids.tolist(), row_scores.tolist(), strict=True)):
                    if idx < 0:
                        continue  # an approximate engine found fewer rows (padding)
                    if idx not in pool.dense:  # the context list comes first and keeps its rank
                        pool.dense[idx] = (float(score), rank)
                    pool.add(idx)
        return pools


def candidate_recall(pools: Sequence[Sequence[int]], gold_idxs: Sequence[int | None],
                     ks: Sequence[int] = (10, 20, 50, 100)) -> dict:
    """Share of mentions whose gold is among the first k candidates of their pool (and anywhere)."""
    n = len(pools)
    out = {"n": n}
    for k in ks:
        out[f"recall@{k}"] = round(sum(1 for p, g in zip(pools, gold_idxs, strict=True)
                                      if g is not None and g in list(p)[:k]) / n, 4) if n else 0.0
    out["recall@pool"] = round(sum(1 for p, g in zip(pools, gold_idxs, strict=True)
                                   if g is not None and g in p) / n, 4) if n else 0.0
    out["mean_pool_size"] = round(float(np.mean([len(p) for p in pools])), 1) if n else 0.0
    return out


def fts_neighbours(kb, idx: int, k: int) -> list[int]:
    """Entities whose names share words with entity `idx`'s name (BM25 over names/aliases), best first."""
    name = kb.entity_at(idx).name
    return [i for i, _ in bm25_names(kb, name, k + 1) if i != idx][:k]


def hard_negatives(kb, gold_idx: int, k: int, mention_text: str | None = None,
                   pool: Sequence[int] | None = None) -> list[int]:
    """Up to k hard negatives for a training mention, never the gold: the FTS neighbours of the
    gold's name first, then BM25 hits for the mention text, then the generator's pool."""
    seen, out = {gold_idx}, []
    sources = [fts_neighbours(kb, gold_idx, k)]
    if mention_text:
        sources.append([i for i, _ in bm25_names(kb, mention_text, k + 1)])
    if pool is not None:
        sources.append(list(pool))
    for source in sources:
        for idx in source:
            if idx not in seen:
                seen.add(idx)
                out.append(idx)
            if len(out) == k:
                return out
    return out


# -- DIM's candidate-list protocol ------------------------------------------------------------------
def candidate_lists(mention_ids: Sequence[str], gold_ids: Sequence[str], pools: Sequence[Sequence[int]], kb,
                    size: int = 100, seed: int = 0) -> dict[str, list[str]]:
    """mention id -> `size` entity ids that include the gold (when it is in the KB), shuffled.

    The gold is put in by construction: Hits@k on these lists is NOT comparable with the
    whole-KB protocol (that is the point of reporting both)."""
    require_whole("the candidate list size", size, 1)
    check_mention_ids(mention_ids)
    rng = random.Random(seed)
    out = {}
    for mid, gold, pool in zip(mention_ids, gold_ids, pools, strict=True):
        gold_idx = kb.idx_of(gold)
        chosen = [gold_idx] if gold_idx is not None else []
        chosen += [i for i in pool if i != gold_idx][: size - len(chosen)]
        if len(chosen) < size:  # a short pool: pad with random KB entities
            extra = [i for i in rng.sample(range(kb.size), min(kb.size, 2 * size)) if i not in chosen]
            chosen += extra[: size - len(chosen)]
        ids = [e.id for e in kb.entities_at(chosen)]
        rng.shuffle(ids)
        out[str(mid)] = ids
    return out


def check_mention_ids(mention_ids: Sequence[str | None]) -> None:
    """The candidate-list protocol looks each mention's list up by its mention id (DimLinker,
    `Mention.id`): every mention needs one, and no two the same (one list would stand for both)."""
    missing = sum(1 for mid in mention_ids if mid is None or str(mid) == "")
    if missing:
        raise InputError(f"{missing} of {len(mention_ids)} mentions have no mention id; the candidate-list protocol "
                         f"finds each mention's list by its id: give every mention an \"id\" (or use the whole-KB "
                         f"protocol)")
    twice = sorted(mid for mid, n in Counter(map(str, mention_ids)).items() if n > 1)
    if twice:
        raise InputError(f"{len(twice)} mention ids occur more than once ({', '.join(map(repr, twice[:3]))}"
                         f"{'...' if len(twice) > 3 else ''}); the candidate-list protocol needs one list per mention: "
                         f"give every mention its own id")


def protocol_lists(kb, examples, preset, size: int = 100, seed: int = 0) -> tuple[dict[str, list[str]], list[list[int]]]:
    """The candidate-list protocol's lists for `examples` (and the pools they came from): the gold plus
    the best non-gold entities of a generator with BM25 and dense top-`size` (hard negatives)."""
    from .features import FeatureExtractor
    require_whole("the candidate list size", size, 1)
    pool_size("the candidate list size", size)
    check_mention_ids([ex.mention.id for ex in examples])
    extractor = FeatureExtractor(kb, preset, use_image=False, use_cue=False)
    generator = CandidateGenerator(kb, CandidateConfig(n_bm25=size, n_dense=size))
    pools = []
    for start in range(0, len(examples), 256):
        chunk = [ex.mention for ex in examples[start:start + 256]]
        feats = extractor.mention_features(chunk)
        pools += [p.idxs for p in generator.generate([m.text for m in chunk], feats.context, feats.mention)]
    lists = candidate_lists([ex.mention.id for ex in examples], [ex.gold_id for ex in examples], pools, kb,
                            size=size, seed=seed)
    return lists, pools


def save_candidate_lists(lists: dict[str, list[str]], path: str | Path) -> None:
    """Write the lists as JSONL, atomically: `path` holds all of them or its earlier content, never a part."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for mid, ids in lists.items():
            f.write(json.dumps({"id": mid, "candidates": ids}, ensure_ascii=False) + "\n")


def load_candidate_lists(path: str | Path) -> dict[str, list[str]]:
    """A JSONL file of {"id": mention id, "candidates": [entity ids]} (DIM's protocol)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"candidate-list file {path} does not exist; write one with "
                         f"`python -m mel dim candidates --format ... --out {path.name}`")
    if not path.is_file():
        raise InputError(f"candidate-list file {path} is a directory, not a file; give candidate_file= the JSONL "
                         f"file `python -m mel dim candidates --out FILE` wrote")
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row["candidates"], list):
                        raise TypeError("candidates is not a list")
                    out[str(row["id"])] = [str(c) for c in row["candidates"]]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}, line {line_no}: expected {{\"id\": ..., \"candidates\": [...]}} "
                                     f"({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the candidate-list file {path} ({type(exc).__name__}: {exc}); write it again "
                         f"with `python -m mel dim candidates`") from exc
    return out


# -- `python -m mel dim candidates`: write DIM-protocol candidate lists for a dataset split ---------
def add_parser(subparsers) -> None:
    """`python -m mel dim ...` (registered in mel.cli.COMMANDS)."""
    dim = subparsers.add_parser("dim", help="DIM's tools: candidate lists for its candidate-list protocol")
    commands = dim.add_subparsers(dest="dim_command", required=True)
    add_arguments(commands.add_parser("candidates", help=CANDIDATES_HELP, description=CANDIDATES_HELP))


CANDIDATES_HELP = ("write DIM's candidate-list protocol file (gold + the generator's best non-gold entities per "
                   "mention) and print the generator's recall")


def add_arguments(p) -> None:
    from ..cli_kit import add_preset_args
    p.add_argument("--format", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--kb", required=True)
    add_preset_args(p)
    p.add_argument("--size", type=int, default=100, help="candidates per list, >= 1 (DIM: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..cli_kit import check_output_file, resolve_preset
    from ..datasets import load_dataset
    from ..kb import KnowledgeBase
    require_whole("--size", args.size, 1)
    pool_size("--size", args.size)
    check_output_file(args.out)
    kb = KnowledgeBase(args.kb)
    examples = load_dataset(args.format, args.data, args.split, unlocated="context").examples  # one list per mention `mel eval` counts
    lists, pools = protocol_lists(kb, examples, resolve_preset(args), size=args.size, seed=args.seed)
    save_candidate_lists(lists, args.out)
    recall = candidate_recall(pools, [kb.idx_of(ex.gold_id) for ex in examples])
    print(f"wrote {len(lists)} candidate lists of {args.size} to {args.out}; generator recall: {recall}")


def main(argv=None) -> int:
    """`python -m mel.dim.candidates ...`, the older name of `python -m mel dim candidates ...`."""
    import argparse

    from ..cli_kit import run_command
    parser = argparse.ArgumentParser(prog="python -m mel.dim.candidates", description=CANDIDATES_HELP)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
