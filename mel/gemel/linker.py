"""GEMEL as a linker: retrieve demonstrations, build the prompt, generate a KB name, map it back.

    linker = GemelLinker(kb, preset, pool_data="../shared/data/wikimel")   # pool_format = the KB's format
    result = linker.link(Mention.from_text(caption, "Ryan", image="ryan.jpg"))
    result.prediction, result.score, result.details.demonstrations, result.timings   # details: GemelDetails

From the command line (options go through `--opt key=value`):

    python -m mel eval --format wikimel --data DIR --split dev --kb wikimel.sqlite --linker gemel \\
        --opt pool_data=DIR                 # demonstrations from DIR's train split (format: the KB's)
    python -m mel eval ... --linker gemel+dense --opt pool_data=DIR --opt top_k=20
    python -m mel link --kb wikimel.sqlite --linker gemel --opt pool=corrections.jsonl --caption ... --mention ...

Options (the fields of GemelConfig, also taken as keyword arguments of GemelLinker and build_linker):
  pool            a JSONL file of Examples (e.g. exported annotation corrections), a list of Examples,
                  or a DemonstrationPool; `pool_data=DIR` (+ `pool_format`, default the format the KB was
                  built from, + `pool_split`, default train) reads a dataset split instead. No pool:
                  zero-shot (0 demonstrations, said in `details`). `add_demonstrations()` / `remove_demonstrations()`
                  change the pool live (an annotator's corrections, and their undo).
  n_demos         demonstrations per prompt (default 4; the paper used 16 on a GPU).
  retrieval       "mention" (paper: embedding of the mention string) or "multimodal" (mention + caption
                  + image).
  mapper          a feature-mapper directory; default: the one shipped for the preset (models/gemel-offline
                  for `offline`), else none. "none" turns visual tokens off. Without a mapper, or for a
                  mention without an image, the prompt has no visual tokens (stated in `details`).
  image_feature   the image vector the mapper maps and multimodal retrieval compares (mel.gemel.features):
                  "encoder" (the preset's image encoder, the paper's choice) or "conse" (the ConSE vector,
                  text-aligned, beyond the paper). Default: what the mapper was trained on (its config), else
                  "encoder"; a value that differs from the mapper's is refused.
  prompt          "paper" (the paper's prompt) or "cue" (beyond the paper: the expert cue's text, e.g. "a
                  photo of one person, apparently a woman aged about 30-40" or ImageNet labels, as an
                  `[Image]...` line in every segment with an image; see mel.gemel.prompt). Default: the prompt
                  the mapper was trained with (its config), else "paper". `prompt=paper` is the paper's.
  use_images      False: the image is not used at all (no visual tokens, no cue).
  candidates      None: beam search over a trie of ALL KB names (the paper). "dense" | "bm25" | "dim" |
                  "hybrid" (bm25 + dense): the trie holds only the names of that linker's `top_k`
                  candidates, for KBs too large for a full trie; with `rank="all"` (the default in this
                  mode) every candidate is scored by the LLM's log-likelihood, so Hits@k up to top_k is
                  meaningful. Options for a candidate linker go with its name as prefix (`dim_checkpoint=...`).
  fuse            candidate mode only (default on): rank by a product of experts, the LLM and the
                  retriever(s), instead of the LLM alone:
                      fused(e) = llm_weight * log p_LLM(e) + sum_s log softmax(score_s(e) / temperature_s)
                  where p_LLM is the sequence probability of the name + EOS renormalised over the
                  candidates, and a candidate missing from a retriever's top_k gets that retriever's
                  lowest score. Both scores are shown side by side in `details.scores`. Defaults
                  (llm_weight, temperature_bm25, temperature_dense) were chosen on the WikiMEL *train*
                  split, never on dev; temperature_dim is 1 because DIM's scores are softmax logits.
  constrained     whole-KB mode only (default True, the paper). False: the ablation without the trie,
                  free beam search over the whole vocabulary until EOS or a newline; the text is
                  mapped to entities by exact (normalised) name or alias match, and an output that is
                  no KB name is a miss (NIL, `details.not_a_kb_name`).
  num_beams, max_new_tokens, length_penalty   decoding (paper: 5 beams, 32 tokens). length_penalty
                  defaults to 0.0: names are ranked by their sequence log-probability. Hugging Face's
                  generate() (the paper's code) divides by length (1.0), which favours long names whose
                  later tokens are forced by the trie; with SmolLM2, 0.0 was better both for candidate
                  scoring on WikiMEL train and for whole-KB beam search on the first 100 dev mentions
                  (Hits@1 53% vs 46%).

Candidates in the result: full-KB mode returns the finished beams (at most `num_beams` names, so
Hits@k for k > num_beams counts only those); a name shared by several entities contributes all of
them, ordered by the tie-break rule below, with the same score.

Ambiguous names (one generated name, several KB entities) are reported in `details.ambiguity`
and broken by this rule, which uses no popularity: (1) the entity that is the gold answer of the
most similar retrieved demonstration, (2) the entity whose description shares the most words
with the caption, (3) a fixed hash of the entity id.

Scores: with beam search (and candidate mode without fusion) `Candidate.score` (and
`LinkResult.score`) is the ranking score, the sequence log-probability of name + EOS divided by its
length ** length_penalty (the plain sequence log-probability with the default 0.0); the raw sequence
log-probability of every beam is in `details.beams` (one per candidate when every candidate is
scored).
With fusion it is the fused log-probability over the candidates (log_softmax of `fused`).
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..errors import CheckpointError, InputError, KBError, MELError, require_finite, require_whole
from ..linkers.base import Linker, Stopwatch, check_k, check_mention
from ..paths import REPO_ROOT, display_path
from ..types import (
    Ambiguity,
    Beam,
    Candidate,
    CandidateScores,
    Entity,
    Example,
    Fusion,
    GemelDetails,
    LinkResult,
    Mention,
    PromptDemonstration,
)
from .decode import DecodeConfig, FreeVocabulary, Hypothesis, beam_search, score_groups
from .demos import Demonstration, DemonstrationPool, load_pool_examples
from .features import check_image_feature, image_feature_encoder
from .mapper import FeatureMapper
from .prompt import PromptBuilder, Segment, check_style, embed_prompt
from .trie import TokenTrie, kb_trie

# the feature mapper shipped for a preset (trained with `python -m mel train gemel`, see its README)
SHIPPED_MAPPERS = {"offline": REPO_ROOT / "models" / "gemel-offline"}
TIE_BREAK_RULE = ("gold of the most similar retrieved demonstration, then most caption words in the description, "
                  "then a fixed hash of the id (no popularity)")
CANDIDATE_SOURCES = ("dense", "bm25", "hybrid", "dim")
# product-of-experts defaults: the best grid point on 200 random WikiMEL *train* mentions
# (`python bench/bench_gemel.py --tune 200`, query excluded from its demonstrations), never on dev
# DIM's scores are already logits of a softmax over candidates (its N-pair loss), so its temperature is
# 1; BM25 scores and cosines have no such scale, hence their tuned temperatures. The same llm_weight
# and T_dim=1 were checked for gemel+dim on 200 RichpediaMEL train mentions, which the shipped DIM
# head never saw (`bench_gemel.py --tune-dim 200`): 0.9400 vs 0.9450 at the best grid point (one
# mention apart), DIM alone 0.9200, the LLM alone 0.8250.
FUSION_DEFAULTS = {"llm_weight": 0.25, "temperature_bm25": 1.0, "temperature_dense": 0.02, "temperature_dim": 1.0}
IMAGE_CACHE_SIZE = 512


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.casefold()) if len(w) > 2}


def _stable_hash(entity_id: str) -> str:
    return hashlib.sha1(entity_id.encode("utf-8")).hexdigest()


class ImageFeatures:
    """Image path -> feature vector, through the preset's image encoder, with a small LRU cache."""

    def __init__(self, encoder, size: int = IMAGE_CACHE_SIZE):
        self.encoder = encoder
        self.size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, source, strict: bool = True) -> np.ndarray | None:
        """Features of the image at `source`; None when unreadable and not `strict` (else InputError)."""
        from ..imageio import load_image
        key = str(source)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            vec = np.asarray(self.encoder.encode([load_image(source)])[0], np.float32)
        except InputError:
            if strict:
                raise
            return None
        self._cache[key] = vec
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return vec


