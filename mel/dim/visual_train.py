"""Train the visual terms of a DIM head with its base FROZEN (issue #13: "the image must decide").

    python -m mel train dim-visual --base models/dim-offline --error-model results/face_error_model.json \
        --format wikimel,richpedia,wikidiverse --data DIR1,DIR2,DIR3 --kb a.sqlite,b.sqlite,c.sqlite --out DIR

The head's visual terms (`mel.dim.model`, one linear term per group of `mel.dim.pairs.VISUAL_GROUPS`) are
the only parameters trained; every other parameter is copied from `--base` unchanged, so a mention without
a photo (every visual mask off) scores exactly as with the base head. The biases are kept at 0: the
simulation below only makes faces for mentions whose gold is a person, so a bias would learn "a candidate
with `Sex:` is the gold" from the simulation's design, not from photos.

Training signal (the datasets hold almost no photos: WikiMEL has a few dozen image mentions):
  (a) real photos: the training mentions that have an image, with their real ConSE vector and real faces
      (image_text can only learn from these);
  (b) simulated faces: for a training mention whose gold has `Sex:`, with probability `face_rate`, one face
      whose apparent gender is the gold's sex with the measured accuracy (`--error-model`, measured by
      bench/face_error_model.py on WikiMEL train photos), whose probability is drawn from the measured
      probabilities when right / when wrong, and whose apparent age (when the gold has `Birth:` and the
      caption a year) is the true age plus a drawn measured error. The same face is scored against every
      candidate of the mention, with the functions inference uses (`face_sex_match`, `face_age_gap`).
Rows and base scores come from `python -m mel train dim`'s cached features (the same cache key, so nothing
is re-extracted when the base head was trained with the same data and recipe). The fit uses the base's
training records; `face_rate` and the L2 strength are chosen on the records the base held out (never dev),
on their mean cross-entropy with a face simulated for every eligible mention (seed + 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from . import frozen_terms
from .frozen_terms import (
    FrozenBaseTrainer,
    base_scores,
    extended_head,
    fit_term,
    float_list,
    frozen_entity_embeddings,
    gold_figures,
)
from .model import DimFusion
from .pairs import N_VISUAL_FEATURES, VISUAL_GROUPS, MentionContext, face_age_gap, face_sex_match
from .pipeline import EntityFactsCache

FACE_GROUPS = ("face_sex", "face_age")


@dataclass
class VisualTrainConfig:
    """Every field is a flag of `python -m mel train dim-visual` (`face_rates` -> `--face-rates`)."""

    groups: str = field(default="image_text,face_sex,face_age", metadata={
        "help": f"visual groups to train, comma-separated, of {list(VISUAL_GROUPS)}"})
    face_rates: str = field(default="0.1,0.3,1.0", metadata={
        "help": "candidate probabilities that a training mention gets a simulated face (chosen on held-out)"})
    l2: str = field(default="0.01,0.1,1,10,100", metadata={
        "help": "candidate L2 strengths, > 0 (chosen): the loss is the SUMMED cross-entropy + l2 * |w|^2 (a prior, "
                "whatever the row count); 0 is refused: rows the text already links right are separable, and "
                "unregularised weights then grow without bound"})
    steps: int = field(default=200, metadata={"help": "L-BFGS iterations at most (the problem is convex)"})
    lr: float = 1.0
    seed: int = 42
    save_dtype: str = field(default="", metadata={
        "help": "float16 or float32; default: the base's own (its tensors are kept bit for bit)"})

    def __post_init__(self):
        names = self.group_list()
        unknown = [g for g in names if g not in VISUAL_GROUPS]
        if unknown or not names:
            raise InputError(f"unknown visual group(s) {unknown or [self.groups]}; choose from {list(VISUAL_GROUPS)}")
        self.rate_list()
        self.l2_list()
        if int(self.steps) < 1 or not self.lr > 0 or self.save_dtype not in ("", "float16", "float32"):
            raise InputError("--steps must be >= 1, --lr > 0 and --save-dtype float16 or float32")

    def group_list(self) -> list[str]:
        return [g.strip() for g in self.groups.split(",") if g.strip()]

    def rate_list(self) -> list[float]:
        return float_list(self.face_rates, "face-rates", 0.0, 1.0)

    def l2_list(self) -> list[float]:
        values = float_list(self.l2, "l2", 0.0)
        if min(values) <= 0:
            raise InputError(f"--l2 values must be > 0 (got {self.l2!r}): without a prior the weights of a group whose "
                             f"rows are all linked right already (image_text on the few real photos) grow without bound")
        return values


# -- the face error model ---------------------------------------------------------------------------
@dataclass
class FaceErrorModel:
    """What the face pipeline gets wrong, measured on photos of known people (bench/face_error_model.py)."""

    gender_accuracy: float
    gender_probability_right: list[float]
    gender_probability_wrong: list[float]
    age_error: list[float]
    notes: dict = field(default_factory=dict)  # where it was measured (source, counts, the age reference rule)

    @classmethod
    def from_dict(cls, d: dict) -> "FaceErrorModel":
        d = d.get("error_model", d)
        try:
            em = cls(float(d["gender_accuracy"]), [float(x) for x in d["gender_probability_right"]],
                     [float(x) for x in d["gender_probability_wrong"]], [float(x) for x in d["age_error"]],
                     {k: v for k, v in d.items() if k not in cls.__dataclass_fields__ and isinstance(v, str | int | float)})
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"the error model needs gender_accuracy, gender_probability_right/_wrong and "
                             f"age_error ({exc})") from exc
        if not 0.0 <= em.gender_accuracy <= 1.0 or not em.gender_probability_right or not em.age_error:
            raise InputError("the error model needs an accuracy in [0, 1], probabilities when right and age errors")
        if em.gender_accuracy < 1.0 and not em.gender_probability_wrong:
            raise InputError("the error model has an accuracy below 1 but no probabilities when wrong")
        return em

    @classmethod
    def load(cls, path: str | Path) -> "FaceErrorModel":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"error model {path} not found: measure it with bench/face_error_model.py")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not JSON ({exc})") from exc

    def simulate(self, rng: np.random.Generator, sex: str, true_age: float | None) -> dict:
        """One apparent face of a person of `sex` (and `true_age`): {"gender", "gender_probability", "age"}."""
        right = rng.random() < self.gender_accuracy
        probs = self.gender_probability_right if right else self.gender_probability_wrong
        other = "female" if sex == "male" else "male"
        face = {"gender": sex if right else other, "gender_probability": float(probs[rng.integers(len(probs))]),
                "age": None}
        if true_age is not None:
            face["age"] = float(true_age + self.age_error[rng.integers(len(self.age_error))])
        return face


# -- rows: base scores + visual features of one set of mentions ----------------------------------------
@dataclass
class VisualRows:
    base: torch.Tensor      # (n, w) the frozen head's scores, -inf on padding
    vis: torch.Tensor       # (n, w, N_VISUAL_FEATURES)
    mask: torch.Tensor      # (n, w, len(VISUAL_GROUPS)) bool
    gold: torch.Tensor      # (n,) gold column
    source: str = ""

    def __len__(self) -> int:
        return len(self.gold)


def _true_age(caption_years: list[int], birth: int | None) -> float | None:
    return float(min(caption_years) - birth) if caption_years and birth is not None else None


def simulate_rows(split, examples, base: torch.Tensor, facts: EntityFactsCache, em: FaceErrorModel, rate: float,
                  rng: np.random.Generator, groups: list[str], source: str = "") -> VisualRows:
    """Rows of `split` (cached features of `examples`, same order) whose gold has `Sex:`, each given one
    simulated face with probability `rate`; rows without a face are left out (they add a constant loss)."""
    gi = {g: i for i, g in enumerate(VISUAL_GROUPS)}
    keep, vis_rows, mask_rows = [], [], []
    w = split.cand.shape[1]
    for r, ex in enumerate(examples):
        gp = int(split.gold_pos[r])
        if gp < 0:
            continue
        cand = [int(x) for x in split.cand[r][split.valid[r]]]
        fs = facts.get_many(cand)
        gold = fs[cand[gp]]
        if gold.sex not in ("male", "female") or rng.random() >= rate:
            continue
        years = MentionContext.of(ex.mention.text, ex.mention.caption).years
        face = em.simulate(rng, gold.sex, _true_age(years, gold.birth))
        vis, mask = np.zeros((w, N_VISUAL_FEATURES), np.float32), np.zeros((w, len(VISUAL_GROUPS)), bool)
        _face_features([face], years, [fs[c] for c in cand], groups, vis, mask, gi)
        keep.append(r)
        vis_rows.append(vis)
        mask_rows.append(mask)
    if not keep:
        return VisualRows(torch.zeros(0, w), torch.zeros(0, w, N_VISUAL_FEATURES),
                          torch.zeros(0, w, len(VISUAL_GROUPS), dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                          source)
    idx = torch.tensor(keep)
    return VisualRows(base[idx], torch.from_numpy(np.stack(vis_rows)), torch.from_numpy(np.stack(mask_rows)),
                      torch.from_numpy(split.gold_pos[keep].astype(np.int64)), source)


def _face_features(faces, years, cand_facts, groups, vis, mask, gi) -> None:
    """Fill one mention's face columns exactly as FeatureExtractor.visual_pair_features does."""
    from .pairs import VISUAL_FEATURES
    col = {name: i for i, name in enumerate(VISUAL_FEATURES)}
    for j, f in enumerate(cand_facts):
        if "face_sex" in groups and f.sex:
            v = face_sex_match(faces, f.sex)
            if v is not None:
                vis[j, col["face_sex_match"]], mask[j, gi["face_sex"]] = v, True
        if "face_age" in groups:
            v = face_age_gap(faces, years, f.birth)
            if v is not None:
                vis[j, col["face_age_gap"]], mask[j, gi["face_age"]] = v, True


