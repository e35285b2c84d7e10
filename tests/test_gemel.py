"""GEMEL: prompt, demonstrations, trie-constrained decoding, the linker and mapper training.

Tiny random OPT and Llama models (configs + a tokenizer trained here, saved to tmp_path and
loaded through the real `load_causal_lm("hf:<path>")`) exercise the machinery with two
tokenizer families (byte-level BPE like OPT, and SentencePiece-style Metaspace like Llama); the
packaged SmolLM2 checks real behaviour on a tiny KB.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mel.errors import CheckpointError, InputError, KBError, MELError
from mel.gemel.decode import DecodeConfig, FreeVocabulary, beam_search, score_groups
from mel.gemel.demos import DemonstrationPool
from mel.gemel.linker import GemelConfig, GemelLinker
from mel.gemel.mapper import FeatureMapper, MapperConfig
from mel.gemel.prompt import IGNORE_INDEX, PromptBuilder, Segment, embed_prompt, encode_answer, render_prompt
from mel.gemel.train import GemelTrainConfig, MapperTrainer, trainable_summary
from mel.gemel.trie import TokenTrie, kb_trie
from mel.kb import build_kb
from mel.presets import Preset
from mel.types import Entity, Example, LinkResult, Mention

ENTITIES = [
    Entity("Q1", "Eileen Collins", [], "American astronaut, first woman to command a Space Shuttle"),
    Entity("Q2", "Phil Collins", [], "English drummer and singer of the band Genesis"),
    Entity("Q3", "Grace Hopper", [], "American computer scientist and Navy rear admiral"),
    Entity("Q4", "Barack Obama", [], "44th president of the United States"),
    Entity("Q5", "Michelle Obama", [], "lawyer, First Lady of the United States"),
    Entity("Q6", "Falcon 9", [], "reusable rocket made by SpaceX"),
    Entity("Q7", "Peregrine falcon", [], "bird of prey, the fastest animal"),
    Entity("Q8", "Phil Collins", [], "American baseball pitcher for the Chicago Cubs"),  # same name as Q2
]
CORPUS = ["[Text]Collins on stage with Genesis\n[Question]What does Collins mentioned in the text refer to?\n"
          "[Answer]Phil Collins\n"] * 20 + [" ".join(e.name + " " + e.description for e in ENTITIES)] * 20


# -- tiny models ---------------------------------------------------------------------------------
def _tiny_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if kind == "opt":  # byte-level BPE, BOS "</s>" added in front, EOS "</s>" (as OPT's)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                           special_tokens=[("</s>", tok.token_to_id("</s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    # SentencePiece-style (Metaspace): pieces merge across "]" and into names, unlike byte-level BPE
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=["\n"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save_tiny_lm(kind: str, path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    tok = _tiny_tokenizer(kind)
    if kind == "opt":  # word_embed_proj_dim != hidden_size, like OPT-350m: mapper width = embedding width
        config = OPTConfig(vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=64,
                           num_attention_heads=4, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = OPTForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return f"hf:{path}"


class PixelEncoder:
    """A deterministic stand-in image encoder: mean colour of a 2x2 grid (12-d), normalised."""

    name = "test-pixels"
    dim = 12
    model = torch.nn.Linear(1, 1)  # pretend weights, to check they stay frozen

    def __init__(self):
        for p in self.model.parameters():
            p.requires_grad_(False)

    def encode(self, images, batch_size=16):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((2, 2)), np.float32).reshape(-1) + 1.0
            out.append(a / np.linalg.norm(a))
        return np.stack(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StubPreset(Preset):
    """The LLM loads through the real backend; the encoders are fast test doubles."""

    def backend(self, role):
        from conftest import HashingTextEncoder
        if role in ("mention_encoder", "text_encoder"):
            return _SHARED.setdefault("text", HashingTextEncoder())
        if role == "image_encoder":
            return _SHARED.setdefault("image", PixelEncoder())
        return super().backend(role)


_SHARED: dict = {}


def _preset(llm_spec: str) -> "StubPreset":
    return StubPreset("test", image_encoder="test-pixels", text_encoder="test-hashing", mention_encoder="test-hashing",
                      llm=llm_spec, cue="none")


@pytest.fixture(scope="module", params=["opt", "llama"])
def tiny(request, tmp_path_factory):
    spec = _save_tiny_lm(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    preset = _preset(spec)
    return request.param, preset, preset.backend("llm")


@pytest.fixture
def kb(tmp_path, hashing_encoder):
    return build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, colour in {"red": (220, 30, 30), "blue": (20, 40, 230), "green": (30, 200, 60)}.items():
        paths[name] = str(root / f"{name}.png")
        Image.new("RGB", (16, 16), colour).save(paths[name])
    return paths


def _examples(images=None) -> list[Example]:
    images = images or {}
    rows = [("Collins on stage with Genesis in 1985", "Collins", "Q2", "Phil Collins", images.get("red")),
            ("Collins flew the shuttle Columbia", "Collins", "Q1", "Eileen Collins", images.get("blue")),
            ("Hopper at the Harvard Mark I console", "Hopper", "Q3", "Grace Hopper", images.get("green")),
            ("Obama speaks at the White House", "Obama", "Q4", "Barack Obama", None),
            ("A Falcon lifts off from Cape Canaveral", "Falcon", "Q6", "Falcon 9", images.get("red")),
            ("The falcon dives at its prey", "falcon", "Q7", "Peregrine falcon", images.get("green"))]
    return [Example(Mention.from_text(cap, m, image=img), gold, name, f"s{i}", "test", "train")
            for i, (cap, m, gold, name, img) in enumerate(rows)]


def _mapper_dir(tmp_path, llm, n_tokens=2) -> str:
    mapper = FeatureMapper(MapperConfig(d_vision=PixelEncoder.dim, d_embed=llm.hidden_size, n_tokens=n_tokens,
                                        image_encoder="test-pixels", llm=llm.name))
    return str(mapper.save_pretrained(tmp_path / "mapper"))


# -- prompt ----------------------------------------------------------------------------------------
def test_prompt_text_is_the_papers_template():
    img = np.ones(4, np.float32)
    segments = [Segment("Collins on stage with Genesis", "Collins", "Phil Collins", img),
                Segment("Hopper at\nthe console", "Hopper", "Grace Hopper", None),
                Segment("Obama speaks", "Obama", None, img)]
    expected = ("<image><image>[Text]Collins on stage with Genesis\n"
                "[Question]What does Collins mentioned in the text refer to?\n[Answer]Phil Collins\n"
                "[Text]Hopper at the console\n"
                "[Question]What does Hopper mentioned in the text refer to?\n[Answer]Grace Hopper\n"
                "<image><image>[Text]Obama speaks\n"
                "[Question]What does Obama mentioned in the text refer to?\n[Answer]")
    assert render_prompt(segments, n_image_tokens=2) == expected


def test_each_segment_gets_its_own_image_slots(tiny):
    _, _, llm = tiny
    builder = PromptBuilder(llm.tokenizer, n_image_tokens=3)
    feats = [np.full(PixelEncoder.dim, v, np.float32) for v in (0.1, 0.2, 0.3)]
    segments = [Segment("Collins on stage", "Collins", "Phil Collins", feats[0]),
                Segment("Hopper at the console", "Hopper", "Grace Hopper", None),
                Segment("Falcon lifts off", "Falcon", "Falcon 9", feats[1]),
                Segment("Obama speaks", "Obama", None, feats[2])]
    prompt = builder.build(segments)
    assert [seg for _, seg in prompt.image_slots] == [0, 2, 3]
    # every slot sits right before its segment's "[Text]"
    for pos, _ in prompt.image_slots:
        assert llm.tokenizer.decode(prompt.input_ids[pos + 3: pos + 3 + 6]).strip().startswith("[Text]")
    mapper = FeatureMapper(MapperConfig(PixelEncoder.dim, llm.hidden_size, n_tokens=3))
    with torch.no_grad():
        embeds = embed_prompt(llm.embed_tokens, prompt, segments, mapper)
        visual = mapper(torch.from_numpy(np.stack(feats)))
        plain = llm.embed_tokens(torch.tensor([prompt.input_ids]))
    assert embeds.shape == (1, len(prompt), llm.hidden_size)
    for j, (pos, _) in enumerate(prompt.image_slots):
        assert torch.allclose(embeds[0, pos:pos + 3], visual[j])
    mask = torch.ones(len(prompt), dtype=torch.bool)
    for pos, _ in prompt.image_slots:
        mask[pos:pos + 3] = False
    assert torch.equal(embeds[0, mask], plain[0, mask])  # text positions keep the LLM's own embeddings
    # a query without image: its segment has no visual tokens; without images at all, none
    no_img = builder.build([Segment("Obama speaks", "Obama")])
    assert no_img.image_slots == [] and "<image>" not in no_img.text


def test_training_labels_cover_answer_and_eos_only(tiny):
    _, _, llm = tiny
    builder = PromptBuilder(llm.tokenizer, n_image_tokens=2)
    prompt = builder.build([Segment("Collins on stage", "Collins", "Phil Collins"), Segment("Obama speaks", "Obama")],
                           target="Barack Obama")
    answer = encode_answer(llm.tokenizer, "Barack Obama") + [llm.tokenizer.eos_token_id]
    labelled = [t for t in prompt.labels if t != IGNORE_INDEX]
    assert labelled == answer and prompt.input_ids[-len(answer):] == answer
    assert prompt.labels[: len(prompt) - len(answer)] == [IGNORE_INDEX] * (len(prompt) - len(answer))


# -- trie ------------------------------------------------------------------------------------------
def test_trie_round_trip_and_cache(tiny, kb, tmp_path):
    _, _, llm = tiny
    built = kb_trie(kb, llm.tokenizer, directory=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith(".json") for f in files)
    assert not any(f.endswith(".pkl") for f in files)
    loaded = kb_trie(kb, llm.tokenizer, directory=tmp_path)
    assert loaded.meta.get("from_cache") is True and built.meta.get("from_cache") is False
    for name in ("child_ptr", "child_tok", "child_node", "leaf_group", "group_ptr", "group_entities"):
        assert np.array_equal(getattr(built, name), getattr(loaded, name))
    assert loaded.group_names == built.group_names
    for g in range(built.n_groups):
        assert loaded.group_tokens(g) == built.group_tokens(g)
        assert loaded.contains(built.group_tokens(g))
    # "Phil Collins" names two entities: one group, both members
    g = next(g for g in range(loaded.n_groups) if loaded.name(g) == "Phil Collins")
    assert sorted(kb.entity_at(i).id for i in loaded.entities(g)) == ["Q2", "Q8"]
    assert loaded.meta["n_ambiguous_groups"] == 1 and loaded.n_groups == len(ENTITIES) - 1
    # another KB gets another cache entry
    other = build_kb(ENTITIES[:3], tmp_path / "other.sqlite", progress=False)
    assert kb_trie(other, llm.tokenizer, directory=tmp_path).n_groups == 3


def test_trie_without_usable_names_is_a_clear_error(tiny):
    _, _, llm = tiny
    with pytest.raises(KBError, match="no usable names"):
        TokenTrie.build([(0, "   "), (1, "")], llm.tokenizer)


def test_empty_kb_is_a_clear_error(tiny, tmp_path):
    import sqlite_utils
    _, preset, _ = tiny
    kb = build_kb(ENTITIES[:1], tmp_path / "empty.sqlite", progress=False)
    db = sqlite_utils.Database(tmp_path / "empty.sqlite")
    db.execute("DELETE FROM entities")
    db.execute("UPDATE meta SET value = '0' WHERE key = 'n_entities'")
    db.conn.commit()
    from mel.kb import KnowledgeBase
    with pytest.raises(KBError, match="empty"):
        GemelLinker(KnowledgeBase(kb.path), preset)


def test_beam_search_only_writes_kb_names(tiny, kb):
    _, preset, llm = tiny
    trie = kb_trie(kb, llm.tokenizer, use_cache=False)
    names = {e.name for e in ENTITIES}
    torch.manual_seed(1)
    for _ in range(5):  # random prompts: whatever the (random) model prefers, the output is a KB name
        embeds = torch.randn(1, 12, llm.hidden_size)
        hyps, stats = beam_search(llm.model, trie, embeds, DecodeConfig(num_beams=3, max_new_tokens=32))
        assert hyps and len(hyps) <= 3
        for h in hyps:
            assert h.tokens[-1] == llm.tokenizer.eos_token_id and trie.contains(h.tokens)
            assert llm.tokenizer.decode(h.tokens[:-1]).strip() in names
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert stats.prompt_tokens == 12 and stats.steps >= 1
    # exhaustive scoring agrees with a plain full forward pass (the KV-cache path is exact)
    ranked, _ = score_groups(llm.model, trie, embeds, length_penalty=0.0)
    best = ranked[0]
    with torch.no_grad():
        seq = torch.tensor([best.tokens])
        full = torch.cat([embeds, llm.embed_tokens(seq)], dim=1)
        logp = torch.log_softmax(llm.model(inputs_embeds=full).logits[0].float(), -1)
        expected = sum(float(logp[embeds.shape[1] - 1 + j, t]) for j, t in enumerate(best.tokens))
    assert best.logprob == pytest.approx(expected, abs=1e-3)
    assert abs(hyps[0].logprob) >= 0 and len(ranked) == trie.n_groups


def test_free_generation_may_leave_the_kb_and_says_so(tiny, kb):
    """The ablation without the trie: a random model writes arbitrary text, which is no KB name."""
    _, preset, llm = tiny
    free = FreeVocabulary(llm.tokenizer)
    assert free.stop[llm.tokenizer.eos_token_id] and free.allowed(free.ROOT) is None
    torch.manual_seed(0)
    hyps, _ = beam_search(llm.model, free, torch.randn(1, 12, llm.hidden_size), DecodeConfig(num_beams=3, max_new_tokens=6))
    assert all(free.group_at(free.step(0, h.tokens[-1])) == 0 for h in hyps)  # finished at a stop token
    linker = GemelLinker(kb, preset, mapper="none", constrained=False, trie_cache=False)
    assert linker.name == "gemel-free"
    r = linker.link(Mention.from_text("Collins waves to the crowd", "Collins"))
    assert r.details.mode == "free generation (no trie)"
    names = {e.name for e in ENTITIES}
    assert r.details.not_a_kb_name == (r.details.generated not in names)
    if r.details.not_a_kb_name:
        assert r.prediction is None and not r.candidates
    from mel.evaluate import evaluate
    report = evaluate(linker, [Example(r.mention, "Q2", "Phil Collins", "s1")], progress=False)
    assert report.get("n_not_a_kb_name", 0) == int(r.details.not_a_kb_name)  # counted in the report
    with pytest.raises(InputError, match="free generation"):
        GemelLinker(kb, preset, mapper="none", constrained=False, candidates="dense")


def test_linker_links_to_kb_entities_and_reports(tiny, kb, tmp_path, images):
    _, preset, llm = tiny
    linker = GemelLinker(kb, preset, pool=_examples(images), n_demos=3, mapper=_mapper_dir(tmp_path, llm),
                         show_prompt=True, trie_cache=False)
    ids = {e.id for e in ENTITIES}
    with_image = linker.link(Mention.from_text("Collins waves to the crowd", "Collins", image=images["blue"]))
    without = linker.link(Mention.from_text("Collins waves to the crowd", "Collins"))
    for result in (with_image, without):
        assert result.prediction is not None and result.prediction.id in ids
        assert all(c.entity.id in ids for c in result.candidates)
        d = result.details
        assert d.n_demos == 3 and [x.similarity for x in d.demonstrations] == \
            sorted(x.similarity for x in d.demonstrations)
        assert d.generated.strip() == result.prediction.name
        for stage in ("retrieve", "prompt", "prefill", "decode", "total"):
            assert stage in result.timings
        assert d.prompt.endswith("[Question]What does Collins mentioned in the text refer to?\n[Answer]")
        assert LinkResult.from_json(result.to_json()) == result  # JSON round trip, typed details included
    assert with_image.details.visual_tokens is True
    assert with_image.details.prompt.count("<image>") == 2 * with_image.details.n_visual_segments
    assert without.details.visual_tokens is False and "no image" in without.details.visual_note
    assert not without.details.prompt.split("[Answer]")[-2].endswith("<image>")  # query segment: no tokens
    # zero-shot without a pool still links, and says so
    zero = GemelLinker(kb, preset, mapper="none", trie_cache=False).link(Mention.from_text("Obama speaks", "Obama"))
    assert zero.prediction.id in ids and zero.details.n_demos == 0 and "zero-shot" in zero.details.demonstrations_note


def test_ambiguous_name_is_reported_and_tie_broken(tiny, tmp_path, hashing_encoder):
    _, preset, _ = tiny
    both = [ENTITIES[1], ENTITIES[7]]  # two entities named "Phil Collins": any output is that name
    kb = build_kb(both, tmp_path / "amb.sqlite", text_encoder=hashing_encoder, progress=False)
    linker = GemelLinker(kb, preset, mapper="none", trie_cache=False)
    r = linker.link(Mention.from_text("Collins pitched for the Chicago Cubs", "Collins"))
    amb = r.details.ambiguity
    assert amb.name == "Phil Collins" and sorted(amb.entity_ids) == ["Q2", "Q8"]
    assert r.prediction.id == "Q8" and amb.chosen == "Q8"  # the description shares "Chicago Cubs"
    assert [c.entity.id for c in r.candidates][:2] == ["Q8", "Q2"]
    assert r.candidates[0].score == r.candidates[1].score
    # the gold of a retrieved demonstration beats caption overlap
    pool = [Example(Mention.from_text("Collins pitched again", "Collins"), "Q2", "Phil Collins", "d0")]
    r = GemelLinker(kb, preset, mapper="none", pool=pool, n_demos=1, trie_cache=False).link(
        Mention.from_text("Collins pitched for the Chicago Cubs", "Collins"))
    assert r.prediction.id == "Q2" and "demonstration" in r.details.ambiguity.rule


def test_candidate_mode_ranks_every_candidate(tiny, kb):
    _, preset, _ = tiny
    linker = GemelLinker(kb, preset, mapper="none", candidates="dense", top_k=4, pool=_examples(), n_demos=2)
    assert linker.name == "gemel+dense"
    r = linker.link(Mention.from_text("Collins on stage", "Collins"))
    retrieved = {x.id for x in r.details.retriever}
    assert {c.entity.id for c in r.candidates} == retrieved and len(retrieved) == 4
    assert [c.score for c in r.candidates] == sorted((c.score for c in r.candidates), reverse=True)
    with pytest.raises(InputError, match="unknown GEMEL option"):
        GemelLinker(kb, preset, mapper="none", bogus=1)
    from mel.linkers import build_linker
    bm25 = build_linker("gemel+bm25", kb, preset, mapper="none", top_k=3, pool=_examples(), n_demos=2)
    assert bm25.name == "gemel+bm25" and list(bm25.retrievers) == ["bm25"]
    r = bm25.link(Mention.from_text("Collins on stage", "Collins"))
    assert {c.entity.id for c in r.candidates} == {x.id for x in r.details.retriever} and r.details.scores
    with pytest.raises(MELError, match="gemel\\+bm25 takes its candidates from BM25"):
        build_linker("gemel+bm25", kb, preset, candidates="dense")


def test_candidate_mode_reads_the_kb_once_per_link_not_once_per_candidate(tiny, kb, monkeypatch):
    _, preset, _ = tiny
    queries = []
    real = kb._query
    monkeypatch.setattr(kb, "_query", lambda sql, params=(): queries.append(sql) or real(sql, params))
    mention = Mention.from_text("Collins on stage", "Collins")
    counts = {}
    for top_k in (2, 8):
        linker = GemelLinker(kb, preset, mapper="none", candidates="dense", top_k=top_k, pool=_examples(), n_demos=2)
        linker.link(mention)  # first link: the demonstrations' answers are read (once, then cached)
        queries.clear()
        r = linker.link(mention)
        counts[top_k] = (len(queries), len(r.candidates))
    # dense: the retriever's rows (1) + their KB idxs (1); the LLM's names map back without a query
    assert counts[2][0] == counts[8][0] == 2 and counts[8][1] > counts[2][1] == 2, counts


def test_live_demonstrations_are_added_and_removed_by_sample_id(tiny, kb):
    _, preset, _ = tiny
    linker = GemelLinker(kb, preset, mapper="none", trie_cache=False, n_demos=1)
    assert linker.pool is None and linker.remove_demonstrations(["c1"]) == 0
    new = Example(Mention.from_text("Saldana at the premiere", "Saldana"), "Q4", "Barack Obama", "c1")
    assert linker.add_demonstrations([new]) == 1 and linker.pool.keys() == ["c1"]
    r = linker.link(Mention.from_text("Saldana smiles", "Saldana"))
    assert [d.sample_id for d in r.details.demonstrations] == ["c1"]
    assert r.details.demonstrations[0].gold_name == "Barack Obama"  # the KB's name: what the trie can generate
    assert linker.remove_demonstrations(["c1"]) == 1 and "c1" not in linker.pool
    r = linker.link(Mention.from_text("Saldana smiles", "Saldana"))
    assert r.details.demonstrations == [] and r.details.demonstrations_note == "the pool returned no demonstration"


# -- demonstrations ----------------------------------------------------------------------------------
def test_demonstrations_least_similar_first_and_query_excluded(hashing_encoder):
    examples = _examples()
    pool = DemonstrationPool(examples, hashing_encoder, use_cache=False)
    query = examples[0].mention  # "Collins"
    demos = pool.retrieve(query, k=3)
    sims = [d.similarity for d in demos]
    assert sims == sorted(sims) and demos[-1].similarity == pytest.approx(1.0)
    assert demos[-1].example.mention.text == "Collins"
    excluded = pool.retrieve(query, k=3, exclude_id="s0")
    assert "s0" not in {d.example.sample_id for d in excluded} and len(excluded) == 3
    batch = pool.retrieve_many([e.mention for e in examples], 2, exclude_ids=[e.sample_id for e in examples])
    for ex, ds in zip(examples, batch, strict=True):
        assert ex.sample_id not in {d.example.sample_id for d in ds} and len(ds) == 2
    # a correction is retrievable at once
    new = Example(Mention.from_text("Saldana at the premiere", "Saldana"), "Q9", "Zoe Saldana", "c1")
    assert pool.add([new]) == 1
    assert pool.retrieve(Mention.from_text("Saldana smiles", "Saldana"), k=1)[0].example.sample_id == "c1"
    # ... and leaves by its sample_id; the other rows keep their vectors
    assert "c1" in pool and pool.keys()[-1] == "c1" and len(pool.vectors) == len(pool)
    before = pool.retrieve(query, k=3)
    assert pool.remove("c1") == 1 and pool.remove("c1") == 0 and "c1" not in pool.keys()
    assert len(pool) == len(examples) and pool.vectors.shape == (len(examples), pool.dim)
    assert [(d.example.sample_id, d.similarity) for d in pool.retrieve(query, k=3)] == \
        [(d.example.sample_id, d.similarity) for d in before]
    with pytest.raises(InputError, match="sample_id"):
        pool.remove("")


def test_demonstration_pool_changes_while_others_retrieve(hashing_encoder):
    """Retrieval sees the pool before or after a change, never examples and vectors out of step."""
    import threading
    pool = DemonstrationPool(_examples(), hashing_encoder, use_cache=False)
    extra = [Example(Mention.from_text(f"Saldana number {i}", "Saldana"), "Q9", "Zoe Saldana", f"c{i}")
             for i in range(40)]
    errors = []

    def churn():
        for ex in extra:
            pool.add([ex])
            pool.remove(ex.sample_id)

    def read():
        try:
            for _ in range(200):
                for d in pool.retrieve(Mention.from_text("Saldana smiles", "Saldana"), k=2):
                    assert d.example.gold_id in ("Q9",) or d.example.sample_id.startswith("s")
        except Exception as exc:  # reported below: an exception in a thread does not fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=churn), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.keys() == [ex.sample_id for ex in _examples()]


def test_demonstration_embeddings_are_cached(hashing_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("MEL_CACHE", str(tmp_path))
    calls = []

    class Counting:
        name, dim = hashing_encoder.name, hashing_encoder.dim

        def encode(self, texts, batch_size=64):
            calls.append(len(texts))
            return hashing_encoder.encode(texts)

    a = DemonstrationPool(_examples(), Counting())
    b = DemonstrationPool(_examples(), Counting())
    assert calls == [6] and np.array_equal(a.vectors, b.vectors)
    assert list((tmp_path / "gemel" / "demos").glob("*.safetensors"))


# -- mapper and training -------------------------------------------------------------------------------
def test_mapper_round_trip_and_mismatch(tmp_path):
    mapper = FeatureMapper(MapperConfig(d_vision=12, d_embed=8, n_tokens=4))
    path = mapper.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = FeatureMapper.from_pretrained(path, d_vision=12, d_embed=8)
    x = torch.randn(3, 12)
    assert torch.equal(mapper(x), loaded(x)) and loaded(x).shape == (3, 4, 8)
    with pytest.raises(CheckpointError, match="embeds at 16"):
        FeatureMapper.from_pretrained(path, d_embed=16)
    with pytest.raises(CheckpointError, match="1280-d"):
        FeatureMapper.from_pretrained(path, d_vision=1280)
    cfg = json.loads((path / "config.json").read_text())
    cfg["config"]["n_tokens"] = 2  # weights no longer fit the config
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        FeatureMapper.from_pretrained(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        FeatureMapper.from_pretrained(tmp_path / "missing")


def test_only_the_mapper_is_trained(tiny, kb, tmp_path, images):
    _, preset, llm = tiny
    trainer = MapperTrainer(_examples(images), kb, preset, tmp_path / "out",
                            GemelTrainConfig(n_demos=2, n_image_tokens=2, grad_accum=1, epochs=1), progress=False)
    loss = trainer.step_loss(trainer.items[0])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.mapper.parameters())
    assert all(not p.requires_grad and p.grad is None for p in llm.model.parameters())
    encoder = preset.backend("image_encoder")
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())
    summary = trainable_summary(trainer.mapper, llm.model, encoder.model)
    assert summary["frozen_with_grad"] == [] and 0 < summary["trainable_fraction"] < 1
    print(f"\ntrainable: {summary['trainable']:,} of {summary['total']:,} parameters "
          f"({100 * summary['trainable_fraction']:.2f}%, tiny test model)")


def test_training_on_all_examples_includes_prompts_without_an_image(tiny, kb, tmp_path):
    # --examples all (paper-faithful): an image-free prompt gives the mapper no gradient, and no crash
    _, preset, _ = tiny
    trainer = MapperTrainer(_examples(), kb, preset, tmp_path / "out",
                            GemelTrainConfig(n_demos=1, n_image_tokens=2, grad_accum=2, epochs=1, examples="all"),
                            progress=False)
    assert len(trainer.items) == 6 and not any(s.has_image for it in trainer.items for s in it.segments)
    before = {k: v.clone() for k, v in trainer.mapper.state_dict().items()}
    summary = trainer.run()
    assert summary["steps"] == 3 and all(torch.equal(before[k], v) for k, v in trainer.mapper.state_dict().items())


def test_training_lowers_the_loss_and_resumes(tiny, kb, tmp_path, images):
    kind, preset, _ = tiny
    config = GemelTrainConfig(lr=3e-2, epochs=8, grad_accum=2, warmup_ratio=0.1, n_demos=1, n_image_tokens=2,
                              examples="with-query-image", save_every=1, seed=3)
    examples = _examples(images)
    trainer = MapperTrainer(examples, kb, preset, tmp_path / "full", config, progress=False)
    assert trainer.data_report["n_items"] == 5  # the Obama example has no image and is skipped
    result = trainer.run(command="test")
    first, last = result["losses"][0], result["losses"][-1]
    assert last < first, f"{kind}: loss did not go down ({first:.4f} -> {last:.4f})"
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["training"]["finished"] and saved["training"]["optimizer_steps"] == result["steps"]
    assert not (tmp_path / "full.trainer_state").exists()  # removed after a finished run
    full, _ = FeatureMapper.from_pretrained(tmp_path / "full")

    # interrupted after 7 examples, then resumed: same weights as the uninterrupted run
    interrupted = MapperTrainer(examples, kb, preset, tmp_path / "cut", config, progress=False)
    calls = {"n": 0}
    original = interrupted.step_loss

    def failing(item):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return original(item)

    interrupted.step_loss = failing
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(command="test")
    assert (tmp_path / "cut.trainer_state" / "state.json").exists()
    (tmp_path / "cut" / "README.md").write_text("notes")  # survives the checkpoint rewrites
    resumed = MapperTrainer(examples, kb, preset, tmp_path / "cut", config, progress=False)
    again = resumed.run(resume=True, command="test")
    assert (tmp_path / "cut" / "README.md").read_text() == "notes"
    assert again["steps"] == result["steps"]
    cut, _ = FeatureMapper.from_pretrained(tmp_path / "cut")
    for (name, a), (_, b) in zip(full.state_dict().items(), cut.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(CheckpointError, match="nothing to resume"):
        MapperTrainer(examples, kb, preset, tmp_path / "cut", config, progress=False).run(resume=True)


# -- the packaged SmolLM2 ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_links_a_mention_sensibly(tmp_path, hashing_encoder):
    from mel.presets import get_preset
    offline = get_preset("offline")
    preset = StubPreset("offline-llm", image_encoder="test-pixels", text_encoder="test-hashing",
                        mention_encoder="test-hashing", llm=offline.llm, cue="none")
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    pool = [Example(Mention.from_text("Collins on stage with Genesis in 1985", "Collins"), "Q2", "Phil Collins", "d1"),
            Example(Mention.from_text("Hopper at the Harvard Mark I console", "Hopper"), "Q3", "Grace Hopper", "d2"),
            Example(Mention.from_text("Michelle Obama visits a school", "Michelle Obama"), "Q5", "Michelle Obama", "d3")]
    linker = GemelLinker(kb, preset, pool=pool, n_demos=3, mapper="none", trie_cache=False)
    # the demonstrations name other people; the answer has to come from the query's own text
    r = linker.link(Mention.from_text("Barack Obama signs the bill at the White House", "Barack Obama"))
    assert r.prediction.id == "Q4", r.details.beams
    assert r.details.generated.strip() == "Barack Obama" and r.score < 0
    assert r.score == pytest.approx(r.details.beams[0].logprob, abs=1e-3)  # score = sequence log-prob
    # a bare surname: the demonstration "Collins -> Phil Collins" carries the answer
    r = linker.link(Mention.from_text("Collins sings In the Air Tonight", "Collins"))
    assert r.prediction.id in ("Q2", "Q8") and r.prediction.name == "Phil Collins", r.details.beams
    assert r.details.ambiguity.name == "Phil Collins"  # Q2 and Q8 share the name
    assert r.prediction.id == "Q2"  # tie-break: the gold of the retrieved demonstration
    # without the trie the same model writes the name freely; exact name match maps it to the KB
    free = GemelLinker(kb, preset, pool=pool, n_demos=3, mapper="none", constrained=False)
    r = free.link(Mention.from_text("Barack Obama signs the bill at the White House", "Barack Obama"))
    assert r.details.generated == "Barack Obama" and r.prediction.id == "Q4", r.details.beams
    assert r.details.not_a_kb_name is False


@pytest.mark.slow
def test_offline_preset_trains_only_the_mapper(tmp_path, hashing_encoder):
    """The real offline models: SmolLM2 and EfficientNet-Lite0 stay frozen, only the mapper gets gradients."""
    from skimage import data as skdata

    from mel.presets import get_preset
    preset = get_preset("offline")
    image = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(image)
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    examples = [Example(Mention.from_text("Collins before the launch of STS-93", "Collins", image=str(image)), "Q1",
                        "Eileen Collins", "a0"),
                Example(Mention.from_text("Collins on stage with Genesis", "Collins"), "Q2", "Phil Collins", "a1")]
    trainer = MapperTrainer(examples, kb, preset, tmp_path / "out", GemelTrainConfig(n_demos=1), progress=False)
    assert trainer.data_report["n_items"] == 2  # both prompts hold the astronaut (as query or as demonstration)
    trainer.step_loss(trainer.items[0]).backward()
    llm, encoder = preset.backend("llm"), preset.backend("image_encoder")
    assert all(p.grad is not None for p in trainer.mapper.parameters())
    assert all(not p.requires_grad and p.grad is None for p in llm.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())
    summary = trainable_summary(trainer.mapper, llm.model, encoder.model)
    assert summary["trainable"] == 1280 * 576 * 4 + 576 * 4 and summary["trainable_fraction"] < 0.03
    print(f"\noffline preset: trainable {summary['trainable']:,} of {summary['total']:,} parameters "
          f"({100 * summary['trainable_fraction']:.2f}%): the feature mapper only")


def test_gemel_config_takes_the_keyword_options():
    config = GemelConfig.from_options(candidates="dense", top_k=5, dense_query="mention")
    assert config.candidate_options == {"dense_query": "mention"}
    assert config.ranking == "all"  # every candidate scored, and fused, in candidate mode
    assert config.fused
    assert config.replace(fuse=False).candidate_options == {"dense_query": "mention"}
    assert not config.replace(fuse=False).fused
    assert GemelConfig().ranking == "beam"
    with pytest.raises(InputError, match="unknown GEMEL option"):
        GemelConfig.from_options(n_demo=3)
    with pytest.raises(InputError, match="num_beams"):
        GemelConfig(num_beams=0)

