"""`python -m mel train dim-visual` (mel.dim.visual_train): visual terms trained on a FROZEN base head from
real photos and simulated faces (issue #13). Tiny heads and synthetic rows: no model is loaded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mel.cli import build_parser
from mel.dim.features import FeatureExtractor, MentionFeatures
from mel.dim.model import DimFusion, FusionConfig
from mel.dim.pairs import N_VISUAL_FEATURES, VISUAL_FEATURES, VISUAL_GROUPS, EntityFacts
from mel.dim.visual_train import (
    FaceErrorModel,
    VisualRows,
    VisualTrainConfig,
    _face_features,
    evaluate_rows,
    fit_visual,
    run,
    visual_head,
)
from mel.errors import InputError
from mel.kb import build_kb
from mel.presets import Preset
from mel.types import Entity, Mention

TINY = dict(text_dim=16, image_dim=8, cue_dim=16, d_model=16, n_heads=2, ffn_dim=32, out_dim=8, dropout=0.0,
            n_pair_features=3, pair_hidden=8)
GROUPS = ["image_text", "face_sex", "face_age"]
GI = {g: i for i, g in enumerate(VISUAL_GROUPS)}
ERR = FaceErrorModel(gender_accuracy=0.8, gender_probability_right=[0.9, 0.95], gender_probability_wrong=[0.7],
                     age_error=[-5.0, 5.0])


def _base() -> DimFusion:
    torch.manual_seed(0)
    return DimFusion(FusionConfig(**TINY)).eval()


def _sex_rows(n=200, w=4, seed=0) -> VisualRows:
    """Candidate 0 (the gold: a woman aged 30 in 1980) against a man aged 80 and two non-persons; the base
    prefers a wrong candidate now and then; one simulated face per row (80% right)."""
    rng = np.random.default_rng(seed)
    gi, facts = GI, [EntityFacts.of(Entity("a", "A", [], "Sex: female. Birth: 1950.")),
                     EntityFacts.of(Entity("b", "B", [], "Sex: male. Birth: 1900.")),
                     EntityFacts.of(Entity("c", "C", [], "A street.")), EntityFacts.of(Entity("d", "D", [], ""))]
    base = torch.from_numpy(rng.normal(size=(n, w)).astype(np.float32))
    vis, mask = np.zeros((n, w, N_VISUAL_FEATURES), np.float32), np.zeros((n, w, len(VISUAL_GROUPS)), bool)
    for i in range(n):
        face = ERR.simulate(rng, "female", 30.0)
        _face_features([face], [1980], facts, GROUPS, vis[i], mask[i], gi)
    return VisualRows(base, torch.from_numpy(vis), torch.from_numpy(mask), torch.zeros(n, dtype=torch.long))


def test_the_base_head_stays_frozen():
    base = _base()
    head = fit_visual(visual_head(base, GROUPS), [_sex_rows()], l2=0.0, steps=50)
    assert head.visual["face_sex"].weight.item() > 0.5        # it learned something...
    before = base.state_dict()
    for k, v in head.state_dict().items():                    # ...and nothing else moved
        if not k.startswith("visual."):
            assert torch.equal(v, before[k]), k
    assert all(layer.bias.item() == 0.0 for layer in head.visual.values())
    b, c = 3, 5
    m = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(b, c, 8), dim=-1)
    pair, vis = torch.rand(b, c, 3), torch.randn(b, c, N_VISUAL_FEATURES)
    off = torch.zeros(b, c, len(VISUAL_GROUPS), dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(head.score_candidates(m, e, pair, vis, off), base.score_candidates(m, e, pair))


def test_visual_terms_help_on_the_rows_they_were_fitted_on():
    rows = _sex_rows(400)
    head = fit_visual(visual_head(_base(), GROUPS), [rows], l2=1.0, steps=100)
    assert evaluate_rows(head, [rows])["ce"] < evaluate_rows(None, [rows])["ce"]
    assert head.visual["face_age"].weight.item() < 0  # a large apparent-age gap counts against a candidate


def test_simulation_follows_the_error_model():
    rng = np.random.default_rng(7)
    faces = [ERR.simulate(rng, "male", 40.0) for _ in range(20000)]
    agree = np.mean([f["gender"] == "male" for f in faces])
    assert agree == pytest.approx(0.8, abs=0.01)
    assert {f["gender_probability"] for f in faces if f["gender"] == "male"} == {0.9, 0.95}
    assert {f["gender_probability"] for f in faces if f["gender"] == "female"} == {0.7}
    assert {f["age"] for f in faces} == {35.0, 45.0}
    assert ERR.simulate(np.random.default_rng(1), "female", None)["age"] is None
    again = [ERR.simulate(np.random.default_rng(3), "female", 20.0) for _ in range(2)]
    assert again[0] == again[1]  # seeded


def test_error_model_is_validated(tmp_path):
    with pytest.raises(InputError, match="not found"):
        FaceErrorModel.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"error_model": {"gender_accuracy": 0.9}}))
    with pytest.raises(InputError, match="needs gender_accuracy"):
        FaceErrorModel.load(bad)


def test_a_positive_face_sex_weight_puts_the_woman_first_when_the_photo_shows_one(tmp_path, hashing_encoder):
    entities = [Entity("Q1", "Phil Collins", [], "Sex: male. Birth: 1951.", "person"),
                Entity("Q2", "Eileen Collins", [], "Sex: female. Birth: 1956.", "person")]
    kb = build_kb(entities, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    preset = Preset("test", image_encoder="efficientnet-lite0", text_encoder="test-hashing",
                    mention_encoder="test-hashing", llm="", cue="faces")
    ex = FeatureExtractor(kb, preset, image_dim=8, text_encoder=hashing_encoder, visual_features=("face_sex",))
    z = np.zeros((1, ex.text_dim), np.float32)
    woman = [{"gender": "female", "gender_probability": 0.85, "age": 40.0}]
    feats = MentionFeatures(z, z, np.zeros((1, 8), np.float32), np.zeros(1, bool), z, np.zeros(1, bool),
                            [None], [None], None, np.zeros(1, bool), [woman])
    vis, mask = ex.visual_pair_features([Mention.from_text("Collins smiles", "Collins")], feats,
                                        np.array([[0, 1]]), np.ones((1, 2), bool))
    head = visual_head(_base(), ["face_sex"])
    with torch.no_grad():
        head.visual["face_sex"].weight.fill_(2.0)
        base = torch.tensor([[1.0, 0.6]])  # the text alone prefers the man
        scores = base + head.visual_scores(torch.from_numpy(vis), torch.from_numpy(mask))
    assert int(scores.argmax()) == 1 and int(base.argmax()) == 0
    assert vis[0, 1, VISUAL_FEATURES.index("face_sex_match")] == pytest.approx(0.7)


def _cli(tmp_path, *extra):
    args = ["train", "dim-visual", "--base", str(tmp_path / "base"), "--error-model", str(tmp_path / "em.json"),
            "--format", "jsonl", "--data", str(tmp_path), "--kb", str(tmp_path / "kb.sqlite"),
            "--out", str(tmp_path / "out"), *extra]
    return build_parser().parse_args(args)


def test_cli_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="no DIM head there"):
        run(_cli(tmp_path))
    with pytest.raises(InputError, match="unknown visual group.*face_shape"):
        run(_cli(tmp_path, "--groups", "face_sex,face_shape"))
    with pytest.raises(InputError, match="face-rates"):
        VisualTrainConfig(face_rates="0.5,2")
    _base().save_pretrained(tmp_path / "base")
    with pytest.raises(InputError, match="error model .* not found"):
        run(_cli(tmp_path))
    (tmp_path / "em.json").write_text(json.dumps({"error_model": {
        "gender_accuracy": 0.9, "gender_probability_right": [0.9], "gender_probability_wrong": [0.6],
        "age_error": [1.0]}}))
    with pytest.raises(InputError, match="--kb .* does not exist"):
        run(_cli(tmp_path))


def test_cli_is_registered_with_its_flags():
    args = build_parser().parse_args(["train", "dim-visual", "--base", "B", "--error-model", "E", "--format", "wikimel",
                                      "--data", "D", "--kb", "K", "--out", "O", "--face-rates", "0.5", "--l2", "1"])
    assert args.face_rates == "0.5" and args.l2 == "1" and args.groups == "image_text,face_sex,face_age"


def test_cli_end_to_end_on_a_tiny_set_keeps_the_base_bytes(tmp_path, hashing_encoder, monkeypatch):
    from safetensors.numpy import load_file

    from mel.cli import main
    from mel.presets import Preset
    from tests.test_dim import StubImageEncoder, write_tiny_training_set

    data = write_tiny_training_set(tmp_path, hashing_encoder, dev=False)
    monkeypatch.setattr(Preset, "backend", lambda self, role: {"text_encoder": hashing_encoder,
                                                               "image_encoder": StubImageEncoder()}[role])
    common = ["--format", "jsonl", "--data", str(data), "--kb", str(tmp_path / "kb.sqlite"), "--preset", "offline",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["train", "dim", *common, "--out", str(tmp_path / "base"), "--epochs", "1", "--batch-size", "4",
                 "--d-model", "32", "--n-heads", "4", "--ffn-dim", "64", "--out-dim", "16", "--train-width", "6",
                 "--n-hard", "2", "--holdout", "0.3", "--dev-split", ""]) == 0
    (tmp_path / "em.json").write_text(json.dumps({"error_model": {
        "gender_accuracy": 0.9, "gender_probability_right": [0.95], "gender_probability_wrong": [0.6],
        "age_error": [-3.0, 4.0]}}))
    assert main(["train", "dim-visual", *common, "--base", str(tmp_path / "base"), "--error-model",
                 str(tmp_path / "em.json"), "--out", str(tmp_path / "visual"), "--groups", "face_sex,face_age",
                 "--face-rates", "1", "--l2", "1"]) == 0
    base, new = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "visual" / "model.safetensors"))
    assert all(new[k].dtype == v.dtype and np.array_equal(new[k], v) for k, v in base.items())
    assert sorted(set(new) - set(base)) == ["visual.face_age.bias", "visual.face_age.weight",
                                            "visual.face_sex.bias", "visual.face_sex.weight"]
    payload = json.loads((tmp_path / "visual" / "config.json").read_text())
    assert payload["config"]["visual_feature_names"] == ["face_sex", "face_age"]
    terms = payload["visual_terms"]
    assert terms["chosen"] == {"face_rate": 1.0, "l2": 1.0} and terms["command"].startswith("python -m mel train dim-visual")
    assert terms["error_model"]["gender_accuracy"] == 0.9 and terms["counts"]["jsonl"]["simulated_heldout"] > 0
    assert main(["train", "dim-visual", *common, "--base", str(tmp_path / "base"), "--error-model",
                 str(tmp_path / "em.json"), "--out", str(tmp_path / "base")]) == 2  # OUT = base: refused