def resolve_mapper(spec, preset, d_embed: int) -> tuple[FeatureMapper | None, str, str]:
    """(mapper or None, where it came from, a note for the user). The image encoder it was trained on
    is checked by the linker (`check_mapper_encoder`), which knows the image feature in use."""
    if spec is None:
        path = SHIPPED_MAPPERS.get(getattr(preset, "name", ""))
        if path is None or not (path / "config.json").exists():
            return None, "", (f"no trained feature mapper for preset {getattr(preset, 'name', '?')!r}: images are not "
                              f"used (no visual tokens); train one with `python -m mel train gemel ... --out DIR` "
                              f"and pass --opt mapper=DIR")
        spec = path
    if isinstance(spec, FeatureMapper):
        return spec.eval(), "given", ""
    if isinstance(spec, str) and spec.lower() in ("none", "off", "false", ""):
        return None, "", "visual tokens turned off (mapper=none)"
    mapper, _ = FeatureMapper.from_pretrained(spec, d_embed=d_embed)
    trained_for, used = mapper.config.llm, getattr(preset, "llm", "")
    if trained_for and used and trained_for != used:
        raise CheckpointError(f"feature mapper {spec} was trained for llm {trained_for!r} but preset "
                              f"{preset.name!r} uses {used!r}; use its preset, pass mapper=none, or train a "
                              f"mapper for this preset")
    return mapper, str(spec), ""


