"""DimLinker: DIM's fusion head as a ranking linker.

    linker = DimLinker(kb, preset)                       # the shipped head for the offline preset
    linker = DimLinker(kb, preset, checkpoint="runs/dim")
    linker = build_linker("dim", kb, preset, protocol="candidate-list", candidate_file="lists.jsonl")

Whole-KB protocol (default): BM25 over names/aliases UNION dense top-k propose candidates, the
fusion head re-ranks them. Candidate-list protocol (DIM's code): every mention brings its own
candidate list (a JSONL file keyed by mention id), which usually contains the gold: its numbers
are inflated and every result says which protocol produced it (`result.details.protocol`, a DimDetails).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError, KBError
from ..linkers.base import BatchLinker, Stopwatch
from ..paths import REPO_ROOT, display_path
from ..training import load_pretrained_dir
from ..types import ApparentFace, Candidate, DimDetails, ExpertCue, FeatureMask, LinkResult, Mention
from .candidates import CandidateConfig, CandidateGenerator, CandidatePool, load_candidate_lists, pool_size
from .features import FeatureExtractor
from .model import DimFusion, FusionConfig
from .name_numbers import number_pair_features, numbered_words
from .pairs import PAIR_FEATURES, VISUAL_GROUPS
from .pipeline import EntityFactsCache, candidate_batch
from .prior import prior_pair_features

PROTOCOLS = ("whole-kb", "candidate-list")
ENTITY_CACHE_SIZE = 200_000  # fused entity embeddings kept in memory (512 floats each)
SHIPPED = {"offline": "dim-offline"}  # preset -> directory under models/


def shipped_checkpoint(preset_name: str) -> Path:
    """The head shipped for `preset_name` ($MEL_DIM_CHECKPOINT overrides); CheckpointError if none."""
    override = os.environ.get("MEL_DIM_CHECKPOINT")
    if override:
        return Path(override)
    name = SHIPPED.get(preset_name)
    if name is None:
        raise CheckpointError(
            f"no DIM fusion head is shipped for preset {preset_name!r} (only for {', '.join(SHIPPED)}): train one with "
            f"`python -m mel train dim --preset {preset_name} --format ... --data DIR --kb KB --out DIR` and pass "
            f"checkpoint=DIR (CLI: --opt checkpoint=DIR)")
    path = REPO_ROOT / "models" / name
    if not (path / "config.json").exists():
        raise CheckpointError(f"the shipped DIM head {path} is missing; reinstall the project or train one with "
                              f"`python -m mel train dim ...` and pass checkpoint=DIR")
    return path


def expert_cue(cue: dict) -> ExpertCue:
    """The typed cue of one mention, from the feature extractor's cue record."""
    return ExpertCue(cue["text"], cue["provider"], cue.get("question", ""),
                     faces=[ApparentFace.of(f) for f in cue.get("faces") or []], note=cue.get("note", ""))


