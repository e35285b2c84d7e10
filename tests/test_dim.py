"""DIM: fusion head, masking, loss, candidates, checkpoints, linker, trainer, enrichment, shipped head."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mel.dim.candidates import (
    CandidateConfig,
    CandidateGenerator,
    bm25_names,
    candidate_lists,
    candidate_recall,
    fts_neighbours,
    hard_negatives,
    save_candidate_lists,
)
from mel.dim.linker import DimLinker, load_head
from mel.dim.loss import candidate_n_pair_loss, in_batch_n_pair_loss, n_pair_loss
from mel.dim.model import DimFusion, FusionConfig
from mel.dim.pairs import N_PAIR_FEATURES, PAIR_FEATURES, EntityFacts, MentionContext, pair_features
from mel.errors import CheckpointError, InputError, KBError
from mel.evaluate import evaluate
from mel.kb import build_kb
from mel.presets import Preset
from mel.training import save_pretrained_dir
from mel.types import Entity, Example, FeatureMask, Mention

REPO = Path(__file__).resolve().parents[1]

ENTITIES = [
    Entity("Q1", "Eileen Collins", [], "Sex: female. Birth: 1956, Elmira. Occupation: astronaut, aviator.", "person"),
    Entity("Q2", "Phil Collins", [], "Sex: male. Birth: 1951, London. Occupation: drummer, singer.", "person"),
    Entity("Q3", "Grace Hopper", ["Amazing Grace"], "Sex: female. Birth: 1906. Death: 1992. Occupation: computer scientist.", "person"),
    Entity("Q4", "Chuck Norris", [], "Sex: male. Birth: 1940, Ryan. Occupation: actor, karateka.", "person"),
    Entity("Q5", "Frank Norris", [], "Sex: male. Birth: 1870, Chicago. Death: 1902. Occupation: novelist.", "person"),
    Entity("Q6", "Michael Collins", [], "Sex: male. Birth: 1930, Rome. Death: 2021. Occupation: astronaut.", "person"),
    Entity("Q7", "Emma Watson", [], "Sex: female. Birth: 1990, Paris. Occupation: actor, film actor.", "person"),
    Entity("Q8", "James Watson", [], "Sex: male. Birth: 1928, Chicago. Occupation: biologist, geneticist.", "person"),
]
TINY = dict(d_model=32, n_heads=4, ffn_dim=64, out_dim=16, dropout=0.0)


@pytest.fixture
def kb(tmp_path, hashing_encoder):
    return build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)


def hashing_preset():
    return Preset("test", image_encoder="efficientnet-lite0", text_encoder="test-hashing", mention_encoder="test-hashing",
                  llm="", cue="imagenet-labels")


def mention_batch(b=3, text_dim=64, image_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(b, text_dim, generator=g), "mention": torch.randn(b, text_dim, generator=g),
            "image": torch.randn(b, image_dim, generator=g), "cue": torch.randn(b, text_dim, generator=g),
            "image_mask": torch.tensor([True, False, True][:b]), "cue_mask": torch.tensor([False, True, True][:b])}


def tiny_model(**kw) -> DimFusion:
    torch.manual_seed(0)
    return DimFusion(FusionConfig(text_dim=64, image_dim=12, cue_dim=64, **{**TINY, **kw})).eval()


# -- fusion head --------------------------------------------------------------------------------------
def test_fusion_shapes_and_unit_norm():
    model = tiny_model(n_pair_features=N_PAIR_FEATURES)
    m = model.encode_mentions(**mention_batch())
    e = model.encode_entities(torch.randn(3 * 5, 64), torch.randn(3 * 5, 12), torch.zeros(15, dtype=torch.bool))
    assert m.shape == (3, 16) and e.shape == (15, 16)
    assert torch.allclose(m.norm(dim=-1), torch.ones(3), atol=1e-5)
    scores = model.score_candidates(m, e.view(3, 5, 16), torch.rand(3, 5, N_PAIR_FEATURES))
    assert scores.shape == (3, 5) and torch.isfinite(scores).all()
    assert model.in_batch_scores(m, e[:3]).shape == (3, 3)


def test_masked_image_and_cue_values_do_not_matter():
    model = tiny_model()
    batch = mention_batch()
    other = dict(batch)
    # row 1 has no image, row 0 has no cue: give them wildly different values
    other["image"] = batch["image"].clone()
    other["image"][1] = 1000 * torch.randn(12)
    other["cue"] = batch["cue"].clone()
    other["cue"][0] = torch.full((64,), float("nan"))  # not even a NaN may leak
    with torch.no_grad():
        a, b = model.encode_mentions(**batch), model.encode_mentions(**other)
    assert torch.equal(a, b)
    # entity side: a masked entity image is ignored as well
    text = torch.randn(2, 64)
    with torch.no_grad():
        e1 = model.encode_entities(text, torch.zeros(2, 12), torch.tensor([False, False]))
        e2 = model.encode_entities(text, torch.randn(2, 12), torch.tensor([False, False]))
    assert torch.equal(e1, e2)


def test_present_features_and_attention_change_the_output():
    model = tiny_model()
    batch = mention_batch()
    with torch.no_grad():
        base = model.encode_mentions(**batch)
        for name, row in (("context", 0), ("mention", 0), ("image", 0), ("cue", 1)):
            changed = dict(batch)
            changed[name] = batch[name].clone()
            changed[name][row] += 3.0
            out = model.encode_mentions(**changed)
            assert not torch.allclose(out[row], base[row]), name
        # the attention output itself reaches the embedding: silencing it changes the result
        model.attention.out.weight.zero_()
        model.attention.out.bias.zero_()
        assert not torch.allclose(model.encode_mentions(**batch), base)


def test_mask_is_respected_in_training_mode_too():
    model = tiny_model()
    model.train()
    batch = mention_batch()
    other = dict(batch, image=batch["image"].clone())
    other["image"][1] = 50.0
    torch.manual_seed(1)
    a = model.encode_mentions(**batch)
    torch.manual_seed(1)
    b = model.encode_mentions(**other)
    assert torch.allclose(a, b)


# -- loss ---------------------------------------------------------------------------------------------
def test_n_pair_loss_hand_checked():
    loss = n_pair_loss(torch.tensor([0.0]), torch.tensor([[0.0]]))
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    loss = n_pair_loss(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0], [2.0, -1e9]]),
                       torch.tensor([[True, True], [True, False]]))
    expected = (math.log(1 + 2 * math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    # in-batch: two mentions of the same entity are not each other's negatives
    scores = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    loss = in_batch_n_pair_loss(scores, torch.tensor([7, 7, 9]))
    expected = (math.log(1 + math.exp(1)) * 2 + math.log(1 + 2 * math.exp(1))) / 3
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    # candidate form: the gold column is the positive, padding is ignored
    scores = torch.tensor([[0.0, 3.0, -100.0]])
    loss = candidate_n_pair_loss(scores, torch.tensor([1]), torch.tensor([[True, True, False]]))
    assert math.isclose(float(loss), math.log(1 + math.exp(-3)), rel_tol=1e-5)
    with pytest.raises(ValueError):
        n_pair_loss(torch.zeros(2), torch.zeros(3, 4))


@pytest.mark.slow
def test_n_pair_loss_decreases_on_a_toy_problem():
    torch.manual_seed(0)
    model = DimFusion(FusionConfig(text_dim=16, image_dim=8, cue_dim=16, **{**TINY, "dropout": 0.1}))
    n, c = 64, 6
    entity_text = torch.nn.functional.normalize(torch.randn(n, c, 16), dim=-1)
    gold = torch.randint(0, c, (n,))
    context = entity_text[torch.arange(n), gold] + 0.3 * torch.randn(n, 16)  # the mention looks like its gold
    feats = {"context": context, "mention": context, "image": torch.zeros(n, 8), "cue": torch.zeros(n, 16),
             "image_mask": torch.zeros(n, dtype=torch.bool), "cue_mask": torch.zeros(n, dtype=torch.bool)}
    valid = torch.ones(n, c, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        m = model.encode_mentions(**feats)
        e = model.encode_entities(entity_text.view(n * c, 16), torch.zeros(n * c, 8),
                                  torch.zeros(n * c, dtype=torch.bool)).view(n, c, -1)
        loss = candidate_n_pair_loss(model.score_candidates(m, e), gold, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# -- candidates and hard negatives ----------------------------------------------------------------------
def test_hard_negatives_are_fts_neighbours_without_the_gold(kb):
    gold = kb.idx_of("Q1")  # Eileen Collins
    neighbours = {kb.entity_at(i).id for i in fts_neighbours(kb, gold, 5)}
    assert neighbours == {"Q2", "Q6"}  # the other Collinses, not the gold, nothing unrelated
    hard = hard_negatives(kb, gold, 4, mention_text="Eileen Collins")
    assert gold not in hard and len(hard) == len(set(hard))
    assert {kb.entity_at(i).id for i in hard[:2]} == {"Q2", "Q6"}
    # BM25 over names ignores descriptions: "Chicago" is only in descriptions
    assert bm25_names(kb, "Chicago", 5) == []
    assert bm25_names(kb, 'x") OR (y', 5) == []  # hostile input is quoted, not an FTS syntax error


def test_candidate_generation_and_recall(kb, hashing_encoder):
    gen = CandidateGenerator(kb, CandidateConfig(n_bm25=5, n_dense=2, n_dense_mention=0))
    texts = ["Norris", "Watson"]
    vecs = hashing_encoder.encode(["Norris [SEP] Norris in 1976", "Watson [SEP] Watson at the premiere"])
    pools = gen.generate(texts, vecs)
    ids = [{kb.entity_at(i).id for i in p.idxs} for p in pools]
    assert {"Q4", "Q5"} <= ids[0] and {"Q7", "Q8"} <= ids[1]
    assert all(pools[0].bm25[kb.idx_of(q)][0] <= 1.0 for q in ("Q4", "Q5"))
    assert set(pools[0].dense) and all(i in pools[0].idxs for i in pools[0].dense)
    recall = candidate_recall([[1, 2, 3], [4, 5], [6]], [3, 9, None], ks=(1, 3))
    assert recall["recall@1"] == 0.0 and recall["recall@3"] == round(1 / 3, 4) and recall["recall@pool"] == round(1 / 3, 4)


def test_pair_features_see_names_and_years():
    norris = MentionContext.of("Norris", "Norris in 1976, on the set")
    chuck = EntityFacts.of(ENTITIES[3])
    frank = EntityFacts.of(ENTITIES[4])
    fc = dict(zip(PAIR_FEATURES, pair_features(norris, chuck), strict=True))
    ff = dict(zip(PAIR_FEATURES, pair_features(norris, frank), strict=True))
    assert fc["last_token"] == ff["last_token"] == 1.0 and fc["mention_in_name"] == 1.0
    assert fc["after_death"] == 0.0 and ff["after_death"] == 1.0 and math.isclose(fc["age"], 0.36)
    exact = dict(zip(PAIR_FEATURES, pair_features(MentionContext.of("Grace Hopper", "Grace Hopper at work"),
                                                  EntityFacts.of(ENTITIES[2])), strict=True))
    assert exact["name_exact"] == 1.0 and exact["char_sim"] == 1.0
    alias = dict(zip(PAIR_FEATURES, pair_features(MentionContext.of("Amazing Grace", "Amazing Grace, she said"),
                                                  EntityFacts.of(ENTITIES[2])), strict=True))
    assert alias["alias_exact"] == 1.0 and alias["sex_agree"] == 1.0


# -- checkpoints --------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = tiny_model(n_pair_features=N_PAIR_FEATURES, pair_feature_names=PAIR_FEATURES)
    save_pretrained_dir(model, model.config, tmp_path / "head")
    loaded, _ = load_head(tmp_path / "head")
    batch = mention_batch()
    with torch.no_grad():
        assert torch.equal(model.encode_mentions(**batch), loaded.encode_mentions(**batch))
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    cfg["config"]["d_model"] = 48
    (tmp_path / "head" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_head(tmp_path / "head")
    cfg["config"]["d_model"] = 32
    cfg["config"]["pair_feature_names"] = ["bm25"] + list(PAIR_FEATURES[1:-1]) + ["something_else"]
    (tmp_path / "head" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pair features"):
        load_head(tmp_path / "head")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_head(tmp_path / "nothing-here")


# -- linker -------------------------------------------------------------------------------------------
def name_match_head(path: Path, text_dim: int) -> Path:
    """A head whose score is driven by the name-match pair features (hand-set weights)."""
    model = DimFusion(FusionConfig(text_dim=text_dim, image_dim=1280, cue_dim=text_dim, **TINY,
                                   n_pair_features=N_PAIR_FEATURES, pair_hidden=4, pair_feature_names=PAIR_FEATURES,
                                   text_encoder="test-hashing"))
    with torch.no_grad():
        for p in model.pair_mlp.parameters():
            p.zero_()
        first, second, last = model.pair_mlp[0], model.pair_mlp[2], model.pair_mlp[4]
        weights = {"name_exact": 5.0, "mention_in_name": 2.0, "after_death": -3.0, "before_birth": -3.0,
                   "sex_agree": 1.0, "cos_context": 1.0}
        for name, w in weights.items():
            first.weight[0, PAIR_FEATURES.index(name)] = w
        first.bias[0] = 10.0  # stays positive through the ReLU
        second.weight[0, 0] = 1.0
        last.weight[0, 0] = 1.0
        model.logit_scale.fill_(-10.0)  # the untrained cosine term ~ 0
    return save_pretrained_dir(model, model.config, path)


def test_linker_ranks_on_a_small_kb(kb, tmp_path, hashing_encoder):
    head = name_match_head(tmp_path / "head", hashing_encoder.dim)
    linker = DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder)
    mentions = [Mention.from_text("Norris in 1976, on the set", "Norris"),
                Mention.from_text("Phil Collins on stage with Genesis", "Phil Collins"),
                Mention.from_text("Watson, in her dress, at the premiere", "Watson")]
    results = list(linker.pipe(mentions, k=5, batch_size=2))
    assert [r.prediction.id for r in results] == ["Q4", "Q2", "Q7"]
    assert linker.link(mentions[0]).prediction.id == "Q4"  # link() == pipe() for one mention
    r = results[0]
    assert r.linker == "dim" and r.details.protocol == "whole-kb"
    assert r.details.feature_mask == FeatureMask(context=True, mention=True, image=False, cue=False)
    assert r.details.cue is None and r.candidates[0].source.startswith("dim:")
    assert all(a.score >= b.score for a, b in zip(r.candidates, r.candidates[1:], strict=False))
    assert {"encode", "candidates", "pair_features", "fusion", "total"} <= set(r.timings)

    # DIM's candidate-list protocol: rank inside the given list only, and say so
    m = Mention("Norris in 1976, on the set", 0, 6, id="m1")
    lists = candidate_lists(["m1"], ["Q5"], [[kb.idx_of("Q4")]], kb, size=3, seed=0)
    assert len(lists["m1"]) == 3 and "Q5" in lists["m1"] and "Q4" in lists["m1"]
    save_candidate_lists(lists, tmp_path / "lists.jsonl")
    listed = DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder, protocol="candidate-list",
                       candidate_file=tmp_path / "lists.jsonl")
    r = listed.link(m)
    assert {c.entity.id for c in r.candidates} == set(lists["m1"]) and "candidate-list" in r.details.protocol
    # and the evaluation report is labelled with it, not as whole-KB ranking
    assert evaluate(listed, [Example(m, "Q5", "x", "m1")], progress=False)["protocol"].startswith("candidate lists")
    assert evaluate(linker, [Example(m, "Q5", "x", "m1")], progress=False)["protocol"] == "whole-KB ranking"
    with pytest.raises(InputError, match="no candidate list"):
        listed.link(Mention("Norris in 1976", 0, 6, id="unknown"))
    with pytest.raises(InputError, match="candidate_file"):
        DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder, protocol="candidate-list")
    with pytest.raises(CheckpointError, match="trained on text encoder"):
        DimLinker(kb, Preset("x", "efficientnet-lite0", "minilm", "minilm", "", ""), checkpoint=head)
    other = type("OtherEncoder", (), {"name": "other", "dim": hashing_encoder.dim, "encode": hashing_encoder.encode})()
    with pytest.raises(KBError, match="was embedded with 'test-hashing'"):
        DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=other)


def test_linker_uses_the_image_and_records_the_cue(kb, tmp_path, hashing_encoder):
    skimage = pytest.importorskip("skimage")
    from PIL import Image
    path = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    head = name_match_head(tmp_path / "head", hashing_encoder.dim)
    linker = DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder)
    r = linker.link(Mention.from_text("Watson with her cat", "Watson", image=str(path)))
    assert r.details.feature_mask.image and r.details.feature_mask.cue
    assert r.details.cue.provider == "imagenet-labels" and "cat" in r.details.cue.text
    r = linker.link(Mention.from_text("Watson with her cat", "Watson", image=str(tmp_path / "missing.jpg")))
    assert not r.details.feature_mask.image and "image not used" in r.details.note


# -- trainer ------------------------------------------------------------------------------------------
def write_tiny_training_set(root, text_encoder, *, dev: bool):
    """A jsonl training set of ambiguous names (root/data: train.jsonl, dev.jsonl when `dev`, kb.jsonl)
    and its KB (root/kb.sqlite, embedded with `text_encoder`); returns the data folder."""
    from mel.datasets import write_jsonl_examples, write_jsonl_kb

    rows = [("Norris in 1976", "Norris", "Q4"), ("Frank Norris, novelist, 1899", "Frank Norris", "Q5"),
            ("Collins on the Shuttle, 1999", "Collins", "Q1"), ("Phil Collins drumming", "Phil Collins", "Q2"),
            ("Watson at the premiere", "Watson", "Q7"), ("Watson and Crick, 1953", "Watson", "Q8")] * 3
    examples = [Example(Mention.from_text(c, m, id=f"s{i}#0"), gold, sample_id=f"s{i}#0", split="train")
                for i, (c, m, gold) in enumerate(rows)]
    data = root / "data"
    data.mkdir()
    write_jsonl_examples(examples, data / "train.jsonl")
    if dev:
        write_jsonl_examples(examples[:6], data / "dev.jsonl")
    write_jsonl_kb(ENTITIES, data / "kb.jsonl")
    build_kb(ENTITIES, root / "kb.sqlite", text_encoder=text_encoder, progress=False)
    return data


@pytest.mark.slow
def test_train_cli_writes_a_head_and_resumes(tmp_path, hashing_encoder, monkeypatch):
    from mel.cli import main

    data = write_tiny_training_set(tmp_path, hashing_encoder, dev=True)
    # the trainer loads the preset's encoders: hand it the hashing one instead of a real model
    monkeypatch.setattr(Preset, "backend", lambda self, role: {"text_encoder": hashing_encoder,
                                                               "image_encoder": StubImageEncoder()}[role])
    out = tmp_path / "head"
    args = ["train", "dim", "--format", "jsonl", "--data", str(data), "--kb", str(tmp_path / "kb.sqlite"),
            "--preset", "offline", "--out", str(out), "--epochs", "1", "--batch-size", "4", "--d-model", "32",
            "--n-heads", "4", "--ffn-dim", "64", "--out-dim", "16", "--cache-dir", str(tmp_path / "cache"),
            "--quiet", "--train-width", "6", "--n-hard", "2"]
    assert main(args + ["--keep-state"]) == 0
    payload = json.loads((out / "config.json").read_text())
    assert payload["model_type"] == "DimFusion" and payload["epoch"] == 1 and "hits@1" in payload["dev"]
    assert payload["selected_on"] == "heldout" and payload["weights_dtype"] == "float16"
    assert list((tmp_path / "cache").glob("train-*.safetensors"))  # features cached for the next run
    state = out.with_name("head.trainer_state")
    # one state directory: the last epoch's weights, the optimizer and state.json, published together
    assert json.loads((state / "state.json").read_text())["epoch"] == 1
    assert {"model.safetensors", "optimizer.safetensors", "config.json"} <= {p.name for p in state.iterdir()}
    two_epochs = args[:args.index("--epochs") + 1] + ["2"] + args[args.index("--epochs") + 2:]
    assert main(two_epochs + ["--resume", "--lr", "1e-3"]) == 2  # other settings: refused, state kept
    assert main(two_epochs + ["--resume"]) == 0
    assert not state.exists()  # a finished run removes its resumable state
    assert main(two_epochs + ["--resume"]) == 2  # nothing left to resume


class StubImageEncoder:
    name, dim = "stub", 8

    def encode(self, images, batch_size=16):
        pytest.fail("a text-only dataset must not run the image encoder")


# -- enrichment -----------------------------------------------------------------------------------------
def test_enrich_keeps_originals_and_reindexes(kb, tmp_path, hashing_encoder):
    from mel.dim.enrich import enrich_kb, original_descriptions
    from mel.kb import KnowledgeBase

    def fake_llm(prompts):
        return [f"A person known for zeppelins. {p.splitlines()[0][-5:]}. Then a half sent" for p in prompts]

    new, n = enrich_kb(kb.path, tmp_path / "enriched.sqlite", fake_llm, text_encoder=hashing_encoder, limit=3,
                       progress=False, llm_name="fake")
    assert n == 3 and new.size == kb.size
    assert new.get("Q1").description.startswith("A person known for zeppelins") and new.get("Q1").description.endswith(".")
    assert new.get("Q8").description == kb.get("Q8").description  # beyond --limit: untouched
    assert original_descriptions(new)["Q1"] == kb.get("Q1").description and original_descriptions(kb) == {}
    assert {new.entity_at(i).id for i, _ in new.search_bm25("zeppelins", 5)} == {"Q1", "Q2", "Q3"}
    assert json.loads(dict(new.db.execute("SELECT key, value FROM meta").fetchall())["enrichment"])["llm"] == "fake"
    with pytest.raises(Exception, match="different file"):
        enrich_kb(kb.path, kb.path, fake_llm)
    assert KnowledgeBase(kb.path).get("Q1").description == ENTITIES[0].description  # source untouched


def test_train_flags_come_from_the_config_and_keep_their_names():
    from mel.cli import build_parser
    from mel.cli_kit import config_from_args
    from mel.dim.train import DimTrainConfig
    base = ["train", "dim", "--format", "jsonl", "--data", "D", "--kb", "K", "--out", "O"]
    args = build_parser().parse_args(base)
    assert config_from_args(DimTrainConfig, args) == DimTrainConfig()  # the flags' defaults are the config's
    assert args.preset == "offline"
    args = build_parser().parse_args(base + ["--n-hard", "2", "--batch_size", "4", "--no-pair-features", "--no-image",
                                             "--save-dtype", "float32", "--max-steps", "3", "--threads", "1"])
    config = config_from_args(DimTrainConfig, args)
    assert (config.n_hard, config.batch_size, config.max_steps) == (2, 4, 3)
    assert not config.pair_features
    assert not config.image
    assert config.cue
    assert config.save_dtype == "float32"
    assert args.threads == 1


def test_head_save_pretrained_round_trip(tmp_path):
    head = DimFusion(FusionConfig(text_dim=8, image_dim=6, cue_dim=8, d_model=16, n_heads=2, ffn_dim=16, out_dim=8))
    head.save_pretrained(tmp_path / "head", extra={"epoch": 3})
    back, payload = DimFusion.from_pretrained(tmp_path / "head")
    assert payload["epoch"] == 3
    assert (back.config.d_model, back.config.out_dim, back.config.image_dim) == (16, 8, 6)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.state_dict().values(), strict=True))


def test_candidate_lists_command_and_its_old_name(tmp_path, hashing_encoder, monkeypatch, capsys):
    from mel.cli import main
    from mel.datasets import write_jsonl_examples
    from mel.dim import candidates
    build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    data = tmp_path / "data"
    data.mkdir()
    examples = [Example(Mention.from_text("Collins on the Shuttle", "Collins", id=f"s{i}#0"), "Q1", sample_id=f"s{i}#0")
                for i in range(2)]
    write_jsonl_examples(examples, data / "dev.jsonl")
    monkeypatch.setattr(Preset, "backend", lambda self, role: hashing_encoder)
    args = ["--format", "jsonl", "--data", str(data), "--kb", str(tmp_path / "kb.sqlite"), "--size", "3"]
    assert main(["dim", "candidates", *args, "--out", str(tmp_path / "a.jsonl")]) == 0
    new = capsys.readouterr()
    assert candidates.main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    old = capsys.readouterr()
    assert old.out.replace("b.jsonl", "a.jsonl") == new.out  # the alias prints nothing extra
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


# -- the shipped head on real WikiMEL data ----------------------------------------------------------------
@pytest.mark.slow
def test_shipped_head_links_real_wikimel_dev_mentions(shared_data, tmp_path):
    """The shipped offline head against a small KB cut from the real WikiMEL KB: the golds of 12
    dev mentions plus every entity sharing a name word with them (the hard part: other Norrises)."""
    from mel.datasets import load_dataset, read_kb_entities
    from mel.kb import normalize_name
    from mel.presets import get_preset

    examples = [ex for ex in load_dataset("wikimel", shared_data / "wikimel", "dev").examples if ex.mention.image is None][:12]
    words = {w for ex in examples for w in normalize_name(ex.mention.text).split() if len(w) > 2}
    entities = [e for e in read_kb_entities("wikimel", shared_data / "wikimel")
                if set(normalize_name(e.name).split()) & words]
    golds = {ex.gold_id for ex in examples}
    assert golds <= {e.id for e in entities}
    entities = [e for e in entities if e.id in golds] + [e for e in entities if e.id not in golds][:300]
    preset = get_preset("offline")
    small = build_kb(entities, tmp_path / "wikimel-cut.sqlite", text_encoder=preset.backend("text_encoder"),
                     progress=False)
    linker = DimLinker(small, preset)  # no checkpoint: the shipped models/dim-offline
    results = list(linker.pipe([ex.mention for ex in examples], k=10))
    top1 = sum(r.prediction is not None and r.prediction.id == ex.gold_id
               for r, ex in zip(results, examples, strict=True))
    assert small.size > 3 * len(examples)
    assert top1 >= 9, [(ex.mention.text, ex.gold_name, r.prediction.name if r.prediction else None)
                       for r, ex in zip(results, examples, strict=True)]
    assert linker.dev_figures.get("hits@1", 0) >= 0.8  # the figures it was shipped with


def test_candidate_lists_cover_every_mention_mel_eval_counts(kb, tmp_path, monkeypatch, hashing_encoder):
    """`mel eval` links a mention no rule finds in its caption by its mention string (it counts in n),
    so `mel dim candidates` must write a list for it too: it skipped it, and the candidate-list protocol
    then refused the whole split ("mention ... has no candidate list")."""
    from test_datasets import make_wikimel, sample

    import mel.cli_kit
    from mel.cli import main
    from mel.datasets import load_dataset
    data = make_wikimel(tmp_path / "wm", {"1": sample("1", "Norris in 1976, on the set", ["Norris"], ["Q4"]),
                                          "2": sample("2", "The mission patch, 1999", ["Collins"], ["Q1"])})
    assert [e.located for e in load_dataset("wikimel", data, "dev", unlocated="context").examples] == ["exact",
                                                                                                      "context"]
    monkeypatch.setattr(mel.cli_kit, "resolve_preset", lambda args: hashing_preset())
    monkeypatch.setattr(Preset, "backend", lambda self, role, *a, **kw: hashing_encoder)   # the KB's encoder
    main(["dim", "candidates", "--format", "wikimel", "--data", str(data), "--kb", str(kb.path), "--size", "3",
          "--out", str(tmp_path / "lists.jsonl")])
    lists = {json.loads(line)["id"]: json.loads(line)["candidates"]
             for line in (tmp_path / "lists.jsonl").read_text(encoding="utf-8").splitlines()}
    assert set(lists) == {"1#0", "2#0"} and "Q1" in lists["2#0"] and len(lists["2#0"]) == 3
