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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..kb import count_link_prior, link_prior_key
from . import frozen_terms
from .frozen_terms import (
    FrozenBaseTrainer,
    LinearTerm,
    LinearTermTrainer,
    TermRows,
    cross_validate_rows,
    evaluate_rows,
    feature_sets,
    fit_rows,
    float_list,
    fold_of,  # noqa: F401  (re-exported: the prior's tests draw folds with it)
    record_of,
)
from .model import DimFusion
from .prior import N_PRIOR_FEATURES, PRIOR_FEATURES, prior_values


@dataclass
class TermTrainConfig:
    """Every field is a flag of `python -m mel train dim-prior` / `dim-numbers` (`l2` -> `--l2`); a subclass names
    the term's features (`known`) and the default feature sets."""

    features: str = ""
    l2: str = field(default="0.01,0.1,1,10,100", metadata={
        "help": "candidate L2 strengths, > 0 (chosen): the loss is the SUMMED cross-entropy + l2 * |w|^2"})
    folds: int = field(default=5, metadata={"help": "cross-validation folds over the held-out records"})
    steps: int = field(default=200, metadata={"help": "L-BFGS iterations at most (the problem is convex)"})
    lr: float = 1.0
    seed: int = 42
    save_dtype: str = field(default="", metadata={
        "help": "float16 or float32; default: the base's own (its tensors are kept bit for bit)"})

    known: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.feature_sets()
        self.l2_list()
        if int(self.folds) < 2 or int(self.steps) < 1 or not self.lr > 0 or self.save_dtype not in ("", "float16", "float32"):
            raise InputError("--folds must be >= 2, --steps >= 1, --lr > 0 and --save-dtype float16 or float32")

    def feature_sets(self) -> list[tuple[str, ...]]:
        return feature_sets(self.features, self.known)

    def l2_list(self) -> list[float]:
        return float_list(self.l2, "l2", 0.0, above=True, need="numbers > 0 (a prior on the weights)")


@dataclass
class PriorTrainConfig(TermTrainConfig):
    """Every field is a flag of `python -m mel train dim-prior` (`l2` -> `--l2`)."""

    features: str = field(default="prior_pem;prior_pair,prior_pem;prior_pem,prior_entity;prior_pair,prior_pem,prior_entity",
                          metadata={"help": f"candidate feature sets, ';'-separated, each a comma-separated subset of "
                                            f"{list(PRIOR_FEATURES)} (chosen by cross-validation on held-out records)"})
    known: ClassVar[tuple[str, ...]] = PRIOR_FEATURES


PRIOR_TERM = LinearTerm(prefix="prior.", names_field="prior_feature_names", feature_names=PRIOR_FEATURES,
                        module="prior", method="prior_scores", label="prior")
PriorRows = TermRows


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


# -- the head and the fit: the link-prior term's bindings of mel.dim.frozen_terms -----------------------------
def prior_head(base: DimFusion, names) -> DimFusion:
    """A head with a zero link-prior term over `names` and every other parameter copied from `base`, frozen."""
    return PRIOR_TERM.head(base, names)


def fit_prior(head: DimFusion, chunks: list[TermRows], l2: float, steps: int, lr: float = 1.0) -> DimFusion:
    return fit_rows(PRIOR_TERM, head, chunks, l2, steps, lr)


def evaluate(head: DimFusion | None, chunks: list[TermRows]) -> dict:
    return evaluate_rows(PRIOR_TERM, head, chunks)


def weights_of(head: DimFusion) -> dict:
    return PRIOR_TERM.weights(head)


def cross_validate(base: DimFusion, chunks: list[TermRows], names, l2: float, cfg: PriorTrainConfig) -> dict:
    return cross_validate_rows(PRIOR_TERM, base, chunks, names, l2, cfg)


# -- the held-out rows ----------------------------------------------------------------------------------
def heldout_rows(trainer: FrozenBaseTrainer, datasets, values, tag: str) -> list[TermRows]:
    """One TermRows per dataset: the base's held-out train records (what `train dim` read: unlocated mentions
    skipped), the frozen base's scores of their candidate pools (`train dim`'s cached features) and the term's
    features `values(part, dataset, split_features)` -> (n, w, f) array."""
    from ..types import NOT_LOCATED
    from .candidates import CandidateGenerator
    from .features import FeatureExtractor
    from .frozen_terms import base_scores, frozen_entity_embeddings
    from .train import EntityTable, cached_split_features
    located = [type(d)(d.name, d.kb, [e for e in d.train if e.located != NOT_LOCATED], [], d.data) for d in datasets]
    base_trainer = trainer.base_trainer(located)
    recipe = base_trainer.config
    chunks = []
    for part, d in zip(base_trainer.parts, datasets, strict=True):
        if not part.holdout:
            raise InputError(f"the base head held no {part.name} records out: nothing to fit the term on without dev")
        expected = {x.get("n_heldout") for x in trainer.payload.get("datasets", []) if x.get("name") == part.name}
        if expected and len(part.holdout) not in expected:
            raise InputError(f"{part.name}: {len(part.holdout)} held-out mentions, the base head says {expected}: "
                             f"not the records it held out")
        extractor = FeatureExtractor(part.kb, trainer.preset, use_image=recipe.image, use_cue=recipe.cue,
                                     cue_question=recipe.cue_question)
        generator = CandidateGenerator(part.kb, base_trainer.candidate_config())
        ho, path = cached_split_features(part.holdout, part.kb, trainer.preset, extractor, generator, training=False,
                                         n_hard=0, width=None, cache=base_trainer.cache, progress=trainer.progress)
        emb = frozen_entity_embeddings(trainer.base, EntityTable(extractor, part.kb.size))
        base = base_scores(trainer.base, ho, emb)
        chunks.append(TermRows(base, torch.from_numpy(values(part, d, ho)), torch.from_numpy(ho.valid.copy()),
                               torch.from_numpy(ho.gold_pos.astype(np.int64)),
                               [record_of(ex) for ex in part.holdout], part.name))
        print(f"[dim-{tag}] {part.name}: {len(ho)} held-out mentions ({len(set(chunks[-1].records))} records), "
              f"features {path.name}", file=sys.stderr)
    return chunks


# -- the stage ------------------------------------------------------------------------------------------
class PriorTrainer(LinearTermTrainer):
    """`PriorTrainer(config, base_dir, datasets, preset, out).run()`; `datasets` are `mel.dim.train.TrainingSet`s
    (train split, every mention: `unlocated="context"`, as the link prior was counted)."""

    prefix, report_key, term = "prior.", "prior_terms", PRIOR_TERM
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

    def collect(self) -> list[TermRows]:
        def values(part, d, ho) -> np.ndarray:
            """Out-of-fold: the KB's prior (whole train split) minus the record's own annotations."""
            oof = OutOfFoldPrior(part.kb, d.train)
            prior = np.zeros((len(ho), ho.cand.shape[1], N_PRIOR_FEATURES), np.float32)
            for r, ex in enumerate(part.holdout):
                n = int(ho.valid[r].sum())
                prior[r, :n] = oof.values(ex.mention.text, record_of(ex), ho.cand[r, :n])
            return prior
        return heldout_rows(self, self.datasets, values, "prior")

    def extra_report(self) -> dict:
        return {"chosen_on": f"{self.config.folds}-fold cross-validation (folds by record) over the training records "
                             f"the base head held out, out-of-fold link prior; mean cross-entropy",
                "prior_tables": {d.name: d.kb.link_prior_info() for d in self.datasets}}


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
