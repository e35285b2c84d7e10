"""Train DIM's fusion head (N-pair loss, in-batch + hard negatives) on frozen, cached features.

    python -m mel train dim --format wikimel --data DIR --kb wikimel.sqlite --preset offline --out runs/dim
    python -m mel train dim --format wikimel,richpedia --data DIR1,DIR2 --kb wikimel.sqlite,richpedia.sqlite \
        --preset offline --out runs/dim-joint      # one head for several datasets, each with its own KB

    trainer = DimTrainer(DimTrainConfig(epochs=4), kb, preset, "runs/dim", train=examples, dev=dev_examples)
    trainer = DimTrainer(config, None, preset, "runs/dim-joint", datasets=[TrainingSet("wikimel", kb1, train1, dev1),
                                                                           TrainingSet("richpedia", kb2, train2, dev2)])
    result = trainer.run(resume=False)      # the CLI is a thin shell over this; flags = DimTrainConfig's fields

Same conventions as the GEMEL trainer: AdamW, linear warm-up, gradient clipping, a fixed seed,
a progress bar, `--resume` (state in the sibling OUT.trainer_state/: the last epoch's float32 weights,
the optimizer and the run's facts, published together after every epoch and removed after a finished
run unless --keep-state), and a checkpoint directory (config.json + model.safetensors) holding the best
epoch, published after the state that records it (see mel/training/checkpoint.py: a run killed at any
instant resumes to the same weights). The best epoch is chosen on held-out TRAINING records
(`--holdout`, 5% by default), so the dev figures it reports were not tuned on. The encoders are
frozen, so every feature (mention vectors, candidate pools, hard negatives, pair features) is
computed once and cached on disk as safetensors under a key that hashes what it depends on;
epochs then take about a minute on a CPU.

The figures printed each epoch are the linker's whole-KB Hits@k on the cached features (the same
candidates and scores `python -m mel eval --linker dim` computes; a gold outside the candidate
pool is a miss).

A joint head (several datasets): each dataset's mentions are featurised against ITS OWN KB (candidate
pools, FTS hard negatives, pair features; cached per dataset as for one), each KB keeps its own
entity table, and a batch holds one dataset's mentions (the batches of all datasets interleaved at
random), so candidates and in-batch negatives are always rows of the batch's own KB. 5% of each
dataset's training records are held out; the epoch is chosen on the mean of their held-out Hits@1
(each dataset counts the same), and config.json records each dataset, its KB and its figures.
The pair features are per-mention or per-entity quantities (BM25 divided by the mention's best
score, reciprocal ranks, cosines of the frozen encoders), so they mean the same in every KB.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..paths import cache_dir as default_cache_dir
from ..training import (
    TrainConfig,
    check_checkpoint_target,
    check_number,
    check_whole,
    load_config,
    load_training_state,
    make_optimizer_and_scheduler,
    read_training_state,
    recover_training_dirs,
    remove_written,
    save_training_state,
    seed_everything,
)
from ..training.checkpoint import STATE_FILE
from ..types import Example
from .candidates import CandidateConfig, CandidateGenerator, candidate_recall, hard_negatives
from .features import FeatureExtractor, MentionFeatures
from .loss import candidate_n_pair_loss, in_batch_n_pair_loss
from .model import DimFusion, FusionConfig
from .pairs import N_PAIR_FEATURES, PAIR_FEATURES
from .pipeline import EntityFactsCache, candidate_batch, score

log = logging.getLogger(__name__)
FEATURE_CACHE_VERSION = 1  # bump when feature extraction or pair features change meaning
SAVE_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # DimTrainConfig.save_dtype
STATE_SUFFIX = ".trainer_state"  # OUT.trainer_state/: resumable state, never shipped (git-ignored under models/)


@dataclass
class DimTrainConfig(TrainConfig):
    """DIM's head is small and trained from scratch: a larger lr and batch than GEMEL's mapper. Every
    field is a flag of `python -m mel train dim` (`n_hard` -> `--n-hard`; `image` -> `--no-image`)."""

    lr: float = 5e-4
    epochs: int = 8
    batch_size: int = 64
    grad_accum: int = 1
    n_hard: int = field(default=16, metadata={"help": "FTS neighbours of the gold used as hard negatives"})
    train_width: int = field(default=48, metadata={"help": "candidates scored per training mention: gold + hard "
                                                           "+ sampled pool"})
    train_pool: int = field(default=96, metadata={"help": "candidates cached per training mention"})
    in_batch_weight: float = field(default=0.5, metadata={"help": "weight of the in-batch N-pair term "
                                                                  "(embedding part only)"})
    holdout: float = field(default=0.05, metadata={"help": "share of training records held out to pick the best "
                                                           "epoch (0: pick on dev)"})
    # the candidate generator (mel.dim.candidates.CandidateConfig)
    n_bm25: int = CandidateConfig.n_bm25
    n_dense: int = CandidateConfig.n_dense
    n_dense_mention: int = CandidateConfig.n_dense_mention
    # the head (mel.dim.model.FusionConfig)
    d_model: int = FusionConfig.d_model
    n_heads: int = FusionConfig.n_heads
    ffn_dim: int = FusionConfig.ffn_dim
    out_dim: int = FusionConfig.out_dim
    dropout: float = FusionConfig.dropout
    pair_features: bool = field(default=True, metadata={"help": "pair features beside the cosine "
                                                                "(--no-pair-features: the paper's head)"})
    image: bool = field(default=True, metadata={"help": "use images (--no-image: never, masked)"})
    cue: bool = field(default=True, metadata={"help": "use expert cues (--no-cue: never, masked)"})
    cue_question: str | None = field(default=None, metadata={"help": "question for question-answering cue "
                                                                     "providers"})
    save_dtype: Literal["float16", "float32"] = field(
        default="float16", metadata={"help": "dtype of the weights written to OUT (the resumable state stays float32)"})

    def __post_init__(self):
        super().__post_init__()
        check_whole(self, n_hard=0, train_width=2)
        check_number(self, in_batch_weight=(0.0, None))


# what a resumed run must keep (with the features file, the head config and holdout); epochs and
# max_steps may grow
RESUMABLE_RECIPE = tuple(f.name for f in fields(TrainConfig) if f.name not in ("epochs", "max_steps")) + (
    "n_hard", "train_width", "in_batch_weight")


# -- cached features --------------------------------------------------------------------------------
@dataclass
class SplitFeatures:
    feats: MentionFeatures
    cand: np.ndarray      # (n, w) KB rows, -1 padding
    valid: np.ndarray     # (n, w) bool
    pair: np.ndarray      # (n, w, f)
    gold: np.ndarray      # (n,) KB row of the gold, -1 when the gold is not in the KB
    gold_pos: np.ndarray  # (n,) column of the gold in `cand`, -1 when absent
    n_hard: np.ndarray    # (n,) how many of the first columns after the gold are FTS neighbours (train only)

    def __len__(self) -> int:
        return len(self.gold)


def _cache_key(examples, kb, preset, ccfg: CandidateConfig, extra: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": FEATURE_CACHE_VERSION, "kb": [kb.size, kb.meta.get("created"), kb.meta.get("text_encoder")],
                         "preset": [preset.text_encoder, preset.image_encoder, preset.cue],
                         "candidates": asdict(ccfg), "pairs": PAIR_FEATURES, **extra}, sort_keys=True).encode())
    for ex in examples:
        m = ex.mention
        h.update(json.dumps([ex.sample_id, m.caption, m.start, m.end, m.image, ex.gold_id]).encode())
    return h.hexdigest()[:20]


def _save_split(path: Path, s: SplitFeatures) -> None:
    from safetensors.numpy import save_file
    f = s.feats
    tensors = {"context": f.context, "mention": f.mention, "image": f.image, "image_mask": f.image_mask.astype(np.uint8),
               "cue": f.cue, "cue_mask": f.cue_mask.astype(np.uint8), "cand": s.cand, "valid": s.valid.astype(np.uint8),
               "pair": s.pair, "gold": s.gold, "gold_pos": s.gold_pos, "n_hard": s.n_hard}
    part = path.with_name(path.name + ".part")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(part),
              metadata={"cues": json.dumps(f.cues)})
    part.replace(path)


def _load_split(path: Path) -> SplitFeatures:
    from safetensors import safe_open
    from safetensors.numpy import load_file
    t = load_file(str(path))
    with safe_open(str(path), framework="numpy") as fh:
        cues = json.loads((fh.metadata() or {}).get("cues", "[]"))
    feats = MentionFeatures(t["context"], t["mention"], t["image"], t["image_mask"].astype(bool), t["cue"],
                            t["cue_mask"].astype(bool), cues, [None] * len(t["gold"]))
    return SplitFeatures(feats, t["cand"], t["valid"].astype(bool), t["pair"], t["gold"], t["gold_pos"], t["n_hard"])


def build_split_features(examples, kb, extractor: FeatureExtractor, generator: CandidateGenerator, *, training: bool,
                         n_hard: int, width: int | None, batch_size: int = 256, progress: bool = True) -> SplitFeatures:
    """Features for every example. Training rows put the gold in column 0, then `n_hard` FTS
    neighbours of the gold, then the generator's pool; dev rows hold the pool as the linker sees it."""
    from tqdm.auto import tqdm

    facts = EntityFactsCache(kb)
    parts = []
    bar = tqdm(total=len(examples), desc="features (train)" if training else "features (dev)", disable=not progress,
               unit=" mention")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        mentions = [ex.mention for ex in chunk]
        feats = extractor.mention_features(mentions)
        pools = generator.generate([m.text for m in mentions], feats.context, feats.mention)
        golds = [kb.idx_of(ex.gold_id) for ex in chunk]
        hard_counts = []
        if training:
            lists = []
            for pool, gold in zip(pools, golds, strict=True):
                hard = hard_negatives(kb, gold, n_hard) if gold is not None else []
                hard_counts.append(len(hard))
                rest = [i for i in pool.idxs if i != gold and i not in set(hard)]
                lists.append(([gold] if gold is not None else []) + hard + rest)
            # keep the pools' BM25/dense evidence: the pair features must match inference
            for pool, ordered in zip(pools, lists, strict=True):
                pool.idxs = ordered
        else:
            hard_counts = [0] * len(chunk)
        cb = candidate_batch(mentions, feats, pools, extractor, facts, width=width)
        gold_pos = []
        for row, gold in enumerate(golds):
            hits = np.flatnonzero(cb.idxs[row] == gold) if gold is not None else []
            gold_pos.append(int(hits[0]) if len(hits) else -1)
        parts.append((feats, cb, np.array([g if g is not None else -1 for g in golds], np.int64),
                      np.array(gold_pos, np.int64), np.array(hard_counts, np.int64)))
        bar.update(len(chunk))
    bar.close()
    w = max(p[1].width for p in parts)

    def pad(a, fill):
        if a.shape[1] == w:
            return a
        shape = (a.shape[0], w - a.shape[1]) + a.shape[2:]
        return np.concatenate([a, np.full(shape, fill, a.dtype)], axis=1)

    feats = MentionFeatures(*(np.concatenate([getattr(p[0], name) for p in parts]) for name in
                              ("context", "mention", "image", "image_mask", "cue", "cue_mask")),
                            [c for p in parts for c in p[0].cues], [n for p in parts for n in p[0].notes])
    return SplitFeatures(feats, np.concatenate([pad(p[1].idxs, -1) for p in parts]),
                         np.concatenate([pad(p[1].valid, False) for p in parts]),
                         np.concatenate([pad(p[1].pair, 0.0) for p in parts]),
                         np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                         np.concatenate([p[4] for p in parts]))


