"""What the trainers of extra terms on a FROZEN DIM head share: `python -m mel train dim-visual`
(mel.dim.visual_train, the visual terms), `python -m mel train dim-prior` (mel.dim.prior_train, the link-prior term)
and `python -m mel train dim-numbers` (mel.dim.number_train, the name-number term).

Each copies every tensor of `--base` unchanged, adds one kind of linear term (its tensors under one prefix:
`visual.`, `prior.`, `numbers.`), fits that term's weights alone (biases stay 0) from zero by L-BFGS on the summed
cross-entropy of the gold + l2 * |w|^2, and scores its rows with the base head on `python -m mel train dim`'s cached
features (the base's own recipe, so the same cache key). Here: the commands' shared flags, input checks and dataset
loading, the frozen base (loading it, the head with a new term, its scores, the save and the bit-for-bit check), the
fit, and for the two terms over named pair features (prior, numbers) the cross-validated choice of features and L2
(LinearTerm, TermRows, LinearTermTrainer).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from .model import DimFusion, FusionConfig


def float_list(text: str, flag: str, low: float, high: float | None = None, *, above: bool = False,
               need: str = "") -> list[float]:
    """The comma-separated finite numbers of `--flag`, each in [low, high] (low itself refused when `above`);
    `need` says what is expected in the error (default: the interval)."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"--{flag} must be comma-separated numbers, got {text!r}") from exc
    if not values or any(not math.isfinite(v) or v < low or (above and v == low) or (high is not None and v > high)
                         for v in values):
        need = need or f"numbers in [{low}, {high if high is not None else 'inf'}]"
        raise InputError(f"--{flag} needs {need}, got {text!r}")
    return values


# -- the frozen base -----------------------------------------------------------------------------------
def extended_head(base: DimFusion, prefix: str, **config) -> DimFusion:
    """A head with `config` changed (the new term's feature names), the new term (tensors `prefix`*, zero) and
    every other parameter copied from `base`; only the term's weights (`prefix`*.weight) are trainable."""
    head = DimFusion(FusionConfig(**{**asdict(base.config), **config}))
    state = {k: v for k, v in base.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise CheckpointError(f"the base head does not fit the {prefix.rstrip('.')} head: missing {missing}, "
                              f"unexpected {unexpected}")
    for name, p in head.named_parameters():
        p.requires_grad_(name.startswith(prefix) and name.endswith(".weight"))
    return head.eval()


def frozen_entity_embeddings(model: DimFusion, table, batch: int = 4096) -> torch.Tensor:
    """(kb_size, out_dim): every entity of a trainer EntityTable through the frozen head."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(table.text), batch):
            idx = torch.arange(s, min(s + batch, len(table.text)))
            text, image, mask = table.gather(idx)
            out.append(model.encode_entities(text, image, mask))
    return torch.cat(out)


def base_scores(model: DimFusion, split, entity_emb: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(n, w) frozen-head scores of cached SplitFeatures rows (-inf on padding)."""
    out = []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(split), batch):
            rows = np.arange(s, min(s + batch, len(split)))
            m = model.encode_mentions(**split.feats.rows(rows).tensors())
            idx = torch.from_numpy(split.cand[rows]).clamp_min(0)
            scores = model.score_candidates(m, entity_emb[idx], torch.from_numpy(split.pair[rows])
                                            if model.pair_mlp is not None else None)
            out.append(scores.masked_fill(~torch.from_numpy(split.valid[rows]), float("-inf")))
    return torch.cat(out)