def check_mapper_encoder(mapper: FeatureMapper, source: str, preset, encoder, spec: str) -> None:
    """The mapper must map the vectors of the encoder it was trained on (same spec when both are known, same width)."""
    trained_for = mapper.config.image_encoder
    if trained_for and spec and trained_for != spec:
        raise CheckpointError(f"feature mapper {source} was trained for image_encoder {trained_for!r} but preset "
                              f"{preset.name!r} gives {spec!r} (image_feature={mapper.config.image_feature}); use "
                              f"its preset, pass mapper=none, or train a mapper for this preset")
    if encoder.dim != mapper.config.d_vision:
        raise CheckpointError(f"feature mapper {source} maps {mapper.config.d_vision}-d features but {spec} gives "
                              f"{encoder.dim}-d ones; use the mapper's preset or train a mapper for this one")


@dataclass
class RetrievedCandidate:
    """A candidate from GEMEL's retriever(s): its KB row and each retriever's score."""

    entity: Entity
    scores: dict[str, float] = field(default_factory=dict)  # source ("bm25", "dense", "dim") -> score


@dataclass
class GemelConfig:
    """GEMEL's options (the module docstring says what each does). Given as a config,
    `GemelLinker(kb, preset, GemelConfig(n_demos=16))`, or as keyword options, as `build_linker("gemel", kb,
    preset, n_demos=16)` and `--opt n_demos=16` give them. `rank` and `fuse` left at None follow the
    mode: every candidate scored and fused in candidate mode, beam search over the whole KB otherwise."""

    pool_format: str | None = None
    pool_data: str | None = None
    pool_split: str = "train"
    n_demos: int = 4
    retrieval: str = "mention"
    candidates: str | None = None
    top_k: int = 20
    rank: str | None = None
    num_beams: int = 5
    max_new_tokens: int = 32
    length_penalty: float = 0.0
    constrained: bool = True
    image_feature: str | None = None  # None: the mapper's (its config), else "encoder"
    prompt: str | None = None         # None: the mapper's (its config), else "paper"
    max_caption_chars: int | None = 500
    use_images: bool = True
    trie_cache: bool = True
    fuse: bool | None = None
    llm_weight: float = FUSION_DEFAULTS["llm_weight"]
    temperature_bm25: float = FUSION_DEFAULTS["temperature_bm25"]
    temperature_dense: float = FUSION_DEFAULTS["temperature_dense"]
    temperature_dim: float = FUSION_DEFAULTS["temperature_dim"]
    show_prompt: bool = False
    progress: bool = False
    candidate_options: dict = field(default_factory=dict)  # the candidate linker's, by its name: dense_query=...

    def __post_init__(self):
        _check_option_values(self)
        if self.image_feature is not None:
            check_image_feature(self.image_feature)
        if self.prompt is not None:
            check_style(self.prompt)
        if self.candidates is not None and self.candidates not in CANDIDATE_SOURCES:
            raise InputError(f"candidates must be None (whole-KB trie) or one of {CANDIDATE_SOURCES}, got "
                             f"{self.candidates!r}")
        if self.ranking not in ("beam", "all"):
            raise InputError(f"rank must be 'beam' or 'all', got {self.rank!r}")
        if self.ranking == "all" and self.candidates is None:
            raise InputError("rank='all' scores every candidate and needs candidates=dense|dim|bm25; over a whole KB "
                             "use rank='beam'")
        if self.fused and self.candidates is None:
            raise InputError("fuse=True combines the LLM with a retriever's scores and needs candidates=dense|bm25|"
                             "hybrid|dim")
        unknown = [k for k in self.candidate_options if not any(k.startswith(src + "_") for src in self.sources)]
        if unknown:
            raise InputError(f"unknown GEMEL option(s) {unknown}; see `mel.gemel.linker` for the options "
                             f"(options of the candidate linker take its name as prefix, e.g. dense_query=...)")
        if any(t <= 0 for t in self.temperatures.values()):
            raise InputError(f"fusion temperatures must be positive, got {self.temperatures}")
        if not self.constrained and self.candidates:
            raise InputError("constrained=False (free generation) is the whole-KB ablation; with candidates=... the "
                             "output is always one of the candidates")

    @classmethod
    def from_options(cls, **options) -> "GemelConfig":
        """The config from keyword options: a field's name sets it, any other name is an option of the
        candidate linker (`dense_query=...`), refused when it names none."""
        names = {f.name for f in fields(cls)} - {"candidate_options"}
        return cls(**{k: v for k, v in options.items() if k in names},
                   candidate_options={k: v for k, v in options.items() if k not in names})

    def replace(self, **options) -> "GemelConfig":
        """This config with some options changed (keyword options as `from_options` takes them)."""
        current = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "candidate_options"}
        return GemelConfig.from_options(**{**current, **self.candidate_options, **options})

    @property
    def ranking(self) -> str:
        """`rank`, or when None: "all" (every candidate scored by the LLM) in candidate mode, else "beam"."""
        return self.rank or ("all" if self.candidates else "beam")

    @property
    def fused(self) -> bool:
        """`fuse`, or when None: on in candidate mode when every candidate is scored."""
        return bool(self.candidates) and self.ranking == "all" if self.fuse is None else bool(self.fuse)

    @property
    def sources(self) -> tuple[str, ...]:
        """The retrievers whose top-k fills the trie in candidate mode (none over the whole KB)."""
        return ("bm25", "dense") if self.candidates == "hybrid" else ((self.candidates,) if self.candidates else ())

    @property
    def temperatures(self) -> dict[str, float]:
        return {"bm25": float(self.temperature_bm25), "dense": float(self.temperature_dense),
                "dim": float(self.temperature_dim)}


