"""Fit the link-prior term of a DIM head with its base FROZEN (issue #15: a head with no memory of which entities
a dataset links to).

    python -m mel kb prior --kb data/wikimel.sqlite --format wikimel --data ../shared/data/wikimel   # per dataset
    python -m mel train dim-prior --base models/dim-offline --format wikimel,richpedia,wikidiverse \
        --data DIR1,DIR2,DIR3 --kb a.sqlite,b.sqlite,c.sqlite --out DIR

The head gets one linear term over link-prior features (`mel.dim.prior`: log1p count(m, e), p(e|m),
log1p count(e)); every other tensor is copied from `--base` unchanged (bit for bit; checked after saving), so
a mention whose KB has no link prior scores exactly as with the base head. The bias stays 0 (a constant per
mention changes no ranking).

Rows: the training records the base head HELD OUT (it never trained on them; `split_holdout` with the base's
recipe), with the base's scores of the candidate pool the linker sees (`train dim`'s cached features, same
cache key). Their prior is out-of-fold: the KB's table (counted on the whole train split) minus the record's
own annotations, i.e. counted on the other train records only, which is what dev sees (dev's prior comes from
all train records). Which features and the L2 strength are chosen by K-fold cross-validation over those
held-out records (folds by record, per dataset); the figures reported "cv" are out-of-fold. Dev is never read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..kb import count_link_prior, link_prior_key
from . import frozen_terms
from .frozen_terms import FrozenBaseTrainer, extended_head, fit_term, float_list, gold_figures
from .model import DimFusion
from .prior import N_PRIOR_FEATURES, PRIOR_FEATURES, prior_values


@dataclass
class PriorTrainConfig:
    """Every field is a flag of `python -m mel train dim-prior` (`l2` -> `--l2`)."""

    features: str = field(default="prior_pem;prior_pair,prior_pem;prior_pem,prior_entity;prior_pair,prior_pem,prior_entity",
                          metadata={"help": f"candidate feature sets, ';'-separated, each a comma-separated subset of "
                                            f"{list(PRIOR_FEATURES)} (chosen by cross-validation on held-out records)"})
    l2: str = field(default="0.01,0.1,1,10,100", metadata={
        "help": "candidate L2 strengths, > 0 (chosen): the loss is the SUMMED cross-entropy + l2 * |w|^2"})
    folds: int = field(default=5, metadata={"help": "cross-validation folds over the held-out records"})
    steps: int = field(default=200, metadata={"help": "L-BFGS iterations at most (the problem is convex)"})
    lr: float = 1.0
    seed: int = 42
    save_dtype: str = field(default="", metadata={
        "help": "float16 or float32; default: the base's own (its tensors are kept bit for bit)"})

    def __post_init__(self):
        self.feature_sets()
        self.l2_list()
        if int(self.folds) < 2 or int(self.steps) < 1 or not self.lr > 0 or self.save_dtype not in ("", "float16", "float32"):
            raise InputError("--folds must be >= 2, --steps >= 1, --lr > 0 and --save-dtype float16 or float32")

    def feature_sets(self) -> list[tuple[str, ...]]:
        sets = [tuple(f.strip() for f in s.split(",") if f.strip()) for s in str(self.features).split(";") if s.strip()]
        bad = [s for s in sets if not s or any(f not in PRIOR_FEATURES for f in s) or len(set(s)) < len(s)]
        if not sets or bad:
            raise InputError(f"--features: each set is a comma-separated subset of {list(PRIOR_FEATURES)}, sets "
                             f"separated by ';' (got {self.features!r})")
        return sets

    def l2_list(self) -> list[float]:
        return float_list(self.l2, "l2", 0.0, above=True, need="numbers > 0 (a prior on the weights)")


@dataclass
class PriorRows:
    base: torch.Tensor     # (n, w) the frozen head's scores, -inf on padding
    prior: torch.Tensor    # (n, w, N_PRIOR_FEATURES)
    mask: torch.Tensor     # (n, w) bool
    gold: torch.Tensor     # (n,) gold column, -1 when the gold is not in the pool (a miss, no gradient)
    records: list[str]     # record id of each row (folds are drawn by record)
    source: str = ""

    def __len__(self) -> int:
        return len(self.gold)

    def take(self, rows: np.ndarray) -> "PriorRows":
        idx = torch.from_numpy(np.asarray(rows, np.int64))
        return PriorRows(self.base[idx], self.prior[idx], self.mask[idx], self.gold[idx],
                         [self.records[i] for i in rows], self.source)


def record_of(example) -> str:
    return str(example.sample_id).split("#")[0]


class OutOfFoldPrior:
    """The KB's link prior minus the annotations of one record: what the other train records say."""

    def __init__(self, kb, train_examples):
        self.kb = kb
        pairs, report = count_link_prior(train_examples, kb)
        info = kb.link_prior_info() or {}
        if report["n_counted"] != info.get("n_counted") or report["n_pairs"] != info.get("n_pairs"):
            raise InputError(f"{kb.path.name}'s link prior ({info.get('dataset')}/{info.get('split')}: "
                             f"{info.get('n_counted')} counted, {info.get('n_pairs')} pairs) is not the count of these "
                             f"train examples ({report['n_counted']}, {report['n_pairs']}): rebuild it with "
                             f"`python -m mel kb prior` on the same data")
        idx_of = kb.idxs_of(ex.gold_id for ex in train_examples)
        self.own: dict[str, dict[tuple[str, int], int]] = {}
        for ex in train_examples:
            key, idx = link_prior_key(ex.mention.text), idx_of.get(ex.gold_id)
            if key and idx is not None:
                mine = self.own.setdefault(record_of(ex), {})
                mine[(key, idx)] = mine.get((key, idx), 0) + 1
        self.entity = kb.link_prior_entity_counts()

    def values(self, mention_text: str, record: str, idxs) -> np.ndarray:
        key = link_prior_key(mention_text)
        counts = dict(self.kb.link_prior_counts([key])[key])
        own = self.own.get(record, {})
        own_entity: dict[int, int] = {}
        for (k, idx), c in own.items():
            own_entity[idx] = own_entity.get(idx, 0) + c
            if k == key:
                counts[idx] = counts.get(idx, 0) - c
        if any(c < 0 for c in counts.values()):
            raise InputError(f"record {record}: its annotations are not in {self.kb.path.name}'s link prior; rebuild it")
        counts = {i: c for i, c in counts.items() if c > 0}
        return prior_values(counts, lambda i: self.entity.get(i, 0) - own_entity.get(i, 0), idxs)