@dataclass
class LinkerRow:
    """One mention through the linker's own path: its candidates, the head's base scores, its visual features."""
    example: object         # the mel.types.Example
    feats: object           # its mel.dim.features.MentionFeatures (one row: faces, cues...)
    idxs: np.ndarray        # (w,) candidate KB indices
    valid: np.ndarray       # (w,) bool, False on padding
    base: torch.Tensor      # (w,) the head's scores without visual terms (padding NOT masked)
    vis: np.ndarray         # (w, N_VISUAL_FEATURES)
    mask: np.ndarray        # (w, len(VISUAL_GROUPS)) bool


def linker_rows(linker, examples, groups) -> Iterator[LinkerRow]:
    """Each example's mention, one at a time, through the linker's candidates, features and faces, with the
    visual groups `groups` computed (none disabled)."""
    from .pipeline import candidate_batch
    linker.extractor.visual_features = tuple(groups)
    linker.extractor.disabled_visual = set()
    for ex in examples:
        ms = [ex.mention]
        feats = linker.extractor.mention_features(ms)
        pools = linker.generator.generate([m.text for m in ms], feats.context, feats.mention)
        cb = candidate_batch(ms, feats, pools, linker.extractor, linker.facts)
        with torch.inference_mode():
            m = linker.model.encode_mentions(**feats.tensors(linker.device))
            e = linker._entity_embeddings(cb.idxs, cb.valid)
            pair = torch.from_numpy(cb.pair) if linker.model.pair_mlp is not None else None
            # the base's own name-number term (0 for a caption without a regnal number), as the linker adds it
            base = linker.model.score_candidates(m, e, pair, numbers=linker._number_features(ms, cb.idxs, cb.valid))[0]
        vis, vmask = linker.extractor.visual_pair_features(ms, feats, cb.idxs, cb.valid)
        yield LinkerRow(ex, feats, cb.idxs[0], cb.valid[0], base, vis[0], vmask[0])