def cached_split_features(examples, kb, preset, extractor, generator, *, training, n_hard, width, cache, progress):
    key = _cache_key(examples, kb, preset, generator.config,
                     {"training": training, "n_hard": n_hard, "width": width, "use_image": extractor.use_image,
                      "use_cue": extractor.use_cue, "cue_question": extractor.cue_question})
    path = Path(cache) / f"{'train' if training else 'eval'}-{key}.safetensors"
    if path.exists():
        log.info("using cached features %s", path)
        return _load_split(path), path
    s = build_split_features(examples, kb, extractor, generator, training=training, n_hard=n_hard, width=width,
                             progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_split(path, s)
    return s, path


# -- training -----------------------------------------------------------------------------------------
class EntityTable:
    """Entity-side frozen features for the whole KB, gathered by row (the KB's text index)."""

    def __init__(self, extractor: FeatureExtractor, kb_size: int):
        self.text = torch.from_numpy(np.ascontiguousarray(extractor.entity_text_features(range(kb_size))))
        img, mask = extractor.entity_image_features(range(kb_size))
        self.has_images = bool(mask.any())
        self.image = torch.from_numpy(img) if self.has_images else None
        self.image_mask = torch.from_numpy(mask)
        self.image_dim = extractor.image_dim

    def gather(self, idxs: torch.Tensor):
        safe = idxs.clamp_min(0)
        text = self.text[safe]
        if self.has_images:
            image, mask = self.image[safe], self.image_mask[safe] & (idxs >= 0)
        else:
            image = torch.zeros(*idxs.shape, self.image_dim)
            mask = torch.zeros(idxs.shape, dtype=torch.bool)
        return text, image, mask


def _mention_tensors(f: MentionFeatures, rows: np.ndarray) -> dict:
    return f.rows(rows).tensors()


def sample_training_columns(s: SplitFeatures, rows: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """Per row: the gold column, all hard-negative columns, and random pool columns up to `width`."""
    out = np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        n_valid = int(s.valid[row].sum())
        fixed = list(range(min(n_valid, 1 + int(s.n_hard[row]))))  # gold + FTS neighbours
        rest = np.arange(len(fixed), n_valid)
        take = min(len(rest), width - len(fixed))
        cols = fixed[:width] + (rng.choice(rest, size=take, replace=False).tolist() if take > 0 else [])
        cols += [s.valid.shape[1] - 1] * (width - len(cols))  # padding slots (masked below)
        out[r] = cols
    return out


def evaluate_split(model: DimFusion, s: SplitFeatures, table: EntityTable, batch_size: int = 256) -> dict:
    """Whole-KB Hits@k / MRR over the cached pools (a gold outside the pool is a miss)."""
    model.eval()
    ranks = []
    with torch.inference_mode():
        for start in range(0, len(s), batch_size):
            rows = np.arange(start, min(start + batch_size, len(s)))
            idxs = torch.from_numpy(s.cand[rows])
            valid = torch.from_numpy(s.valid[rows])
            text, image, mask = table.gather(idxs)
            scores, _, _ = score(model, _mention_tensors(s.feats, rows), text, image, mask,
                                 torch.from_numpy(s.pair[rows]), valid)
            scores = scores.numpy()
            for r, row in enumerate(rows):
                gp = s.gold_pos[row]
                if gp < 0:
                    ranks.append(None)
                    continue
                ranks.append(int((scores[r] > scores[r, gp]).sum()) + 1)
    n = len(ranks)
    out = {f"hits@{k}": round(sum(1 for r in ranks if r is not None and r <= k) / n, 4) for k in (1, 5, 10, 20)}
    out["mrr"] = round(sum(1.0 / r for r in ranks if r) / n, 4)
    out["n"] = n
    return out


@dataclass
class TrainingSet:
    """One dataset of a training run: its mentions and the KB they link against. A joint run takes
    several (`python -m mel train dim --format a,b --data A,B --kb a.sqlite,b.sqlite`); each is
    featurised against its own KB (candidates, hard negatives, pair features, entity table)."""

    name: str
    kb: Any
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # what the examples are (dataset, split), recorded in config.json


@dataclass
class DatasetPart:
    """A TrainingSet inside the trainer: its held-out records split off and, once `prepare`d, its
    cached features (rows index ITS KB) and its KB's entity table."""

    name: str
    kb: Any
    data: dict
    train: list[Example]
    holdout: list[Example]
    dev: list[Example]
    extractor: FeatureExtractor | None = None
    tr: SplitFeatures | None = None
    tr_path: Path | None = None
    ho: SplitFeatures | None = None
    dv: SplitFeatures | None = None
    table: EntityTable | None = None
    recall: dict = field(default_factory=dict)


def mean_figures(per_dataset: dict[str, dict]) -> dict:
    """The unweighted mean of each dataset's Hits@k / MRR (each dataset counts the same), n summed."""
    keys = [k for k in next(iter(per_dataset.values())) if k != "n"]
    out = {k: round(float(np.mean([f[k] for f in per_dataset.values()])), 4) for k in keys}
    return {**out, "n": sum(f["n"] for f in per_dataset.values()), "mean_over": list(per_dataset)}


class DimTrainer:
    """DIM's head training: `DimTrainer(config, kb, preset, out, train=examples, dev=examples).run(resume=...)`,
    or on several datasets at once: `DimTrainer(config, None, preset, out, datasets=[TrainingSet(...), ...])`.

    The training mentions whose gold is not in their KB are skipped, `config.holdout` of each
    dataset's training records is held out to choose the epoch (on the mean held-out Hits@1 over the
    datasets), and every feature is cached under `cache_dir`, per dataset; `run()` trains, publishes
    the best epoch's head to `out` and returns the history. A batch holds the mentions of ONE dataset
    (the batches of the datasets are interleaved), so its candidates and in-batch negatives all come
    from that dataset's KB: the same entity in two KBs is never its own negative."""

    def __init__(self, config: DimTrainConfig, kb, preset, out: str | Path, *, train: list[Example] | None = None,
                 dev: list[Example] = (), datasets: list[TrainingSet] | None = None,
                 state_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 data: dict | None = None, progress: bool = True):
        if datasets is None:
            if kb is None or train is None:
                raise InputError("DimTrainer needs kb and train (one dataset) or datasets=[TrainingSet, ...]")
            data = data or {}
            datasets = [TrainingSet(data.get("dataset") or kb.path.stem, kb, list(train), list(dev), data)]
        elif kb is not None or train is not None:
            raise InputError("give DimTrainer either kb/train/dev or datasets, not both")
        names = [d.name for d in datasets]
        if not datasets or len(set(names)) < len(names):
            raise InputError(f"DimTrainer needs datasets with distinct names, got {names}")
        self.config, self.preset = config, preset
        self.out = check_checkpoint_target(out)
        self.state_dir = check_checkpoint_target(state_dir) if state_dir else self.out.with_name(self.out.name + STATE_SUFFIX)
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir("dim-features")
        # what the examples are (dataset, split), recorded in config.json
        self.data = data if data is not None else datasets[0].data if len(datasets) == 1 else {
            "dataset": ",".join(names), "split": ",".join(dict.fromkeys(str(d.data.get("split", "")) for d in datasets))}
        self.progress = progress
        seed_everything(config.seed)
        self.parts = [self._part(d) for d in datasets]

    def _part(self, d: TrainingSet) -> DatasetPart:
        in_kb = [ex for ex in d.train if ex.gold_id in d.kb]
        if not in_kb:
            raise InputError(f"none of the {len(d.train)} training mentions of {d.name} has its gold entity in "
                             f"{d.kb.path.name}: is it the KB of this dataset?")
        if len(in_kb) < len(d.train):
            print(f"[dim] {self._label(d.name)}{len(d.train) - len(in_kb)} training mentions have no gold in the KB and "
                  f"are skipped", file=sys.stderr)
        train, holdout = split_holdout(in_kb, self.config.holdout, self.config.seed)
        return DatasetPart(d.name, d.kb, d.data, train, holdout, list(d.dev))

    @property
    def joint(self) -> bool:
        return len(self.parts) > 1

    def _label(self, name: str) -> str:
        return f"{name}: " if getattr(self, "parts", None) and self.joint else ""

    def head_config(self, extractor: FeatureExtractor) -> FusionConfig:
        c, pair = self.config, self.config.pair_features
        return FusionConfig(text_dim=extractor.text_dim, image_dim=extractor.image_dim, cue_dim=extractor.text_dim,
                            d_model=c.d_model, n_heads=c.n_heads, ffn_dim=c.ffn_dim, out_dim=c.out_dim,
                            dropout=c.dropout, n_pair_features=N_PAIR_FEATURES if pair else 0,
                            text_encoder=self.preset.text_encoder, image_encoder=self.preset.image_encoder,
                            cue_provider=self.preset.cue, pair_feature_names=PAIR_FEATURES if pair else ())

    def fingerprint(self, features_file: str, fcfg: FusionConfig) -> str:
        """What a resumed run must share with the one that saved the state (epochs and max_steps may grow)."""
        recipe = {k: v for k, v in asdict(self.config).items() if k in RESUMABLE_RECIPE}
        return hashlib.sha256(json.dumps([features_file, asdict(fcfg), recipe, self.config.holdout],
                                         sort_keys=True, default=str).encode()).hexdigest()[:16]

    def candidate_config(self) -> CandidateConfig:
        cfg = self.config
        return CandidateConfig(n_bm25=cfg.n_bm25, n_dense=cfg.n_dense, n_dense_mention=cfg.n_dense_mention)

    def prepare(self) -> list[DatasetPart]:
        """Every dataset's (cached) features against its own KB, its dev candidate recall and its KB's
        entity table; returns the parts (also `self.parts`)."""
        cfg, ccfg = self.config, self.candidate_config()
        for part in self.parts:
            part.extractor = FeatureExtractor(part.kb, self.preset, use_image=cfg.image, use_cue=cfg.cue,
                                              cue_question=cfg.cue_question)
            part.tr, part.tr_path, part.dv, part.ho = self._split_features(part, CandidateGenerator(part.kb, ccfg))
            part.recall = self._dev_candidate_recall(part)
        dims = {(p.extractor.text_dim, p.extractor.image_dim) for p in self.parts}
        if len(dims) > 1:
            raise InputError(f"the datasets' features differ in size {sorted(dims)}: use one preset for all KBs")
        for part in self.parts:
            part.table = EntityTable(part.extractor, part.kb.size)
        return self.parts

    def run(self, resume: bool = False, keep_state: bool = False, command: str = "") -> dict:
        cfg, out, state_dir = self.config, self.out, self.state_dir
        parts = self.prepare()
        fcfg = self.head_config(parts[0].extractor)
        model = DimFusion(fcfg)
        n_batches = sum(math.ceil(len(p.tr) / cfg.batch_size) for p in parts)
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
        optimizer, scheduler = make_optimizer_and_scheduler(model.parameters(), cfg, total)

        fingerprint = self.fingerprint("+".join(p.tr_path.name for p in parts), fcfg)
        for line in recover_training_dirs(out, state_dir):  # finish or undo a save that a kill cut short
            print(f"[dim] {line}", file=sys.stderr)
        step, start_epoch, best, history = 0, 0, {"hits@1": -1.0}, []
        run_id = uuid.uuid4().hex[:12]  # names this run's saves: OUT and the state must come from the same one
        if resume:
            info = self._resume(fingerprint, model, optimizer, scheduler)
            step, start_epoch, best, history = info["step"], info["epoch"], info.get("best", best), info.get("history", [])
            run_id = info.get("run_id", run_id)

        # the epoch is chosen on held-out TRAINING mentions (mean Hits@1 over the datasets), so the dev
        # figures stay untuned
        selected_on = ("heldout" if any(p.ho is not None for p in parts)
                       else "dev" if any(p.dv is not None for p in parts) else None)
        for epoch in range(start_epoch, cfg.epochs):
            step, losses = self._train_epoch(model, optimizer, scheduler, epoch, step)
            entry = {"epoch": epoch + 1, "step": step, "loss": round(float(np.mean(losses)), 4), **self._evaluate(model)}
            history.append(entry)
            self._print_epoch(entry)
            metric = entry[selected_on]["hits@1"] if selected_on else -entry["loss"]
            extra = self._checkpoint_facts(entry, selected_on, epoch, command, run_id)
            improved = metric > best.get("hits@1", -1.0) or selected_on is None
            if improved:
                best = {"hits@1": metric, "epoch": epoch + 1}
            # the state first (weights, optimizer, epoch and which epoch OUT holds, in one rename), then OUT:
            # a kill in between leaves OUT behind the state, and a resume publishes it again from the state
            save_training_state(state_dir, optimizer, scheduler,
                                {"step": step, "epoch": epoch + 1, "best": best, "history": history,
                                 "fingerprint": fingerprint, "run_id": run_id}, module=model, config=fcfg, extra=extra)
            if improved:
                _publish_best(model, out, extra, cfg.save_dtype)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        if not keep_state:  # a finished run needs no resumable state (it is 3x the head's size)
            remove_written(state_dir)
        print(f"[dim] best epoch {best.get('epoch')} ({selected_on} hits@1 {best.get('hits@1')}); head written to {out}",
              file=sys.stderr)
        recall = parts[0].recall if not self.joint else {p.name: p.recall for p in parts}
        return {"best": best, "history": history, "out": str(out), "dev_candidate_recall": recall}

    def _evaluate(self, model: DimFusion) -> dict:
        """This epoch's held-out and dev figures: one dataset's as they are; for several, the mean over the
        datasets as "heldout" / "dev" and each dataset's under "by_dataset"."""
        by_dataset = {}
        for p in self.parts:
            figures = {}
            if p.ho is not None:
                figures["heldout"] = evaluate_split(model, p.ho, p.table)
            if p.dv is not None:
                figures["dev"] = evaluate_split(model, p.dv, p.table)
            by_dataset[p.name] = figures
        if not self.joint:
            return by_dataset[self.parts[0].name]
        entry: dict = {}
        for split in ("heldout", "dev"):
            per = {name: f[split] for name, f in by_dataset.items() if split in f}
            if per:
                entry[split] = mean_figures(per)
        entry["by_dataset"] = by_dataset
        return entry

    def _print_epoch(self, entry: dict) -> None:
        print(f"[dim] {json.dumps({k: v for k, v in entry.items() if k != 'by_dataset'})}", file=sys.stderr)
        for name, figures in entry.get("by_dataset", {}).items():
            said = ", ".join(f"{split} hits@1 {f['hits@1']:.4f} mrr {f['mrr']:.4f} (n={f['n']})"
                             for split, f in figures.items())
            print(f"[dim]   epoch {entry['epoch']} {name}: {said}", file=sys.stderr)

    def _checkpoint_facts(self, entry: dict, selected_on: str | None, epoch: int, command: str, run_id: str) -> dict:
        """What config.json records beside the weights (one dataset: as before; several: each one's KB,
        sizes and figures under "datasets")."""
        cfg, parts = self.config, self.parts
        extra = {"dev": entry.get("dev", {}), "heldout": entry.get("heldout", {}), "selected_on": selected_on,
                 "dev_candidate_recall": parts[0].recall if not self.joint else {p.name: p.recall for p in parts},
                 "epoch": epoch + 1, "train": {**asdict(cfg), "n_train": sum(len(p.tr) for p in parts), **self.data},
                 "candidates": asdict(self.candidate_config()),
                 "kb": ({"path": parts[0].kb.path.name, "size": parts[0].kb.size} if not self.joint
                        else [{"path": p.kb.path.name, "size": p.kb.size} for p in parts]),
                 "preset": self.preset.name, "command": command, "run_id": run_id}
        if self.joint:
            by_dataset = entry.get("by_dataset", {})
            extra["datasets"] = [{"name": p.name, **p.data, "kb": {"path": p.kb.path.name, "size": p.kb.size},
                                  "n_train": len(p.tr), "n_heldout": len(p.holdout), **by_dataset.get(p.name, {}),
                                  "dev_candidate_recall": p.recall} for p in parts]
        return extra

    def _split_features(self, part: DatasetPart, generator: CandidateGenerator):
        """The (cached) features of one dataset's training, dev and held-out mentions, against its own KB:
        (train, train cache path, dev or None, held-out or None)."""
        cfg, t0 = self.config, time.perf_counter()

        def features(examples, training: bool):
            return cached_split_features(examples, part.kb, self.preset, part.extractor, generator, training=training,
                                         n_hard=cfg.n_hard if training else 0, width=cfg.train_pool if training else None,
                                         cache=self.cache, progress=self.progress)

        tr, tr_path = features(part.train, training=True)
        dv = features(part.dev, training=False)[0] if part.dev else None
        ho = features(part.holdout, training=False)[0] if part.holdout else None
        print(f"[dim] {self._label(part.name)}features: train {len(tr)} x {tr.cand.shape[1]} candidates, held-out "
              f"{len(ho) if ho else 0}, dev {len(dv) if dv else 0} "
              f"({time.perf_counter() - t0:.0f} s; cache {tr_path.parent})", file=sys.stderr)
        return tr, tr_path, dv, ho

    def _dev_candidate_recall(self, part: DatasetPart) -> dict:
        dv = part.dv
        if dv is None:
            return {}
        dev_pool = [s[v].tolist() for s, v in zip(dv.cand, dv.valid, strict=True)]
        recall = candidate_recall(dev_pool, [g if g >= 0 else None for g in dv.gold])
        print(f"[dim] {self._label(part.name)}dev candidate recall: {recall}", file=sys.stderr)
        return recall

    def _resume(self, fingerprint: str, model: DimFusion, optimizer, scheduler) -> dict:
        """Load the saved state into `model`, `optimizer` and `scheduler` (and publish its best epoch to OUT
        again when a kill left OUT behind); returns the state's info (step, epoch, best, history, run_id)."""
        out, state_dir = self.out, self.state_dir
        if not (state_dir / STATE_FILE).exists():
            old_layout = (state_dir / "optimizer" / STATE_FILE).exists()
            raise CheckpointError(f"nothing to resume for {out}: " + (
                f"{state_dir} was saved by an older version (last/ and optimizer/ apart), which cannot be resumed "
                f"safely" if old_layout else f"{state_dir / STATE_FILE} is missing (the run finished, or never "
                f"saved an epoch)") + "; start without --resume")
        if read_training_state(state_dir).get("fingerprint") != fingerprint:
            raise CheckpointError(f"{state_dir} was saved by a run with other data or settings; resume with the "
                                  f"same arguments (except --epochs), or start without --resume")
        info = load_training_state(state_dir, optimizer, scheduler, module=model)
        _republish_best(model, out, state_dir, info, self.config.save_dtype)
        print(f"[dim] resumed at epoch {info['epoch']}, step {info['step']}", file=sys.stderr)
        return info

    def _epoch_batches(self, rng: np.random.Generator) -> list[tuple[DatasetPart, np.ndarray]]:
        """This epoch's batches: each dataset's training rows shuffled and cut into batches; with several
        datasets the batches are then interleaved at random, each holding one dataset's mentions."""
        bs = self.config.batch_size
        batches = []
        for part in self.parts:
            order = rng.permutation(len(part.tr))
            batches += [(part, order[start:start + bs]) for start in range(0, len(order), bs)]
        if self.joint:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def _train_epoch(self, model: DimFusion, optimizer, scheduler, epoch: int, step: int) -> tuple[int, list[float]]:
        """One epoch over the training features (stops early at `max_steps`); returns (step, losses)."""
        from tqdm.auto import tqdm

        cfg = self.config
        # per-epoch seeds: a resumed run samples exactly what an uninterrupted one would have
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        batches = self._epoch_batches(rng)
        losses: list[float] = []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.progress)
        for i, (part, rows) in enumerate(bar):
            loss = self._batch_loss(model, part, rows, rng)
            (loss / cfg.grad_accum).backward()
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        bar.close()
        return step, losses

    def _batch_loss(self, model: DimFusion, part: DatasetPart, rows: np.ndarray, rng: np.random.Generator):
        """The N-pair loss of one batch of `part`'s training rows, its candidates gathered from its own KB."""
        cfg, tr = self.config, part.tr
        cols = sample_training_columns(tr, rows, cfg.train_width, rng)
        idxs = torch.from_numpy(np.take_along_axis(tr.cand[rows], cols, 1))
        valid = torch.from_numpy(np.take_along_axis(tr.valid[rows], cols, 1))
        # a padding column may repeat; keep each real column once
        valid &= torch.from_numpy(_first_occurrence(cols))
        pair = torch.from_numpy(np.take_along_axis(tr.pair[rows], cols[..., None], 1))
        gold_pos = torch.zeros(len(rows), dtype=torch.long)  # column 0 is the gold by construction
        gold_pos[torch.from_numpy(tr.gold_pos[rows] < 0)] = -1
        text, image, mask = part.table.gather(idxs)
        scores, m, e = score(model, _mention_tensors(tr.feats, rows), text, image, mask, pair, valid)
        loss = candidate_n_pair_loss(scores, gold_pos, valid)
        if cfg.in_batch_weight > 0 and len(rows) > 1:
            loss = loss + cfg.in_batch_weight * in_batch_n_pair_loss(model.in_batch_scores(m, e[:, 0]),
                                                                     torch.from_numpy(tr.gold[rows]))
        return loss


def _publish_best(model: DimFusion, out: Path, extra: dict, save_dtype: str) -> None:
    # float16 storage halves the file (DIM's 512/2048 head: 23 MB -> 12 MB); it loads back
    # into float32 parameters, and the resumable copy in the state stays float32
    shipped = copy.deepcopy(model).to(SAVE_DTYPES[save_dtype])
    shipped.save_pretrained(out, extra={**extra, "weights_dtype": save_dtype})


def _republish_best(model: DimFusion, out: Path, state_dir: Path, info: dict, save_dtype: str) -> None:
    """On resume: OUT must hold the best epoch the state records. A kill after the state was published
    and before OUT was leaves it older (or missing); the state then holds that epoch's weights."""
    want = info.get("best", {}).get("epoch")
    try:
        payload = load_config(out) if (out / "model.safetensors").exists() else {}
    except CheckpointError:
        payload = {}
    if want is None or (payload.get("run_id"), payload.get("epoch")) == (info.get("run_id"), want):
        return
    if want != info["epoch"]:
        held = f"epoch {payload['epoch']} of run {payload.get('run_id')}" if "epoch" in payload else "no checkpoint"
        raise CheckpointError(f"{out} should hold epoch {want} of run {info.get('run_id')}, the best one, but holds "
                              f"{held}, and {state_dir} keeps only epoch {info['epoch']}; start without --resume")
    payload = load_config(state_dir)
    extra = {k: v for k, v in payload.items() if k not in ("model_type", "config")}
    _publish_best(model, out, extra, save_dtype)
    print(f"[dim] {out} published again from {state_dir} (epoch {want})", file=sys.stderr)


def split_holdout(examples, fraction: float, seed: int):
    """(train, held-out): `fraction` of the training RECORDS (all mentions of one caption go to the
    same side, so a caption never leaks across) held out to choose the epoch."""
    if not fraction:
        return list(examples), []
    if not 0 < fraction < 0.5:
        raise InputError(f"--holdout must be between 0 and 0.5, got {fraction}")
    records = sorted({ex.sample_id.split("#")[0] for ex in examples})
    held = set(random.Random(seed).sample(records, max(1, round(fraction * len(records)))))
    return ([ex for ex in examples if ex.sample_id.split("#")[0] not in held],
            [ex for ex in examples if ex.sample_id.split("#")[0] in held])


def heldout_examples(payload: dict, examples, fmt: str, split: str, kb) -> list[Example] | None:
    """The examples of the training records a head (`payload`: its config.json) held out and never trained
    on, when `fmt`/`split` is (one of) the data it was trained on; None when it was not (all are unseen).

    `examples`: the split as evaluation reads it (every mention kept). The trainer read it without the
    mentions no rule locates, kept those whose gold is in the KB and held records out with
    `split_holdout`; that is redone here and must give the held-out size the head records (heads trained
    before the `words` locating rule read the split with exact / NFC / case-insensitive matches only)."""
    from ..types import LOCATE_RULES, NOT_LOCATED
    trained = payload.get("train", {})
    if "datasets" in payload:  # a joint head: each dataset's records were held out apart
        expected = {d.get("n_heldout") for d in payload["datasets"] if d.get("dataset") == fmt and d.get("split") == split}
    elif trained.get("dataset") == fmt and trained.get("split") == split:
        expected = {payload.get("heldout", {}).get("n")}
    else:
        expected = set()
    if not expected:
        return None
    fraction, seed = trained.get("holdout", DimTrainConfig.holdout), trained.get("seed", DimTrainConfig.seed)
    sizes, found = [], set()
    for located in (lambda e: e.located != NOT_LOCATED, lambda e: e.located in LOCATE_RULES[:3]):
        pool = [e for e in examples if located(e) and e.gold_id in kb]
        _, held = split_holdout(pool, fraction, seed) if pool else ([], [])
        sizes.append(len(held))
        if None in expected or len(held) in expected:
            found.add(frozenset(e.sample_id.split("#")[0] for e in held))
    if len(found) != 1:
        said = " or ".join(str(n) for n in sorted(expected, key=str))
        raise InputError(f"cannot reproduce the records the head held out of {fmt}/{split} ({' or '.join(map(str, sizes))} "
                         f"mentions, the head says {said}): calibrate on a split the head did not train on")
    records = found.pop()
    return [e for e in examples if e.sample_id.split("#")[0] in records]


def _first_occurrence(cols: np.ndarray) -> np.ndarray:
    keep = np.zeros(cols.shape, bool)
    for r, row in enumerate(cols):
        _, first = np.unique(row, return_index=True)
        keep[r, first] = True
    return keep


# -- CLI: `python -m mel train dim`; the training flags come from DimTrainConfig (mel.training.cli) ----
CONFIG = DimTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli_kit import add_preset_args, add_threads_arg, count_arg
    p.add_argument("--format", required=True, help="dataset format (wikimel, richpedia, wikidiverse, mimic, gemel, "
                                                    "jsonl); a joint head: one per dataset, comma-separated")
    p.add_argument("--data", required=True, help="dataset directory; a joint head: one per dataset, comma-separated")
    p.add_argument("--kb", required=True, help="the KB built from the dataset (python -m mel kb build); a joint "
                                                "head: each dataset's own KB, comma-separated, in --data's order")
    add_preset_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write (best held-out epoch)")
    p.add_argument("--state-dir", default=None, help="where resumable state goes (default: OUT.trainer_state)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--dev-split", default="dev", help="'' to train without a dev split")
    p.add_argument("--limit", type=count_arg, default=None, help="only the first N training mentions (of each dataset)")
    p.add_argument("--dev-limit", type=count_arg, default=None)
    p.add_argument("--cache-dir", default=None, help="feature cache directory (default: $MEL_CACHE/dim-features)")
    add_threads_arg(p, subcommand=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.trainer_state/")
    p.add_argument("--keep-state", action="store_true", help="keep OUT.trainer_state/ after the run")


def dataset_args(args) -> list[tuple[str, str, str, str]]:
    """(name, format, data dir, KB path) per dataset named by --format/--data/--kb (comma-separated
    lists; one --format serves every --data). Names are the formats, numbered when one repeats."""
    def split(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]
    formats, dirs, kbs = split(args.format), split(args.data), split(args.kb)
    if len(formats) == 1:
        formats *= len(dirs)
    if not dirs or not len(formats) == len(dirs) == len(kbs):
        raise InputError(f"--format, --data and --kb name one entry per dataset (comma-separated), got "
                         f"{len(formats)}, {len(dirs)} and {len(kbs)}")
    names = formats if len(set(formats)) == len(formats) else [f"{f}{i + 1}" for i, f in enumerate(formats)]
    return list(zip(names, formats, dirs, kbs, strict=True))


def run(args) -> None:
    from ..cli_kit import config_from_args, resolve_preset
    from ..datasets import load_dataset
    from ..kb import KnowledgeBase
    for target in (args.out, args.state_dir):  # before anything is read: a file named as OUT is never touched
        if target:
            check_checkpoint_target(target)
    config = config_from_args(DimTrainConfig, args)
    preset = resolve_preset(args)
    datasets = []
    for name, fmt, folder, kb_path in dataset_args(args):
        train = load_dataset(fmt, folder, args.train_split).examples[: args.limit or None]
        dev = load_dataset(fmt, folder, args.dev_split).examples[: args.dev_limit or None] if args.dev_split else []
        datasets.append(TrainingSet(name, KnowledgeBase(kb_path), train, dev, {"dataset": fmt, "split": args.train_split}))
    trainer = DimTrainer(config, None, preset, args.out, datasets=datasets, state_dir=args.state_dir,
                         cache_dir=args.cache_dir, progress=not args.quiet)
    result = trainer.run(resume=args.resume, keep_state=args.keep_state, command=getattr(args, "command_line", ""))
    print(json.dumps({"best": result["best"], "out": result["out"]}, indent=2))