# -- the head and the fit -------------------------------------------------------------------------------
def prior_head(base: DimFusion, names) -> DimFusion:
    """A head with a zero link-prior term over `names` and every other parameter copied from `base`, frozen."""
    return extended_head(base, "prior.", prior_feature_names=tuple(names))


def _scores(head: DimFusion | None, c: PriorRows) -> torch.Tensor:
    return c.base + (head.prior_scores(c.prior, c.mask) if head is not None else 0.0)


def fit_prior(head: DimFusion, chunks: list[PriorRows], l2: float, steps: int, lr: float = 1.0) -> DimFusion:
    """The prior weights only (bias 0), from zero: summed cross-entropy of the gold + l2 * |w|^2 (L-BFGS); the
    rows whose gold is not in the pool are left out."""
    fit = [c.take(np.flatnonzero(c.gold.numpy() >= 0)) for c in chunks if len(c)]

    def summed_loss() -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(_scores(head, c), c.gold, reduction="sum") for c in fit if len(c))

    return fit_term(head, summed_loss, sum(len(c) for c in fit), l2, steps, lr)


def evaluate(head: DimFusion | None, chunks: list[PriorRows]) -> dict:
    """Mean cross-entropy (rows whose gold is in the pool) and Hits@1 over EVERY row (a gold outside the pool
    is a miss), with the prior term (head) or without (None)."""
    return gold_figures((_scores(head, c), c.gold) for c in chunks if len(c))


def weights_of(head: DimFusion) -> dict:
    if head.prior is None:
        return {}
    w = head.prior.weight.detach().float().flatten()
    return {name: round(float(x), 4) for name, x in zip(head.config.prior_feature_names, w, strict=True)}