def real_rows(linker, examples, groups: list[str], source: str = "") -> VisualRows:
    """Mentions with a real photo, through the linker's own path (`linker_rows`); a mention whose gold is not
    among its candidates is left out."""
    parts = []
    for row in linker_rows(linker, examples, groups):
        gold = linker.kb.idx_of(row.example.gold_id)
        hits = np.flatnonzero((row.idxs == gold) & row.valid) if gold is not None else np.zeros(0, np.int64)
        if len(hits):
            base = row.base.masked_fill(~torch.from_numpy(row.valid), float("-inf"))
            parts.append((base, torch.from_numpy(row.vis), torch.from_numpy(row.mask), int(hits[0])))
    return _stack(parts, source)


def _stack(parts, source: str) -> VisualRows:
    if not parts:
        return VisualRows(torch.zeros(0, 1), torch.zeros(0, 1, N_VISUAL_FEATURES),
                          torch.zeros(0, 1, len(VISUAL_GROUPS), dtype=torch.bool), torch.zeros(0, dtype=torch.long), source)
    w = max(len(p[0]) for p in parts)
    n = len(parts)
    base = torch.full((n, w), float("-inf"))
    vis, mask = torch.zeros(n, w, N_VISUAL_FEATURES), torch.zeros(n, w, len(VISUAL_GROUPS), dtype=torch.bool)
    for i, (b, v, m, _) in enumerate(parts):
        base[i, :len(b)], vis[i, :len(b)], mask[i, :len(b)] = b, v, m
    return VisualRows(base, vis, mask, torch.tensor([p[3] for p in parts]), source)