class GemelLinker(Linker):
    name = "gemel"
    excludes_samples = True  # link(..., exclude_sample_id=ID) keeps pool example ID out of the demonstrations

    def __init__(self, kb, preset, config: GemelConfig | None = None, *, mapper=None, pool=None, **options):
        """`mapper` (a directory, a FeatureMapper or "none") and `pool` (a JSONL file, Examples or a
        DemonstrationPool) may be objects; every other option is a GemelConfig field, given in `config`
        or as keyword options (which override `config`'s)."""
        super().__init__(kb, preset)
        if config is None:
            config = GemelConfig.from_options(**options)
        elif options:
            config = config.replace(**options)
        if kb.size == 0:
            raise KBError(f"knowledge base {kb.path} is empty: GEMEL can only generate names of KB entities; build "
                          f"it from a dataset with `python -m mel kb build`")
        self.config = config
        self.n_demos = int(config.n_demos)
        self.candidates = config.candidates
        self.top_k = int(config.top_k)
        self.rank = config.ranking
        self.use_images = bool(config.use_images)
        self.show_prompt = bool(config.show_prompt)
        self.fuse = config.fused
        self.llm_weight = float(config.llm_weight)
        self.temperatures = config.temperatures
        self.constrained = bool(config.constrained)
        self.decode_config = DecodeConfig(num_beams=int(config.num_beams), max_new_tokens=int(config.max_new_tokens),
                                          length_penalty=float(config.length_penalty))
        if config.candidates:
            self.name = f"gemel+{config.candidates}"

        self.llm = preset.backend("llm")
        self.model = self.llm.model
        self.tokenizer = self.llm.tokenizer
        self.d_embed = int(self.model.get_input_embeddings().embedding_dim)

        self.mapper, self.mapper_source, self.visual_note = resolve_mapper(mapper, preset, self.d_embed)
        trained = self.mapper.config if self.mapper is not None else None
        self.image_feature = config.image_feature or (trained.image_feature if trained is not None else "encoder")
        if trained is not None and self.image_feature != trained.image_feature:
            raise CheckpointError(f"feature mapper {self.mapper_source} was trained on image_feature="
                                  f"{trained.image_feature} but image_feature={self.image_feature} was asked for; "
                                  f"leave image_feature out, or give a mapper trained on it")
        self.prompt_style = config.prompt or (trained.prompt if trained is not None else "paper")
        self.images: ImageFeatures | None = None
        if self.mapper is not None:
            self.mapper.to(self.llm.device)
            encoder, spec = image_feature_encoder(preset, self.image_feature)
            check_mapper_encoder(self.mapper, self.mapper_source, preset, encoder, spec)
            self.images = ImageFeatures(encoder)
        self.cues = preset.backend("cue") if self.prompt_style == "cue" and self.use_images else None
        self._cue_texts: OrderedDict[str, str | None] = OrderedDict()
        n_tokens = self.mapper.n_tokens if self.mapper is not None else 0
        self.builder = PromptBuilder(self.tokenizer, n_image_tokens=n_tokens, max_caption_chars=config.max_caption_chars,
                                     style=self.prompt_style)

        self.pool, self.pool_description = self._make_pool(pool, config.pool_format, config.pool_data,
                                                           config.pool_split, config.retrieval, config.progress)
        self._answers: dict[str, str] = {}

        self.trie: TokenTrie | FreeVocabulary | None = None
        self.retrievers: dict = {}
        if config.candidates is None and not self.constrained:
            self.trie = FreeVocabulary(self.tokenizer)
            self.name = "gemel-free"
        elif config.candidates is None:
            self.trie = kb_trie(kb, self.tokenizer, use_cache=config.trie_cache)
        else:
            from ..linkers import build_linker
            for src in config.sources:
                opts = {k[len(src) + 1:]: v for k, v in config.candidate_options.items() if k.startswith(src + "_")}
                self.retrievers[src] = build_linker(src, kb, preset, **opts)

    # -- set-up helpers ----------------------------------------------------------------------
    def _make_pool(self, pool, pool_format, pool_data, pool_split, retrieval, progress):
        if isinstance(pool, DemonstrationPool):
            return pool, f"given pool ({len(pool)} examples)"
        if isinstance(pool, (list, tuple)):
            examples, what = list(pool), f"given examples ({len(pool)})"
        else:
            if pool_data is not None and not pool_format:
                pool_format = self.kb.source_format or None
            examples, what = load_pool_examples(pool=pool, pool_format=pool_format, pool_data=pool_data,
                                                pool_split=pool_split)
        if not examples and pool is None and pool_data is None:
            return None, what
        image_encoder = self.images.encoder if (retrieval == "multimodal" and self.images is not None) else None
        if retrieval == "multimodal" and image_encoder is None:
            image_encoder, _ = image_feature_encoder(self.preset, self.image_feature)
        built = DemonstrationPool(examples, self.preset.backend("mention_encoder"), key=retrieval,
                                  image_encoder=image_encoder, progress=progress)
        return built, what

    def add_demonstrations(self, examples: list[Example]) -> int:
        """Make new labelled examples (e.g. an annotator's corrections) retrievable from the next link on;
        each is known by its `sample_id` (see `remove_demonstrations`). Returns how many joined (not NIL)."""
        if self.pool is None:
            self.pool = DemonstrationPool([], self.preset.backend("mention_encoder"))
            self.pool_description = "live corrections"
        return self.pool.add(examples)

    def remove_demonstrations(self, sample_ids: list[str]) -> int:
        """Take examples out of the pool by `sample_id` (an undone correction); returns how many were removed."""
        return sum(self.pool.remove(sample_id) for sample_id in sample_ids) if self.pool is not None else 0

    def models(self) -> dict[str, str]:
        out = {"llm": self.preset.llm, "mention_encoder": self.preset.mention_encoder}
        if self.mapper is not None:
            out["image_encoder"] = self.preset.image_encoder
            if self.image_feature != "encoder":
                out["image_feature"] = str(getattr(self.images.encoder, "name", self.image_feature)) \
                    if self.images is not None else self.image_feature
            out["feature_mapper"] = display_path(self.mapper_source)
        if self.cues is not None:
            out["cue"] = self.preset.cue
        for src, linker in self.retrievers.items():
            out.update({f"candidates.{src}.{k}": v for k, v in linker.models().items()})
        return out

    def answer_of(self, example: Example) -> str:
        """The name a demonstration answers with: the KB's name of its gold entity (what the trie can
        generate), else the dataset's gold name."""
        self._learn_answers([example])
        return self._answers[example.gold_id]

    def _learn_answers(self, examples: list[Example]) -> None:
        """Fill the answer cache for these examples' gold entities: two queries, not two per example."""
        missing = list(dict.fromkeys(ex.gold_id for ex in examples if ex.gold_id not in self._answers))
        if not missing:
            return
        idxs = self.kb.idxs_of(missing)
        names = {e.id: e.name for e in self.kb.entities_at(list(idxs.values()))}
        for ex in examples:
            if ex.gold_id not in self._answers:
                self._answers[ex.gold_id] = names[ex.gold_id] if ex.gold_id in names else (ex.gold_name or ex.gold_id)

    def cue_text(self, image) -> str | None:
        """The expert cue's text for an image (`prompt="cue"` only; None otherwise or when unreadable)."""
        if self.cues is None or not image:
            return None
        key = str(image)
        if key not in self._cue_texts:
            from ..imageio import load_image
            try:
                self._cue_texts[key] = self.cues.cue(load_image(image)).text or None
            except InputError:
                self._cue_texts[key] = None
            if len(self._cue_texts) > IMAGE_CACHE_SIZE:
                self._cue_texts.popitem(last=False)
        return self._cue_texts[key]

    def segments(self, mention: Mention, demos: list[Demonstration], query_features=None) -> list[Segment]:
        self._learn_answers([d.example for d in demos])
        segs = []
        images = self.images if self.use_images else None
        for demo in demos:
            m = demo.example.mention
            feats = images(m.image, strict=False) if images is not None and m.image else None  # unreadable: text only
            segs.append(Segment(m.caption, m.text, self.answer_of(demo.example), feats, self.cue_text(m.image)))
        segs.append(Segment(mention.caption, mention.text, None, query_features, self.cue_text(mention.image)))
        return segs

    # -- linking -----------------------------------------------------------------------------
    def _link(self, mention: Mention, k: int) -> LinkResult:
        return self._link_excluding(mention, k, None)

    def _link_excluding(self, mention: Mention, k: int, sample_id: str | None) -> LinkResult:
        """Link one mention. `sample_id` keeps that pool example out of the demonstrations (when the
        mention itself belongs to the pool, e.g. tuning on the train split)."""
        check_mention(mention)
        check_k(k)
        sw = Stopwatch()
        mode = ("whole-KB trie" if self.constrained else "free generation (no trie)") if self.candidates is None \
            else f"{self.candidates} top-{self.top_k}"
        details = GemelDetails(
            mode=mode, pool=self.pool_description,
            ranking=(f"constrained beam search ({self.decode_config.num_beams} beams)" if self.rank == "beam"
                     else "every candidate by LLM log-likelihood") + (", fused with the retriever scores" if self.fuse else ""))
        with sw("retrieve"):
            demos = (self.pool.retrieve(mention, self.n_demos, exclude_id=sample_id)
                     if (self.pool is not None and self.n_demos > 0) else [])
        trie, retrieved = self.trie, None
        if self.retrievers:
            with sw("candidates"):
                retrieved = self.retrieve_candidates(mention)
                details.retriever = [CandidateScores(c.entity.id, c.entity.name,
                                                     {src: round(v, 4) for src, v in c.scores.items()})
                                     for c in retrieved.values()]
                pairs = [(idx, c.entity.name) for idx, c in retrieved.items()]
                trie = TokenTrie.build(pairs, self.tokenizer) if pairs else None
        if trie is None:  # (whole-KB mode always has its trie)
            details.note = f"the {self.candidates} retriever found no candidate: nothing to generate (NIL)"
            return self._finish(mention, [], demos, details, sw, k)
        with sw("image"):
            query_features = None
            if mention.image and self.images is not None and self.use_images:
                query_features = self.images(mention.image, strict=True)
            segments = self.segments(mention, demos, query_features)
        with sw("prompt"):
            prompt = self.builder.build(segments, use_images=self.use_images and self.mapper is not None)
            with torch.inference_mode():
                embeds = embed_prompt(self.llm.embed_tokens, prompt, segments, self.mapper, device=self.llm.device)
        if self.rank == "beam":
            hyps, stats = beam_search(self.model, trie, embeds, self.decode_config)
        else:
            assert isinstance(trie, TokenTrie)  # rank='all' needs candidates (GemelConfig): their trie
            hyps, stats = score_groups(self.model, trie, embeds, length_penalty=self.decode_config.length_penalty)
        if self.fuse:
            details.fusion = Fusion(llm_weight=self.llm_weight,
                                    temperatures={s: self.temperatures[s] for s in self.retrievers},
                                    formula="llm_weight * log p_LLM(name | prompt, candidates) + "
                                            "sum_s log softmax(score_s / temperature_s)")
        sw.timings["prefill"] = stats.prefill_ms
        sw.timings["decode"] = stats.decode_ms
        details.decode = stats.to_dict()
        details.visual_tokens = bool(prompt.image_slots) and query_features is not None
        details.n_visual_segments = len(prompt.image_slots)
        details.visual_note = self._visual_note(mention, query_features)
        if self.show_prompt:
            details.prompt = prompt.text
        with sw("map"):
            # candidate mode: the retrievers already hold every candidate's KB row
            known = {idx: c.entity for idx, c in retrieved.items()} if retrieved else {}
            ranked, details.beams, details.ambiguity = self._map(hyps, trie, mention, demos, known)
            if self.fuse and ranked and retrieved is not None:  # fusion needs candidates (GemelConfig)
                ranked, details.scores = self._fuse(ranked, hyps, trie, retrieved, mention, demos)
                details.ambiguity = self._fused_ambiguity(ranked)
        free = isinstance(trie, FreeVocabulary)
        if free:  # the first output decides: a non-KB text is a miss, not skipped
            details.not_a_kb_name = not hyps or details.beams[0].not_a_kb_name
            if details.not_a_kb_name:
                ranked = []
        if hyps:  # the LLM's own first choice (with fusion, the prediction may differ)
            details.generated = self._free_text(hyps[0]) if free else self.tokenizer.decode(hyps[0].tokens[:-1])
            details.logprob = round(hyps[0].logprob, 4)
        else:
            details.note = f"no name finished within {self.decode_config.max_new_tokens} tokens: NIL"
        return self._finish(mention, ranked, demos, details, sw, k)

    def retrieve_candidates(self, mention: Mention) -> dict[int, RetrievedCandidate]:
        """KB idx -> the entity and each retriever's score, from the top_k of each retriever (union)."""
        found = [(src, c) for src, linker in self.retrievers.items()
                 for c in linker.link(mention, k=self.top_k).candidates]
        idxs = self.kb.idxs_of(c.entity.id for _, c in found)  # one query for every candidate
        out: dict[int, RetrievedCandidate] = {}
        for src, c in found:
            idx = idxs.get(c.entity.id)
            if idx is not None:
                out.setdefault(idx, RetrievedCandidate(c.entity)).scores[src] = float(c.score)
        return out

    def _fuse(self, ranked, hyps, trie, retrieved: dict[int, RetrievedCandidate], mention, demos):
        """Re-rank entities by the product of experts; returns (ranked, side-by-side score table)."""
        logprob = {}
        for h in hyps:
            for idx in trie.entities(h.group):
                logprob[retrieved[idx].entity.id] = h.logprob
        by_id = {c.entity.id: c for c in retrieved.values()}
        ids = [e.id for e, _ in ranked]
        llm = np.array([logprob[i] for i in ids])
        fused = self.llm_weight * _log_softmax(llm)
        columns = {}
        for src in self.retrievers:
            present = [by_id[i].scores[src] for i in ids if src in by_id[i].scores]
            floor = min(present) if present else 0.0  # absent from this retriever's top_k: at most its lowest score
            col = np.array([by_id[i].scores.get(src, floor) for i in ids])
            columns[src] = col
            fused = fused + _log_softmax(col / self.temperatures[src])
        fused = _log_softmax(fused)
        entities = {e.id: e for e, _ in ranked}
        tie = {e.id: n for n, e in enumerate(self.tie_break([e for e, _ in ranked], mention, demos))}
        order = sorted(range(len(ids)), key=lambda j: (-round(float(fused[j]), 9), tie[ids[j]]))
        table = [CandidateScores(ids[j], entities[ids[j]].name, {src: round(float(columns[src][j]), 4) for src in columns},
                                 llm_logprob=round(float(llm[j]), 4), fused=round(float(fused[j]), 4))
                 for j in order]
        return [(entities[ids[j]], float(fused[j])) for j in order], table

    @staticmethod
    def _fused_ambiguity(ranked) -> Ambiguity | None:
        name = ranked[0][0].name
        same = [e.id for e, _ in ranked if e.name == name]
        if len(same) < 2:
            return None
        return Ambiguity(name, same, ranked[0][0].id,
                         "fused score (the retrievers score same-name entities differently), then " + TIE_BREAK_RULE)

    def _visual_note(self, mention: Mention, query_features) -> str:
        if self.mapper is None:
            cue = self.cue_text(mention.image)
            return self.visual_note + (f"; prompt 'cue' (beyond the paper): the cue {cue!r} in the segment"
                                       if cue else "")
        if not self.use_images:
            return "visual tokens turned off (use_images=False)"
        if not mention.image:
            return "the mention has no image: its segment has no visual tokens"
        feature = "the ConSE vector of" if self.image_feature == "conse" else "the image encoder's features of"
        note = f"{self.mapper.n_tokens} visual tokens from {feature} the image"
        if self.cues is not None:
            note += f"; prompt 'cue' (beyond the paper): the cue {self.cue_text(mention.image)!r} in the segment"
        return note

    def _free_text(self, h: Hypothesis) -> str:
        return self.tokenizer.decode(h.tokens, skip_special_tokens=True).split("\n")[0].strip()

    def _map(self, hyps: list[Hypothesis], trie, mention: Mention, demos: list[Demonstration],
             known: dict[int, Entity]) -> tuple[list[tuple[Entity, float]], list[Beam], Ambiguity | None]:
        """(entities with their beam's score, best first; the beams; the prediction's ambiguity).
        `known`: KB rows already in hand (idx -> Entity); the others are read in one query."""
        free = isinstance(trie, FreeVocabulary)
        outputs = []
        for h in hyps:
            name = self._free_text(h) if free else trie.name(h.group)
            # free generation: the text names an entity only if it equals a KB name or alias
            idxs = list(dict.fromkeys(idx for idx, _ in self.kb.lookup_name(name))) if free else trie.entities(h.group)
            outputs.append((h, name, idxs))
        rows = dict(known)
        wanted = list(dict.fromkeys(idx for _, _, idxs in outputs for idx in idxs if idx not in rows))
        rows.update(zip(wanted, self.kb.entities_at(wanted), strict=True))
        ranked: list[tuple[Entity, float]] = []
        beams: list[Beam] = []
        ambiguity = None
        for h, name, idxs in outputs:
            beam = Beam(name, logprob=round(h.logprob, 4), score=round(h.score, 4))
            beams.append(beam)
            if not idxs:
                beam.not_a_kb_name = True
                continue
            entities = [rows[idx] for idx in idxs]
            if len(entities) > 1:
                entities = self.tie_break(entities, mention, demos)
                if ambiguity is None and not ranked:  # the prediction's name is ambiguous
                    ambiguity = Ambiguity(name, [e.id for e in entities], entities[0].id, TIE_BREAK_RULE)
            beam.entity_ids = [e.id for e in entities]
            ranked += [(e, h.score) for e in entities]
        return ranked, beams, ambiguity

    def tie_break(self, entities, mention: Mention, demos: list[Demonstration]):
        demo_sim: dict[str, float] = {}
        for d in demos:
            demo_sim[d.example.gold_id] = max(demo_sim.get(d.example.gold_id, -1.0), d.similarity)
        context = _words(mention.caption) - _words(mention.text)
        return sorted(entities, key=lambda e: (-demo_sim.get(e.id, -2.0), -len(context & _words(e.description)),
                                               _stable_hash(e.id)))

    def _finish(self, mention, ranked, demos, details: GemelDetails, sw, k) -> LinkResult:
        self._learn_answers([d.example for d in demos])
        details.demonstrations = [PromptDemonstration(
            sample_id=d.example.sample_id, caption=d.example.mention.caption, mention=d.example.mention.text,
            gold_id=d.example.gold_id, gold_name=self.answer_of(d.example), similarity=round(d.similarity, 4),
            image=d.example.mention.image) for d in demos]
        if not demos:
            details.demonstrations_note = ("zero-shot: no demonstration pool (give pool=..., or pool_data=DIR)"
                                           if self.pool is None else "the pool returned no demonstration")
        source = self.name
        candidates = [Candidate(entity, float(score), source) for entity, score in ranked[:max(k, 1)]]
        return LinkResult(linker=self.name, mention=mention,
                          prediction=candidates[0].entity if candidates else None,
                          score=candidates[0].score if candidates else None, candidates=candidates,
                          timings=sw.total(), preset=getattr(self.preset, "name", ""), models=self.models(),
                          details=details)