def fold_of(rows: PriorRows, k: int, seed: int) -> np.ndarray:
    """Fold of each row: the rows' records shuffled (seeded) and dealt round-robin, so a record is in one fold."""
    records = sorted(set(rows.records))
    order = np.random.default_rng(seed).permutation(len(records))
    fold = {records[j]: i % k for i, j in enumerate(order)}
    return np.array([fold[r] for r in rows.records], np.int64)


def cross_validate(base: DimFusion, chunks: list[PriorRows], names, l2: float, cfg: PriorTrainConfig) -> dict:
    """Out-of-fold figures: each fold scored by a head fitted on the other folds (pooled and per chunk)."""
    folds = [fold_of(c, cfg.folds, cfg.seed + k) for k, c in enumerate(chunks)]
    parts: list[list[PriorRows]] = [[] for _ in chunks]
    weights = []
    for f in range(cfg.folds):
        train = [c.take(np.flatnonzero(fd != f)) for c, fd in zip(chunks, folds, strict=True)]
        head = fit_prior(prior_head(base, names), train, l2, cfg.steps, cfg.lr)
        weights.append(weights_of(head))
        for k, (c, fd) in enumerate(zip(chunks, folds, strict=True)):
            test = c.take(np.flatnonzero(fd == f))
            with torch.no_grad():
                scored = PriorRows(_scores(head, test), test.prior, test.mask, test.gold, test.records, test.source)
            parts[k].append(scored)
    oof = [PriorRows(torch.cat([p.base for p in ps]), torch.cat([p.prior for p in ps]), torch.cat([p.mask for p in ps]),
                     torch.cat([p.gold for p in ps]), [r for p in ps for r in p.records], c.source)
           for ps, c in zip(parts, chunks, strict=True)]
    return {"cv": evaluate(None, oof), "cv_by_dataset": {c.source: evaluate(None, [c]) for c in oof},
            "fold_weights": weights}