def _visual_groups(value: str | list[str] | tuple[str, ...]) -> set[str]:
    """`disable_visual` ("face_sex,face_age", "face_sex+face_age" inside a linker list, or a list) as a set of
    known visual groups (ablations)."""
    names = [v.strip() for v in (value.replace("+", ",").split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in VISUAL_GROUPS]
    if unknown:
        raise InputError(f"unknown visual feature group(s) {unknown} in disable_visual; choose from "
                         f"{', '.join(VISUAL_GROUPS)}")
    return set(names)


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")


def option_bool(name: str, value) -> bool:
    """A yes/no linker option: a bool, 1/0, or true/false/1/0/yes/no (any case); anything else is an
    InputError (bool("maybe") would be True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise InputError(f"option {name} is true or false (also 1/0, yes/no), got {value!r}")


def load_head(path: str | Path, device: str = "cpu") -> tuple[DimFusion, dict]:
    model, payload = load_pretrained_dir(DimFusion, FusionConfig, path)
    names = tuple(model.config.pair_feature_names)
    if model.config.n_pair_features and names != PAIR_FEATURES:
        raise CheckpointError(f"{path} was trained with pair features {list(names)}, but this version computes "
                              f"{list(PAIR_FEATURES)}; retrain it with `python -m mel train dim`")
    return model.to(device).eval(), payload


class DimLinker(BatchLinker):
    name = "dim"

    def __init__(self, kb, preset, checkpoint: str | Path | None = None, protocol: str = "whole-kb",
                 candidate_file: str | Path | None = None, n_bm25: int | None = None, n_dense: int | None = None,
                 n_dense_mention: int | None = None, use_image: bool = True, use_cue: bool = True,
                 cue_question: str | None = None, keep_pool: bool = False, text_encoder=None,
                 disable_visual: str | list[str] | tuple[str, ...] = (), use_prior: bool = True,
                 use_numbers: bool = True):
        super().__init__(kb, preset)
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {protocol!r}; choose 'whole-kb' (rank against the whole KB) or "
                             f"'candidate-list' (DIM's per-mention lists, with candidate_file=PATH)")
        if protocol == "candidate-list" and not candidate_file:
            raise InputError("protocol 'candidate-list' needs candidate_file=PATH (JSONL of {\"id\", \"candidates\"}); "
                             "write one with `python -m mel dim candidates`")
        overrides = {key: pool_size(f"option {key}", value) for key, value in
                     (("n_bm25", n_bm25), ("n_dense", n_dense), ("n_dense_mention", n_dense_mention))
                     if value is not None}
        use_image, use_cue = option_bool("use_image", use_image), option_bool("use_cue", use_cue)
        keep_pool, use_prior = option_bool("keep_pool", keep_pool), option_bool("use_prior", use_prior)
        use_numbers = option_bool("use_numbers", use_numbers)
        self.candidate_lists = load_candidate_lists(candidate_file) if candidate_file else None
        self.protocol = protocol
        self.checkpoint = Path(checkpoint) if checkpoint else shipped_checkpoint(preset.name)
        self.device = preset.device
        self.model, payload = load_head(self.checkpoint, self.device)
        cfg = self.model.config
        if cfg.text_encoder and text_encoder is None and cfg.text_encoder != preset.text_encoder:
            raise CheckpointError(
                f"the DIM head {self.checkpoint} was trained on text encoder {cfg.text_encoder!r} but preset "
                f"{preset.name!r} uses {preset.text_encoder!r}; use the head's preset or train one for this preset")
        self.extractor = FeatureExtractor(kb, preset, use_image=use_image, use_cue=use_cue, cue_question=cue_question,
                                          image_dim=cfg.image_dim, text_encoder=text_encoder,
                                          visual_features=cfg.visual_feature_names)
        self.extractor.disabled_visual = _visual_groups(disable_visual)
        if self.extractor.text_dim != cfg.text_dim:
            raise CheckpointError(f"the DIM head expects {cfg.text_dim}-d text features, the encoder gives "
                                  f"{self.extractor.text_dim}-d; use the preset the head was trained with")
        if kb.has_dense("text") and not self.extractor.kb_text_index_matches():
            raise KBError(f"{kb.path.name} was embedded with {kb.dense('text')[1].get('encoder')!r} but this preset "
                          f"encodes mentions with {self.extractor.text_encoder.name!r}: dense candidates would be "
                          f"meaningless; rebuild the KB with `python -m mel kb build ... --preset {preset.name}`")
        self.generator = CandidateGenerator(kb, self._candidate_config(payload, overrides))
        self.keep_pool = keep_pool
        self.use_prior = use_prior  # False: ignore the KB's link prior (ablations)
        self.use_numbers = use_numbers  # False: leave the head's name-number term out (ablations)
        self.facts = EntityFactsCache(kb)
        self._entity_cache: dict[int, torch.Tensor] = {}
        self.dev_figures = payload.get("dev", {})

    def _candidate_config(self, payload: dict, overrides: dict[str, int]) -> CandidateConfig:
        """The candidate generator's sizes: the head's (config.json "candidates", checked), then the options."""
        trained = payload.get("candidates", {})
        try:
            if not isinstance(trained, dict):
                raise InputError(f"candidates must be an object, got {trained!r:.100}")
            c = CandidateConfig(**{k: v for k, v in trained.items() if k in CandidateConfig.__dataclass_fields__})
        except InputError as exc:
            raise CheckpointError(f"{self.checkpoint}/config.json: {exc}; fix the file or retrain the head with "
                                  f"`python -m mel train dim`") from None
        for key, value in overrides.items():
            setattr(c, key, value)
        if self.protocol == "whole-kb" and not (c.n_bm25 or c.n_dense or c.n_dense_mention):
            raise InputError("n_bm25, n_dense and n_dense_mention are all 0: the whole-KB protocol would propose no "
                             "candidate; keep at least one source above 0")
        return c

    def models(self) -> dict[str, str]:
        return {"text_encoder": self.preset.text_encoder, "image_encoder": self.preset.image_encoder,
                "cue": self.preset.cue, "fusion_head": display_path(self.checkpoint)}


    # -- one batch ---------------------------------------------------------------------------------
    def _pools_from_lists(self, mentions: list[Mention], feats) -> list[CandidatePool]:
        """The given lists, with the generator's BM25/dense evidence for the listed entities it
        also finds (the head was trained with that evidence; a fixed list does not remove it)."""
        found = self.generator.generate([m.text for m in mentions], feats.context, feats.mention)
        pools = []
        lists = self.candidate_lists or {}  # set whenever the protocol is candidate-list
        for m, evidence in zip(mentions, found, strict=True):
            ids = lists.get(str(m.id)) if m.id is not None else None
            if ids is None:
                raise InputError(f"mention {m.id!r} ({m.text!r}) has no candidate list in the candidate file; "
                                 f"the candidate-list protocol needs one per mention (or use protocol='whole-kb')")
            known = self.kb.idxs_of(ids)  # one query for the list, not one per id
            idxs = [known[e] for e in ids if e in known]
            pools.append(CandidatePool(idxs=list(dict.fromkeys(idxs)),
                                       bm25={i: evidence.bm25[i] for i in idxs if i in evidence.bm25},
                                       dense={i: evidence.dense[i] for i in idxs if i in evidence.dense}))
        return pools

    def _link_batch(self, mentions: list[Mention], k: int) -> Iterator[LinkResult]:
        sw = Stopwatch()
        with sw("encode"):
            feats = self.extractor.mention_features(mentions)
        with sw("candidates"):
            if self.protocol == "whole-kb":
                pools = self.generator.generate([m.text for m in mentions], feats.context, feats.mention)
            else:
                pools = self._pools_from_lists(mentions, feats)
        with sw("pair_features"):
            cb = candidate_batch(mentions, feats, pools, self.extractor, self.facts)
        with sw("fusion"):
            with torch.inference_mode():
                m = self.model.encode_mentions(**feats.tensors(self.device))
                e = self._entity_embeddings(cb.idxs, cb.valid)
                pair = torch.from_numpy(cb.pair).to(self.device) if self.model.pair_mlp is not None else None
                visual, visual_mask = self.extractor.visual_pair_features(mentions, feats, cb.idxs, cb.valid)
                prior, prior_mask = self._prior_features(mentions, cb.idxs, cb.valid)
                logits = self.model.score_candidates(m, e, pair, torch.from_numpy(visual).to(self.device),
                                                      torch.from_numpy(visual_mask).to(self.device), prior, prior_mask,
                                                      self._number_features(mentions, cb.idxs, cb.valid))
                logits = logits.masked_fill(~torch.from_numpy(cb.valid).to(self.device), float("-inf"))
            scores = logits.float().cpu().numpy()
        with sw("results"):
            tops = [np.argsort(-scores[i][:int(cb.valid[i].sum())], kind="stable")[:k] for i in range(len(mentions))]
            wanted = sorted({int(cb.idxs[i, j]) for i, top in enumerate(tops) for j in top})
            entities = dict(zip(wanted, self.kb.entities_at(wanted), strict=True))  # one query for the whole batch
        timings = sw.total()
        n = len(mentions)  # the batch's cost is shared evenly: per-mention latency is amortised
        timings = {stage: ms / n for stage, ms in timings.items()}
        for i, mention in enumerate(mentions):
            n_valid = int(cb.valid[i].sum())
            ranked = [(int(cb.idxs[i, j]), float(scores[i, j])) for j in tops[i]]
            pool = pools[i]
            cue = feats.cues[i]
            details = DimDetails(
                protocol=self.protocol if self.protocol == "whole-kb" else "candidate-list (gold usually included)",
                n_candidates=n_valid,
                feature_mask=FeatureMask(image=bool(feats.image_mask[i]), cue=bool(feats.cue_mask[i])),
                cue=expert_cue(cue) if cue is not None else None,
                batch_size=n, note=feats.notes[i] or "")
            if self.protocol == "whole-kb" and self.keep_pool:  # lets a caller measure candidate recall
                details.pool = [e.id for e in self.kb.entities_at(pool.idxs)]
            # each candidate says which generator(s) found it
            candidates = [Candidate(entities[idx], value, "dim:" + ("+".join(pool.sources(idx)) or "list"))
                          for idx, value in ranked]
            yield LinkResult(linker=self.name, mention=mention, prediction=candidates[0].entity if candidates else None,
                             score=candidates[0].score if candidates else None, candidates=candidates,
                             timings=dict(timings), preset=self.preset.name, models=self.models(), details=details)

    def _prior_features(self, mentions: list[Mention], idxs: np.ndarray, valid: np.ndarray):
        """The link-prior features (mel.dim.prior) when the head uses them and the KB has a link prior, else
        (None, None): the head then adds nothing."""
        if self.model.prior is None or not self.use_prior or not self.kb.has_link_prior():
            return None, None
        values, mask = prior_pair_features(self.kb, [m.text for m in mentions], idxs, valid)
        return torch.from_numpy(values).to(self.device), torch.from_numpy(mask).to(self.device)

    def _number_features(self, mentions: list[Mention], idxs: np.ndarray, valid: np.ndarray) -> torch.Tensor | None:
        """The name-number features (mel.dim.name_numbers) when the head has that term, else None."""
        if self.model.numbers is None or not self.use_numbers:
            return None
        numbers = [numbered_words(m.caption) for m in mentions]
        if not any(numbers):
            return None  # the term would add exactly 0
        facts = self.facts.get_many([int(i) for i in idxs[valid]])
        values = number_pair_features(numbers, facts, idxs, valid)
        return torch.from_numpy(values).to(self.device)

    def _entity_embeddings(self, idxs: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """(b, c, out_dim) fused entity embeddings. The head is in eval mode, so an entity's
        embedding never changes: each is computed once and kept (bounded cache)."""
        unique = np.unique(idxs[valid])
        missing = [int(i) for i in unique if int(i) not in self._entity_cache]
        if missing:
            text = torch.from_numpy(self.extractor.entity_text_features(missing)).to(self.device)
            image, image_mask = self.extractor.entity_image_features(missing)
            emb = self.model.encode_entities(text, torch.from_numpy(image).to(self.device),
                                             torch.from_numpy(image_mask).to(self.device))
            if len(self._entity_cache) + len(missing) > ENTITY_CACHE_SIZE:
                self._entity_cache.clear()
            self._entity_cache.update(zip(missing, emb, strict=True))
        table = torch.stack([self._entity_cache[int(i)] for i in unique]) if len(unique) else None
        out = torch.zeros(*idxs.shape, self.model.config.out_dim, device=self.device)
        if table is not None:
            pos = torch.from_numpy(np.searchsorted(unique, np.where(valid, idxs, unique[0])))
            out = table[pos.to(self.device)]
        return out