def _check_option_values(config: GemelConfig) -> None:
    """Clear errors for option values that would otherwise crash or quietly do nothing useful
    (num_beams=-2 crashed the beam search; constrained="abc" read as True; NaN weights made every score NaN)."""
    minimum = {"n_demos": 0, "top_k": 1, "num_beams": 1, "max_new_tokens": 1, "max_caption_chars": 1}
    for key, low in minimum.items():
        if not (key == "max_caption_chars" and config.max_caption_chars is None):
            require_whole(f"GEMEL option {key}", getattr(config, key), low)
    for key in ("llm_weight", "length_penalty", "temperature_bm25", "temperature_dense", "temperature_dim"):
        require_finite(f"GEMEL option {key}", getattr(config, key))
    for key in ("constrained", "use_images", "trie_cache", "show_prompt", "progress", "fuse"):
        value = getattr(config, key)
        if not isinstance(value, bool) and not (key == "fuse" and value is None):
            raise InputError(f"GEMEL option {key} must be true or false, got {value!r}")


def _gemel_with(source: str, what: str):
    def factory(kb, preset, **options) -> GemelLinker:
        options.setdefault("candidates", source)
        if options["candidates"] != source:
            raise MELError(f"gemel+{source} takes its candidates from {what}; use --linker gemel with "
                           f"--opt candidates=... for another source")
        return GemelLinker(kb, preset, **options)
    factory.__name__ = f"gemel_with_{source}"
    factory.__doc__ = (f"GEMEL restricted to {what}'s top-k names (`top_k`, default 20), every one scored by the "
                       f"LLM, ranked by the LLM fused with {what}'s scores (`fuse=False`: the LLM alone); options "
                       f"of {what} as {source}_<name>=...")
    return factory


gemel_with_dense = _gemel_with("dense", "the dense linker")
gemel_with_bm25 = _gemel_with("bm25", "BM25")
gemel_with_dim = _gemel_with("dim", "DIM")