# -- the stage ------------------------------------------------------------------------------------------
class PriorTrainer(FrozenBaseTrainer):
    """`PriorTrainer(config, base_dir, datasets, preset, out).run()`; `datasets` are `mel.dim.train.TrainingSet`s
    (train split, every mention: `unlocated="context"`, as the link prior was counted)."""

    prefix, report_key = "prior.", "prior_terms"
    config: PriorTrainConfig

    def __init__(self, config: PriorTrainConfig, base_dir: str | Path, datasets, preset, out: str | Path, *,
                 cache_dir: str | Path | None = None, progress: bool = False):
        super().__init__(config, base_dir, datasets, preset, out, cache_dir=cache_dir, progress=progress)
        if self.base.config.prior_feature_names:
            raise InputError(f"--base {self.base_dir} already has a link-prior term: give the head it was fitted on")
        for d in datasets:
            if not d.kb.has_link_prior():
                raise InputError(f"{d.kb.path.name} has no link prior: count it first with `python -m mel kb prior "
                                 f"--kb {d.kb.path} --format {d.data.get('dataset')} --data DIR`")

    def term_weights(self, head: DimFusion) -> dict:
        return weights_of(head)

    def collect(self) -> list[PriorRows]:
        from ..types import NOT_LOCATED
        from .candidates import CandidateGenerator
        from .features import FeatureExtractor
        from .frozen_terms import base_scores, frozen_entity_embeddings
        from .train import EntityTable, cached_split_features
        located = [type(d)(d.name, d.kb, [e for e in d.train if e.located != NOT_LOCATED], [], d.data)
                   for d in self.datasets]  # what `train dim` read (unlocated mentions skipped)
        trainer = self.base_trainer(located)
        recipe = trainer.config
        chunks = []
        for part, d in zip(trainer.parts, self.datasets, strict=True):
            if not part.holdout:
                raise InputError(f"the base head held no {part.name} records out: nothing to fit the prior on without dev")
            expected = {x.get("n_heldout") for x in self.payload.get("datasets", []) if x.get("name") == part.name}
            if expected and len(part.holdout) not in expected:
                raise InputError(f"{part.name}: {len(part.holdout)} held-out mentions, the base head says {expected}: "
                                 f"not the records it held out")
            extractor = FeatureExtractor(part.kb, self.preset, use_image=recipe.image, use_cue=recipe.cue,
                                         cue_question=recipe.cue_question)
            generator = CandidateGenerator(part.kb, trainer.candidate_config())
            ho, path = cached_split_features(part.holdout, part.kb, self.preset, extractor, generator, training=False,
                                             n_hard=0, width=None, cache=trainer.cache, progress=self.progress)
            emb = frozen_entity_embeddings(self.base, EntityTable(extractor, part.kb.size))
            base = base_scores(self.base, ho, emb)
            oof = OutOfFoldPrior(part.kb, d.train)
            prior = np.zeros((len(ho), ho.cand.shape[1], N_PRIOR_FEATURES), np.float32)
            for r, ex in enumerate(part.holdout):
                n = int(ho.valid[r].sum())
                prior[r, :n] = oof.values(ex.mention.text, record_of(ex), ho.cand[r, :n])
            chunks.append(PriorRows(base, torch.from_numpy(prior), torch.from_numpy(ho.valid.copy()),
                                    torch.from_numpy(ho.gold_pos.astype(np.int64)),
                                    [record_of(ex) for ex in part.holdout], part.name))
            print(f"[dim-prior] {part.name}: {len(ho)} held-out mentions ({len(set(chunks[-1].records))} records), "
                  f"features {path.name}", file=sys.stderr)
        return chunks

    def run(self, command: str = "") -> dict:
        t0, cfg = time.perf_counter(), self.config
        chunks = self.collect()
        grid = []
        for names in cfg.feature_sets():
            for l2 in cfg.l2_list():
                entry = {"features": list(names), "l2": l2, **cross_validate(self.base, chunks, names, l2, cfg)}
                grid.append(entry)
                print(f"[dim-prior] {json.dumps({k: v for k, v in entry.items() if k != 'fold_weights'})}",
                      file=sys.stderr)
        best = min(grid, key=lambda g: (g["cv"]["ce"], len(g["features"]), -g["l2"]))
        head = fit_prior(prior_head(self.base, best["features"]), chunks, best["l2"], cfg.steps, cfg.lr)
        report = {"features": best["features"], "config": asdict(cfg),
                  "chosen": {"features": best["features"], "l2": best["l2"]},
                  "chosen_on": f"{cfg.folds}-fold cross-validation (folds by record) over the training records the "
                               f"base head held out, out-of-fold link prior; mean cross-entropy",
                  "heldout_without_prior": evaluate(None, chunks),
                  "heldout_cv_with_prior": best["cv"], "heldout_cv_by_dataset": best["cv_by_dataset"],
                  "heldout_without_prior_by_dataset": {c.source: evaluate(None, [c]) for c in chunks},
                  "heldout_fit_with_prior": evaluate(head, chunks),
                  "grid": [{k: v for k, v in g.items() if k != "fold_weights"} for g in grid],
                  "prior_tables": {d.name: d.kb.link_prior_info() for d in self.datasets},
                  "command": command, "base": str(self.base_dir), "seconds": round(time.perf_counter() - t0, 1)}
        self.save(head, report)
        report["base_tensors_identical"] = self.check_frozen()
        return report


# -- CLI: `python -m mel train dim-prior` -----------------------------------------------------------------
CONFIG = PriorTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    frozen_terms.add_arguments(p, "each dataset's KB, with its link prior (`mel kb prior`), comma-separated")


def run(args) -> None:
    from ..cli_kit import config_from_args
    config = config_from_args(PriorTrainConfig, args)
    preset, datasets = frozen_terms.load_training_sets(args, unlocated="context")
    trainer = PriorTrainer(config, args.base, datasets, preset, args.out, cache_dir=args.cache_dir,
                           progress=not args.quiet)
    report = trainer.run(command=getattr(args, "command_line", ""))
    frozen_terms.print_summary(args, report, "prior_terms",
                               ("chosen", "heldout_without_prior", "heldout_cv_with_prior",
                                "heldout_without_prior_by_dataset", "heldout_cv_by_dataset", "base_tensors_identical"))