# -- the head and the fit ---------------------------------------------------------------------------
def visual_head(base: DimFusion, groups: list[str]) -> DimFusion:
    """A head with `groups`' visual terms (zero) and every other parameter copied from `base`, frozen."""
    return extended_head(base, "visual.", visual_feature_names=tuple(groups))


def rows_loss(head: DimFusion, chunks: list[VisualRows]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the gold over the chunks' rows (base + visual terms) and the row count."""
    total, n = torch.zeros(()), 0
    for c in chunks:
        if len(c):
            scores = c.base + head.visual_scores(c.vis, c.mask)
            total = total + torch.nn.functional.cross_entropy(scores, c.gold, reduction="sum")
            n += len(c)
    return total, n


def fit_visual(head: DimFusion, chunks: list[VisualRows], l2: float, steps: int, lr: float = 1.0) -> DimFusion:
    """The visual weights only (biases stay 0), from zero, minimising the summed cross-entropy + l2 * |w|^2
    (a prior: a group seen on few rows, like image_text on the real photos, is shrunk more than one seen on
    many). The problem is convex in the weights; L-BFGS (strong Wolfe line search) for up to `steps` steps."""
    return fit_term(head, lambda: rows_loss(head, chunks)[0], sum(len(c) for c in chunks), l2, steps, lr)


def evaluate_rows(head: DimFusion | None, chunks: list[VisualRows]) -> dict:
    """Mean cross-entropy and Hits@1 of the gold, with the visual terms (head) or without (None)."""
    return gold_figures((c.base + (head.visual_scores(c.vis, c.mask) if head is not None else 0.0), c.gold)
                        for c in chunks if len(c))


def weights_of(head: DimFusion) -> dict:
    out = {}
    for g, layer in head.visual.items():
        w, b = layer.get_parameter("weight").detach().float(), layer.get_parameter("bias").detach().float()
        out[g] = {"w": [round(float(x), 4) for x in w.flatten()], "b": round(float(b.sum()), 4)}
    return out


# -- the stage ----------------------------------------------------------------------------------------
@dataclass
class VisualData:
    fit: list[VisualRows]          # the base's training records: simulated (per face rate) + real photos
    choose: list[VisualRows]       # the records the base held out: simulated (a face each) + real photos
    sims: dict                     # face rate -> simulated fit rows
    counts: dict


class VisualTrainer(FrozenBaseTrainer):
    """`VisualTrainer(config, base_dir, datasets, preset, error_model, out).run()`; `datasets` are
    `mel.dim.train.TrainingSet`s (train split only), featurised with the base head's recipe."""

    prefix, report_key = "visual.", "visual_terms"
    config: VisualTrainConfig

    def __init__(self, config: VisualTrainConfig, base_dir: str | Path, datasets, preset, error_model: FaceErrorModel,
                 out: str | Path, *, cache_dir: str | Path | None = None, progress: bool = False):
        super().__init__(config, base_dir, datasets, preset, out, cache_dir=cache_dir, progress=progress)
        self.em, self.groups = error_model, config.group_list()

    def term_weights(self, head: DimFusion) -> dict:
        return weights_of(head)

    def collect(self) -> VisualData:
        from .linker import DimLinker
        trainer = self.base_trainer(self.datasets)
        parts = trainer.prepare()
        cfg = self.config
        sims: dict = {r: [] for r in cfg.rate_list()}
        fit, choose, counts = [], [], {}
        for k, part in enumerate(parts):
            emb = frozen_entity_embeddings(self.base, part.table)
            facts = EntityFactsCache(part.kb)
            if part.ho is None:
                raise InputError(f"the base head held no {part.name} training records out (holdout 0): nothing to "
                                 f"choose the face rate and L2 on without dev; retrain the base with --holdout > 0")
            base_tr, base_ho = base_scores(self.base, part.tr, emb), base_scores(self.base, part.ho, emb)
            for rate in sims:
                rng = np.random.default_rng([cfg.seed, k, int(rate * 1e6)])
                sims[rate].append(simulate_rows(part.tr, part.train, base_tr, facts, self.em, rate, rng, self.groups,
                                                f"{part.name}/simulated"))
            rng = np.random.default_rng([cfg.seed + 1, k])
            choose.append(simulate_rows(part.ho, part.holdout, base_ho, facts, self.em, 1.0, rng, self.groups,
                                        f"{part.name}/held-out simulated"))
            n_sim_ho = len(choose[-1])
            photos_tr = [e for e in part.train if e.mention.image]
            photos_ho = [e for e in part.holdout if e.mention.image]
            if photos_tr or photos_ho:
                linker = DimLinker(part.kb, self.preset, checkpoint=self.base_dir)
                fit.append(real_rows(linker, photos_tr, self.groups, f"{part.name}/photos"))
                choose.append(real_rows(linker, photos_ho, self.groups, f"{part.name}/held-out photos"))
            counts[part.name] = {"train_rows": len(part.tr), "heldout_rows": len(part.ho), "photos_train": len(photos_tr),
                                 "photos_heldout": len(photos_ho), "simulated_heldout": n_sim_ho,
                                 "simulated_train": {str(r): len(s[-1]) for r, s in sims.items()}}
            print(f"[dim-visual] {part.name}: {json.dumps(counts[part.name])}", file=sys.stderr)
        return VisualData(fit, choose, sims, counts)

    def run(self, command: str = "") -> dict:
        t0, cfg = time.perf_counter(), self.config
        data = self.collect()
        grid = []
        for rate, sim in data.sims.items():
            for l2 in cfg.l2_list():
                head = fit_visual(visual_head(self.base, self.groups), sim + data.fit, l2, cfg.steps, cfg.lr)
                grid.append({"face_rate": rate, "l2": l2, "heldout": evaluate_rows(head, data.choose),
                             "weights": weights_of(head)})
                print(f"[dim-visual] {json.dumps(grid[-1])}", file=sys.stderr)
        best = min(grid, key=lambda g: (g["heldout"]["ce"], g["l2"], g["face_rate"]))
        head = fit_visual(visual_head(self.base, self.groups), data.sims[best["face_rate"]] + data.fit, best["l2"],
                          cfg.steps, cfg.lr)
        diagnostic = fit_visual(visual_head(self.base, self.groups), data.choose, best["l2"], cfg.steps, cfg.lr)
        report = {"groups": self.groups, "config": asdict(cfg), "chosen": {"face_rate": best["face_rate"], "l2": best["l2"]},
                  "chosen_on": "the base head's held-out training records (a simulated face each) + their photos",
                  "heldout_without_visual_terms": evaluate_rows(None, data.choose),
                  "heldout_with_visual_terms": evaluate_rows(head, data.choose),
                  "photos_fit": evaluate_rows(head, data.fit), "photos_fit_without": evaluate_rows(None, data.fit),
                  "simulated_fit": evaluate_rows(head, data.sims[best["face_rate"]]),
                  "simulated_fit_without": evaluate_rows(None, data.sims[best["face_rate"]]),
                  "grid": grid, "diagnostic_fit_on_heldout_rows": weights_of(diagnostic), "counts": data.counts, "error_model": asdict(self.em), "command": command,
                  "base": str(self.base_dir), "seconds": round(time.perf_counter() - t0, 1)}
        self.save(head, report)
        return report


# -- CLI: `python -m mel train dim-visual` ------------------------------------------------------------
CONFIG = VisualTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    frozen_terms.add_arguments(p, "each dataset's KB, comma-separated, in --data's order",
                               ("--error-model", "JSON of the face error model (bench/face_error_model.py)"))


def run(args) -> None:
    from ..cli_kit import config_from_args
    config = config_from_args(VisualTrainConfig, args)
    if not (Path(args.base) / "config.json").is_file():
        raise InputError(f"--base {args.base}: no DIM head there (config.json missing)")
    em = FaceErrorModel.load(args.error_model)
    preset, datasets = frozen_terms.load_training_sets(args)
    trainer = VisualTrainer(config, args.base, datasets, preset, em, args.out, cache_dir=args.cache_dir,
                            progress=not args.quiet)
    report = trainer.run(command=getattr(args, "command_line", ""))
    frozen_terms.print_summary(args, report, "visual_terms",
                               ("chosen", "heldout_without_visual_terms", "heldout_with_visual_terms"))
