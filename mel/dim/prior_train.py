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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..kb import count_link_prior, link_prior_key
from . import frozen_terms
from .frozen_terms import (
    LinearTerm,
    LinearTermTrainer,
    TermRows,
    TermTrainConfig,
    cross_validate_rows,
    evaluate_rows,
    fit_rows,
    heldout_rows,
    record_of,
)
from .model import DimFusion
from .prior import N_PRIOR_FEATURES, PRIOR_FEATURES, prior_values


@dataclass
class PriorTrainConfig(TermTrainConfig):
    """Every field is a flag of `python -m mel train dim-prior` (`l2` -> `--l2`)."""

    features: str = field(default="prior_pem;prior_pair,prior_pem;prior_pem,prior_entity;prior_pair,prior_pem,prior_entity",
                          metadata={"help": f"candidate feature sets, ';'-separated, each a comma-separated subset of "
                                            f"{list(PRIOR_FEATURES)} (chosen by cross-validation on held-out records)"})
    known: ClassVar[tuple[str, ...]] = PRIOR_FEATURES


PRIOR_TERM = LinearTerm(prefix="prior.", names_field="prior_feature_names", module="prior", method="prior_scores",
                        label="prior")
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


# -- the stage ------------------------------------------------------------------------------------------
class PriorTrainer(LinearTermTrainer):
    """`PriorTrainer(config, base_dir, datasets, preset, out).run()`; `datasets` are `mel.dim.train.TrainingSet`s
    (train split, every mention: `unlocated="context"`, as the link prior was counted)."""

    report_key, term = "prior_terms", PRIOR_TERM
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
