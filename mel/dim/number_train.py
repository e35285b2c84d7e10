"""Fit the name-number term of a DIM head with its base FROZEN (issue #15: "William V" linked to William VII).

    python -m mel train dim-numbers --base runs/dim --format wikimel,richpedia,wikidiverse \
        --data DIR1,DIR2,DIR3 --kb a.sqlite,b.sqlite,c.sqlite --out DIR

The head gets one linear term over the name-number features (`mel.dim.name_numbers`: the candidate's name carries
the (word, number) the caption gives, another number on that word, or none); every other tensor is copied from
`--base` unchanged (bit for bit; checked after saving), and a caption without a regnal or title number scores
exactly as with the base head (every feature 0, bias 0).

Rows: the training records the base head HELD OUT (it never trained on them), with the base's scores of the
candidate pool the linker sees (`train dim`'s cached features, same cache key). Which features and the L2
strength are chosen by K-fold cross-validation over those records (folds by record); dev is never read.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from . import frozen_terms
from .frozen_terms import (
    LinearTerm,
    LinearTermTrainer,
    TermRows,
    TermTrainConfig,
    caption_number_features,
    heldout_rows,
)
from .name_numbers import NUMBER_FEATURES

NUMBER_TERM = LinearTerm(prefix="numbers.", names_field="number_feature_names", module="numbers",
                         method="number_scores", label="numbers", masked=False)


@dataclass
class NumberTrainConfig(TermTrainConfig):
    """Every field is a flag of `python -m mel train dim-numbers` (`l2` -> `--l2`)."""

    features: str = field(default="number_agree,number_clash;number_agree,number_clash,number_missing", metadata={
        "help": f"candidate feature sets, ';'-separated, each a comma-separated subset of {list(NUMBER_FEATURES)} "
                f"(chosen by cross-validation on held-out records)"})
    known: ClassVar[tuple[str, ...]] = NUMBER_FEATURES


class NumberTrainer(LinearTermTrainer):
    """`NumberTrainer(config, base_dir, datasets, preset, out).run()`; `datasets` are `mel.dim.train.TrainingSet`s
    (train split)."""

    report_key, term = "number_terms", NUMBER_TERM
    config: NumberTrainConfig

    def __init__(self, config: NumberTrainConfig, base_dir, datasets, preset, out, *, cache_dir=None,
                 progress: bool = False):
        from ..errors import InputError
        super().__init__(config, base_dir, datasets, preset, out, cache_dir=cache_dir, progress=progress)
        if self.base.config.number_feature_names:
            raise InputError(f"--base {self.base_dir} already has a name-number term: give the head it was fitted on")
        if self.base.config.prior_feature_names:
            raise InputError(f"--base {self.base_dir} has a link-prior term, which this fit cannot score: fit the "
                             f"name-number term on the head without it, then `train dim-prior` on the result")

    def collect(self) -> list[TermRows]:
        def values(part, d, ho) -> np.ndarray:
            return caption_number_features(part.holdout, part.kb, ho)
        return heldout_rows(self, self.datasets, values, "numbers")


# -- CLI: `python -m mel train dim-numbers` ----------------------------------------------------------------
CONFIG = NumberTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    frozen_terms.add_arguments(p, "each dataset's KB, comma-separated")


def run(args) -> None:
    from ..cli_kit import config_from_args
    config = config_from_args(NumberTrainConfig, args)
    preset, datasets = frozen_terms.load_training_sets(args)
    trainer = NumberTrainer(config, args.base, datasets, preset, args.out, cache_dir=args.cache_dir,
                            progress=not args.quiet)
    report = trainer.run(command=getattr(args, "command_line", ""))
    frozen_terms.print_summary(args, report, "number_terms",
                               ("chosen", "heldout_without_numbers", "heldout_cv_with_numbers",
                                "heldout_without_numbers_by_dataset", "heldout_cv_by_dataset",
                                "base_tensors_identical"))