# -- the fit -------------------------------------------------------------------------------------------
def fit_term(head: DimFusion, summed_loss: Callable[[], torch.Tensor], n: int, l2: float, steps: int,
             lr: float = 1.0) -> DimFusion:
    """The head's trainable weights, from zero, minimising (summed_loss() + l2 * |w|^2) / n over `n` rows (a
    prior: whatever the row count). The problem is convex in the weights; L-BFGS (strong Wolfe line search) for up
    to `steps` steps. No rows (n = 0): the weights stay zero."""
    params = [p for p in head.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.zero_()
    if not n or not params:
        return head
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = (summed_loss() + l2 * sum((p ** 2).sum() for p in params)) / n
        total.backward()
        return total

    opt.step(closure)
    return head


def gold_figures(scored: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean cross-entropy of the gold (over the rows whose gold is in the pool) and Hits@1 (over every row: a gold
    of -1, outside the pool, is a miss) of (scores (n, w), gold (n,)) chunks."""
    ce, ok, n, n_in = 0.0, 0, 0, 0
    with torch.no_grad():
        for scores, gold in scored:
            inside = gold >= 0
            if bool(inside.any()):
                ce += float(torch.nn.functional.cross_entropy(scores[inside], gold[inside], reduction="sum"))
            ok += int(((scores.argmax(1) == gold) & inside).sum())
            n, n_in = n + len(gold), n_in + int(inside.sum())
    return {"ce": round(ce / n_in, 5) if n_in else None, "hits@1": round(ok / n, 4) if n else None, "n": n}


# -- one linear term over named pair features, chosen by cross-validation --------------------------------
@dataclass(frozen=True)
class LinearTerm:
    """A linear term of the head over named pair features (bias 0), as `train dim-prior` and `train dim-numbers`
    fit it: its tensors `prefix`*, the FusionConfig field that lists the features it uses, the head's module and
    scoring method (with the rows' mask when `masked`)."""

    prefix: str                       # "prior."
    names_field: str                  # "prior_feature_names"
    module: str                       # "prior": DimFusion.prior
    method: str                       # "prior_scores": DimFusion.prior_scores(features, mask)
    label: str                        # "prior": the report's "heldout_without_prior", ...
    masked: bool = True               # the method takes the (n, w) mask too

    def head(self, base: DimFusion, names) -> DimFusion:
        """A head with a zero term over `names` and every other parameter copied from `base`, frozen."""
        return extended_head(base, self.prefix, **{self.names_field: tuple(names)})

    def scores(self, head: DimFusion | None, rows: "TermRows") -> torch.Tensor:
        """The base scores of `rows` plus the term's (head), or the base scores alone (None)."""
        if head is None:
            return rows.base
        score = getattr(head, self.method)
        return rows.base + (score(rows.features, rows.mask) if self.masked else score(rows.features))

    def weights(self, head: DimFusion) -> dict:
        layer = getattr(head, self.module)
        if layer is None:
            return {}
        w = layer.weight.detach().float().flatten()
        return {name: round(float(x), 4) for name, x in zip(getattr(head.config, self.names_field), w, strict=True)}


@dataclass
class TermRows:
    base: torch.Tensor      # (n, w) the frozen head's scores, -inf on padding
    features: torch.Tensor  # (n, w, number of the term's features)
    mask: torch.Tensor      # (n, w) bool
    gold: torch.Tensor      # (n,) gold column, -1 when the gold is not in the pool (a miss, no gradient)
    records: list[str]      # record id of each row (folds are drawn by record)
    source: str = ""

    def __len__(self) -> int:
        return len(self.gold)

    def take(self, rows: np.ndarray) -> "TermRows":
        idx = torch.from_numpy(np.asarray(rows, np.int64))
        return TermRows(self.base[idx], self.features[idx], self.mask[idx], self.gold[idx],
                        [self.records[i] for i in rows], self.source)


def record_of(example) -> str:
    return str(example.sample_id).split("#")[0]


def fit_rows(term: LinearTerm, head: DimFusion, chunks: list[TermRows], l2: float, steps: int,
             lr: float = 1.0) -> DimFusion:
    """The term's weights only (bias 0), from zero: summed cross-entropy of the gold + l2 * |w|^2 (L-BFGS); the
    rows whose gold is not in the pool are left out."""
    fit = [c.take(np.flatnonzero(c.gold.numpy() >= 0)) for c in chunks if len(c)]

    def summed_loss() -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(term.scores(head, c), c.gold, reduction="sum")
                   for c in fit if len(c))

    return fit_term(head, summed_loss, sum(len(c) for c in fit), l2, steps, lr)


def evaluate_rows(term: LinearTerm, head: DimFusion | None, chunks: list[TermRows]) -> dict:
    """Mean cross-entropy (rows whose gold is in the pool) and Hits@1 over EVERY row (a gold outside the pool
    is a miss), with the term (head) or without (None)."""
    return gold_figures((term.scores(head, c), c.gold) for c in chunks if len(c))


def fold_of(rows: TermRows, k: int, seed: int) -> np.ndarray:
    """Fold of each row: the rows' records shuffled (seeded) and dealt round-robin, so a record is in one fold."""
    records = sorted(set(rows.records))
    order = np.random.default_rng(seed).permutation(len(records))
    fold = {records[j]: i % k for i, j in enumerate(order)}
    return np.array([fold[r] for r in rows.records], np.int64)


def cross_validate_rows(term: LinearTerm, base: DimFusion, chunks: list[TermRows], names, l2: float, cfg) -> dict:
    """Out-of-fold figures: each fold scored by a head fitted on the other folds (pooled and per chunk); `cfg`
    gives folds, seed, steps and lr."""
    folds = [fold_of(c, cfg.folds, cfg.seed + k) for k, c in enumerate(chunks)]
    parts: list[list[TermRows]] = [[] for _ in chunks]
    weights = []
    for f in range(cfg.folds):
        train = [c.take(np.flatnonzero(fd != f)) for c, fd in zip(chunks, folds, strict=True)]
        head = fit_rows(term, term.head(base, names), train, l2, cfg.steps, cfg.lr)
        weights.append(term.weights(head))
        for k, (c, fd) in enumerate(zip(chunks, folds, strict=True)):
            test = c.take(np.flatnonzero(fd == f))
            with torch.no_grad():
                scored = TermRows(term.scores(head, test), test.features, test.mask, test.gold, test.records,
                                  test.source)
            parts[k].append(scored)
    oof = [TermRows(torch.cat([p.base for p in ps]), torch.cat([p.features for p in ps]),
                    torch.cat([p.mask for p in ps]), torch.cat([p.gold for p in ps]),
                    [r for p in ps for r in p.records], c.source)
           for ps, c in zip(parts, chunks, strict=True)]
    return {"cv": evaluate_rows(term, None, oof), "cv_by_dataset": {c.source: evaluate_rows(term, None, [c]) for c in oof},
            "fold_weights": weights}


def feature_sets(text: str, known: tuple[str, ...]) -> list[tuple[str, ...]]:
    """--features: ';'-separated sets, each a comma-separated subset of `known`."""
    sets = [tuple(f.strip() for f in s.split(",") if f.strip()) for s in str(text).split(";") if s.strip()]
    bad = [s for s in sets if not s or any(f not in known for f in s) or len(set(s)) < len(s)]
    if not sets or bad:
        raise InputError(f"--features: each set is a comma-separated subset of {list(known)}, sets "
                         f"separated by ';' (got {text!r})")
    return sets


# -- the config and the rows of a LinearTermTrainer ------------------------------------------------------
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


# -- the held-out rows ----------------------------------------------------------------------------------
def caption_number_features(examples, kb, split) -> np.ndarray:
    """(n, w, N_NUMBER_FEATURES) name-number features of cached SplitFeatures rows (`split.cand`, `split.valid`)
    of `examples`, as the linker computes them (mel.dim.name_numbers)."""
    from .name_numbers import number_pair_features, numbered_words
    from .pipeline import EntityFactsCache
    facts = EntityFactsCache(kb).get_many(sorted({int(i) for i in split.cand[split.valid]}))
    return number_pair_features([numbered_words(ex.mention.caption) for ex in examples], facts, split.cand, split.valid)


def heldout_rows(trainer: "LinearTermTrainer", datasets, values, tag: str) -> list[TermRows]:
    """One TermRows per dataset: the base's held-out train records (what `train dim` read: unlocated mentions
    skipped), the frozen base's scores of their candidate pools (`train dim`'s cached features; with the base's
    name-number term when it has one, without its visual terms: few held-out records have a photo) and the new
    term's features `values(part, dataset, split_features)` -> (n, w, f) array."""
    from ..types import NOT_LOCATED
    from .candidates import CandidateGenerator
    from .features import FeatureExtractor
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
        if trainer.base.numbers is not None:  # the base's own name-number term, as the linker adds it
            base = base + trainer.base.number_scores(torch.from_numpy(caption_number_features(part.holdout, part.kb, ho)))
        chunks.append(TermRows(base, torch.from_numpy(values(part, d, ho)), torch.from_numpy(ho.valid.copy()),
                               torch.from_numpy(ho.gold_pos.astype(np.int64)),
                               [record_of(ex) for ex in part.holdout], part.name))
        print(f"[dim-{tag}] {part.name}: {len(ho)} held-out mentions ({len(set(chunks[-1].records))} records), "
              f"features {path.name}", file=sys.stderr)
    return chunks


# -- the stage -----------------------------------------------------------------------------------------
class FrozenBaseTrainer:
    """The frame of a trainer of one new term on a frozen base head: `--base` loaded (`self.base`, its config.json
    `self.payload`), `--out` checked, the base's rows (`base_trainer`), the save and the check that the base's
    tensors were kept. A subclass names the term's tensor `prefix`, its `report_key` in config.json and
    `term_weights(head)` (the term's weights, for the report)."""

    prefix = ""
    report_key = ""

    def __init__(self, config, base_dir: str | Path, datasets, preset, out: str | Path, *,
                 cache_dir: str | Path | None = None, progress: bool = False):
        from ..training import check_checkpoint_target
        from .linker import load_head
        self.base_dir = Path(base_dir)
        if not (self.base_dir / "config.json").is_file() or not (self.base_dir / "model.safetensors").is_file():
            raise InputError(f"--base {self.base_dir}: not a DIM head (config.json + model.safetensors); "
                             f"train one with `python -m mel train dim`")
        self.config, self.preset, self.datasets = config, preset, datasets
        self.out = check_checkpoint_target(out)
        if self.out.resolve() == self.base_dir.resolve():
            raise InputError("--out must differ from --base (the base is read while OUT is written); copy it after")
        self.base, self.payload = load_head(self.base_dir)
        self.cache_dir, self.progress = cache_dir, progress

    def term_weights(self, head: DimFusion) -> dict:
        raise NotImplementedError

    def base_trainer(self, datasets):
        """`python -m mel train dim`'s trainer with the base head's recipe on `datasets` (its held-out split and
        feature cache; it never writes a head: its OUT is OUT.base-rows)."""
        from .train import DimTrainConfig, DimTrainer
        known = DimTrainConfig.__dataclass_fields__
        recipe = {k: v for k, v in self.payload.get("train", {}).items() if k in known}
        return DimTrainer(DimTrainConfig(**recipe), None, self.preset, self.out.with_name(self.out.name + ".base-rows"),
                          datasets=datasets, cache_dir=self.cache_dir, progress=self.progress)

    def save(self, head: DimFusion, report: dict) -> Path:
        """The head in `save_dtype` (default: the base's own), the base's config.json entries kept, the report under
        `report_key` with the weights as stored (rounded to that dtype). The base tensors are checked (check_frozen)
        before anything is written: a head that changed them is never published."""
        from ..training.checkpoint import save_pretrained_dir
        dtype = self.shipped_dtype()
        shipped = head.to({"float16": torch.float16, "float32": torch.float32}[dtype])
        self.check_frozen({k: v.detach().cpu().contiguous().numpy() for k, v in shipped.state_dict().items()})
        extra = {k: v for k, v in self.payload.items() if k not in ("model_type", "config")}
        extra["weights_dtype"] = dtype
        extra[self.report_key] = {**report, "weights": self.term_weights(shipped)}
        return save_pretrained_dir(shipped, shipped.config, self.out, extra=extra)

    def shipped_dtype(self) -> str:
        """--save-dtype, or else the dtype of the base file's tensors (so that they are kept bit for bit)."""
        if self.config.save_dtype:
            return self.config.save_dtype
        dtypes = {str(v.dtype) for v in self._base_tensors().values()}
        if len(dtypes) != 1 or not dtypes <= {"float16", "float32"}:
            raise CheckpointError(f"--base {self.base_dir} holds tensors of {sorted(dtypes)}; give --save-dtype "
                                  f"float16 or float32")
        return dtypes.pop()

    def _base_tensors(self) -> dict:
        from safetensors.numpy import load_file
        return load_file(str(self.base_dir / "model.safetensors"))

    def check_frozen(self, new: dict | None = None) -> bool:
        """Every tensor of the base file is in `new` (numpy arrays of the head about to be saved; default: the saved
        OUT) with the same dtype and bytes; only `prefix`* were added."""
        from safetensors.numpy import load_file
        old = self._base_tensors()
        if new is None:
            new = load_file(str(self.out / "model.safetensors"))
        changed = [k for k, v in old.items() if k not in new or new[k].dtype != v.dtype or new[k].tobytes() != v.tobytes()]
        added = sorted(set(new) - set(old))
        if changed or any(not k.startswith(self.prefix) for k in added):
            raise CheckpointError(f"the base tensors changed ({changed}) or unexpected tensors were added ({added})")
        return True


class LinearTermTrainer(FrozenBaseTrainer):
    """A FrozenBaseTrainer of one LinearTerm (`term`): `collect()` gives the held-out rows (TermRows, one chunk per
    dataset); `run()` cross-validates every feature set x L2 of the config (`feature_sets()`, `l2_list()`, `folds`,
    `steps`, `lr`, `seed`), keeps the lowest out-of-fold cross-entropy (then fewer features, then more L2), fits it
    on every row and saves the head."""

    term: LinearTerm

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return self.term.prefix

    def term_weights(self, head: DimFusion) -> dict:
        return self.term.weights(head)

    def collect(self) -> list[TermRows]:
        raise NotImplementedError

    def extra_report(self) -> dict:
        return {}

    def run(self, command: str = "") -> dict:
        import time
        t0, cfg, term, name = time.perf_counter(), self.config, self.term, self.term.label
        chunks = self.collect()
        grid = []
        for names in cfg.feature_sets():
            for l2 in cfg.l2_list():
                entry = {"features": list(names), "l2": l2, **cross_validate_rows(term, self.base, chunks, names, l2, cfg)}
                grid.append(entry)
                print(f"[dim-{name}] {json.dumps({k: v for k, v in entry.items() if k != 'fold_weights'})}",
                      file=sys.stderr)
        best = min(grid, key=lambda g: (g["cv"]["ce"], len(g["features"]), -g["l2"]))
        head = fit_rows(term, term.head(self.base, best["features"]), chunks, best["l2"], cfg.steps, cfg.lr)
        report = {"features": best["features"], "config": asdict(cfg),
                  "chosen": {"features": best["features"], "l2": best["l2"]},
                  "chosen_on": f"{cfg.folds}-fold cross-validation (folds by record) over the training records the "
                               f"base head held out; mean cross-entropy",
                  f"heldout_without_{name}": evaluate_rows(term, None, chunks),
                  f"heldout_cv_with_{name}": best["cv"], "heldout_cv_by_dataset": best["cv_by_dataset"],
                  f"heldout_without_{name}_by_dataset": {c.source: evaluate_rows(term, None, [c]) for c in chunks},
                  f"heldout_fit_with_{name}": evaluate_rows(term, head, chunks),
                  "grid": [{k: v for k, v in g.items() if k != "fold_weights"} for g in grid],
                  **self.extra_report(),
                  "command": command, "base": str(self.base_dir), "seconds": round(time.perf_counter() - t0, 1)}
        self.save(head, report)
        report["base_tensors_identical"] = self.check_frozen()
        return report


# -- CLI ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, kb_help: str, *required: tuple[str, str]) -> None:
    """The flags of every `python -m mel train dim-*` command on a frozen base; `required` (flag, help) pairs come
    right after --base."""
    from ..cli_kit import add_preset_args, add_threads_arg
    p.add_argument("--base", required=True, help="the DIM head to extend (kept frozen), e.g. models/dim-offline")
    for flag, text in required:
        p.add_argument(flag, required=True, help=text)
    p.add_argument("--format", required=True, help="dataset format(s), comma-separated, as for `train dim`")
    p.add_argument("--data", required=True, help="dataset directories, comma-separated")
    p.add_argument("--kb", required=True, help=kb_help)
    add_preset_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write (not --base)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--cache-dir", default=None, help="feature cache of `train dim` (default: $MEL_CACHE/dim-features)")
    add_threads_arg(p, subcommand=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_training_sets(args, **load) -> tuple:
    """(preset, datasets): the `mel.dim.train.TrainingSet`s (--train-split only, `load` passed to `load_dataset`)
    named by --format/--data/--kb, after checking that every path exists."""
    from ..cli_kit import resolve_preset
    from ..datasets import load_dataset
    from ..kb import KnowledgeBase
    from .train import TrainingSet, dataset_args
    entries = dataset_args(args)
    for _, _, folder, kb_path in entries:
        for what, path in (("--data", folder), ("--kb", kb_path)):
            if not Path(path).exists():
                raise InputError(f"{what} {path} does not exist")
    preset = resolve_preset(args)
    datasets = [TrainingSet(name, KnowledgeBase(kb_path), load_dataset(fmt, folder, args.train_split, **load).examples,
                            [], {"dataset": fmt, "split": args.train_split})
                for name, fmt, folder, kb_path in entries]
    return preset, datasets


def print_summary(args, report: dict, report_key: str, keys: Iterable[str]) -> None:
    """`keys` of the report and the term's weights as saved in OUT/config.json, as JSON on stdout."""
    summary = {k: report[k] for k in keys}
    saved = json.loads((Path(args.out) / "config.json").read_text())[report_key]["weights"]
    print(json.dumps({**summary, "weights": saved, "out": str(args.out)}, indent=2))
