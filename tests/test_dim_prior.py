"""DIM's link-prior term (issue #15, mel.dim.prior / mel.dim.prior_train): fitted on a FROZEN base head, exactly 0
for a KB without a link prior. Tiny heads and synthetic rows: no model is loaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mel.cli import build_parser
from mel.dim.frozen_terms import fold_of
from mel.dim.model import DimFusion, FusionConfig
from mel.dim.prior import N_PRIOR_FEATURES, PRIOR_FEATURES, prior_pair_features, prior_values
from mel.dim.prior_train import (
    OutOfFoldPrior,
    PriorRows,
    PriorTrainConfig,
    cross_validate,
    evaluate,
    fit_prior,
    prior_head,
)
from mel.errors import InputError
from mel.kb import KnowledgeBase, build_kb, count_link_prior, write_link_prior
from mel.types import Entity, Example, Mention

TINY = dict(text_dim=16, image_dim=8, cue_dim=16, d_model=16, n_heads=2, ffn_dim=32, out_dim=8, dropout=0.0,
            n_pair_features=3, pair_hidden=8, visual_feature_names=("face_sex",))
NAMES = ("prior_pem", "prior_entity")


def _base() -> DimFusion:
    torch.manual_seed(0)
    base = DimFusion(FusionConfig(**TINY)).eval()
    with torch.no_grad():
        base.visual["face_sex"].weight.fill_(1.5)  # a trained visual term must be kept as it is
    return base


def _rows(n=300, w=4, seed=0) -> PriorRows:
    """Gold in column 0; the base prefers a wrong candidate now and then; the gold has the higher p(e|m) 80% of
    the time."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.normal(size=(n, w)).astype(np.float32))
    prior = np.zeros((n, w, N_PRIOR_FEATURES), np.float32)
    for i in range(n):
        pem = rng.dirichlet(np.ones(w)).astype(np.float32)
        if rng.random() < 0.8:
            pem[[0, pem.argmax()]] = pem[[pem.argmax(), 0]]
        prior[i, :, 1] = pem
        prior[i, :, 0] = np.log1p(np.round(pem * 5))
        prior[i, :, 2] = rng.random(w)
    return PriorRows(base, torch.from_numpy(prior), torch.ones(n, w, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                     [str(i // 2) for i in range(n)], "synthetic")


def _pair(b=3, c=5):
    m = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(b, c, 8), dim=-1)
    return m, e, torch.rand(b, c, 3)


def test_the_base_stays_frozen_and_a_kb_without_prior_scores_exactly_as_before():
    base = _base()
    head = fit_prior(prior_head(base, NAMES), [_rows()], l2=0.1, steps=50)
    assert head.prior.weight[0, 0].item() > 0.5 and head.prior.bias.item() == 0.0
    before = base.state_dict()
    for k, v in head.state_dict().items():
        if not k.startswith("prior."):
            assert torch.equal(v, before[k]), k
    assert set(head.state_dict()) - set(before) == {"prior.weight", "prior.bias"}
    m, e, pair = _pair()
    prior = torch.full((3, 5, N_PRIOR_FEATURES), float("nan"))  # even NaN values cannot leak through the mask
    off = torch.zeros(3, 5, dtype=torch.bool)
    with torch.no_grad():
        ref = base.score_candidates(m, e, pair)
        assert torch.equal(head.score_candidates(m, e, pair, None, None, prior, off), ref)
        assert torch.equal(head.score_candidates(m, e, pair), ref)
        on = head.score_candidates(m, e, pair, None, None, torch.ones(3, 5, N_PRIOR_FEATURES), ~off)
        assert not torch.equal(on, ref)


def test_the_saved_head_keeps_every_base_tensor_bit_for_bit(tmp_path):
    from safetensors.numpy import load_file

    from mel.training.checkpoint import save_pretrained_dir
    base = _base().to(torch.float16)
    save_pretrained_dir(base, base.config, tmp_path / "base")
    loaded, _ = DimFusion.from_pretrained(str(tmp_path / "base"))
    head = fit_prior(prior_head(loaded, NAMES), [_rows()], l2=0.1, steps=30).to(torch.float16)
    save_pretrained_dir(head, head.config, tmp_path / "head")
    old, new = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "head" / "model.safetensors"))
    assert all(new[k].dtype == v.dtype and new[k].tobytes() == v.tobytes() for k, v in old.items())
    assert sorted(set(new) - set(old)) == ["prior.bias", "prior.weight"]
    again, _ = DimFusion.from_pretrained(str(tmp_path / "head"))
    assert again.config.prior_feature_names == NAMES and again.config.visual_feature_names == ("face_sex",)


def test_prior_helps_on_rows_it_was_fitted_on_and_cross_validation_is_out_of_fold():
    rows = _rows(400)
    head = fit_prior(prior_head(_base(), NAMES), [rows], l2=1.0, steps=100)
    assert evaluate(head, [rows])["ce"] < evaluate(None, [rows])["ce"]
    assert evaluate(head, [rows])["hits@1"] > evaluate(None, [rows])["hits@1"]
    cfg = PriorTrainConfig(folds=4)
    folds = fold_of(rows, 4, 0)
    for r in set(rows.records):  # a record never straddles two folds
        assert len({int(f) for f, rr in zip(folds, rows.records, strict=True) if rr == r}) == 1
    cv = cross_validate(_base(), [rows], NAMES, 1.0, cfg)
    assert cv["cv"]["n"] == 400 and cv["cv"]["ce"] < evaluate(None, [rows])["ce"] and len(cv["fold_weights"]) == 4


def test_a_gold_outside_the_pool_is_a_miss_without_gradient():
    rows = _rows(50)
    rows.gold[:10] = -1
    assert evaluate(None, [rows])["n"] == 50
    assert evaluate(None, [rows])["hits@1"] <= 40 / 50
    fit_prior(prior_head(_base(), NAMES), [rows], l2=1.0, steps=10)  # no index error on the -1 rows


def test_config_refuses_bad_choices():
    with pytest.raises(InputError):
        PriorTrainConfig(features="prior_pem;nonsense")
    with pytest.raises(InputError):
        PriorTrainConfig(l2="0")
    with pytest.raises(InputError):
        PriorTrainConfig(folds=1)
    with pytest.raises(InputError):
        FusionConfig(**{**TINY, "prior_feature_names": ("prior_pem", "prior_pem")})
    assert PriorTrainConfig().feature_sets()[-1] == PRIOR_FEATURES


def _example(sid, caption, mention, gold):
    start = caption.index(mention)
    return Example(Mention(caption, start, start + len(mention), id=sid), gold, gold, sid, "jsonl", "train")


ENTITIES = [Entity("Q1", "Meg Ryan"), Entity("Q2", "Paul Ryan"), Entity("Q3", "Paris")]
TRAIN = [_example("1#0", "Ryan at a premiere", "Ryan", "Q1"), _example("1#1", "Ryan in Paris", "Paris", "Q3"),
         _example("2#0", "Ryan in 2014", "Ryan", "Q1"), _example("3#0", "Ryan, speaker", "Ryan", "Q2")]


def test_features_from_the_kb_and_out_of_fold(tmp_path):
    path = tmp_path / "kb.sqlite"
    build_kb(ENTITIES, path, progress=False)
    idxs, valid = np.array([[0, 1, -1], [2, 0, 1]]), np.array([[True, True, False], [True, True, True]])
    values, mask = prior_pair_features(KnowledgeBase(path), ["Ryan", "Paris"], idxs, valid)
    assert not mask.any() and not values.any()  # no link prior: all masked
    pairs, _ = count_link_prior(TRAIN, KnowledgeBase(path))
    write_link_prior(path, pairs, {"dataset": "jsonl", "split": "train", "n_counted": 4, "n_pairs": len(pairs)})
    kb = KnowledgeBase(path)
    values, mask = prior_pair_features(kb, ["Ryan", "Paris"], idxs, valid)
    assert mask.tolist() == valid.tolist()
    np.testing.assert_allclose(values[0, 0], [np.log1p(2), 2 / 3, np.log1p(2)], rtol=1e-6)
    np.testing.assert_allclose(values[0, 1], [np.log1p(1), 1 / 3, np.log1p(1)], rtol=1e-6)
    np.testing.assert_allclose(values[1, 0], [np.log1p(1), 1.0, np.log1p(1)], rtol=1e-6)
    # out of fold: record 2 sees the prior of records 1 and 3 only
    oof = OutOfFoldPrior(kb, TRAIN)
    np.testing.assert_allclose(oof.values("Ryan", "2", [0, 1]),
                               prior_values({0: 1, 1: 1}, {0: 1, 1: 1, 2: 1}.get, [0, 1]), rtol=1e-6)
    np.testing.assert_allclose(oof.values("Ryan", "1", [0, 1])[:, 1], [0.5, 0.5], rtol=1e-6)
    assert oof.values("Paris", "1", [2]).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(InputError, match="not the count"):
        OutOfFoldPrior(kb, TRAIN[:2])


def test_cli_parses_train_dim_prior():
    args = build_parser().parse_args(["train", "dim-prior", "--base", "b", "--format", "wikimel", "--data", "d",
                                      "--kb", "k.sqlite", "--out", "o", "--l2", "1,10", "--folds", "3"])
    assert args.trainer == "dim-prior" and args.l2 == "1,10" and args.folds == 3


def test_linker_without_a_kb_prior_scores_exactly_as_the_base_and_with_one_uses_it(tmp_path, hashing_encoder):
    from mel.dim.linker import DimLinker
    from mel.training import save_pretrained_dir
    from tests.test_dim import ENTITIES as PEOPLE
    from tests.test_dim import hashing_preset, name_match_head
    base_dir = name_match_head(tmp_path / "base", hashing_encoder.dim)
    base, _ = DimFusion.from_pretrained(str(base_dir))
    head = prior_head(base, ("prior_pem",))
    with torch.no_grad():
        head.prior.weight.fill_(50.0)
    head_dir = save_pretrained_dir(head, head.config, tmp_path / "head")
    path = tmp_path / "kb.sqlite"
    build_kb(PEOPLE, path, text_encoder=hashing_encoder, progress=False)
    mentions = [Mention.from_text("Norris in 1976, on the set", "Norris"),
                Mention.from_text("Collins at the launch", "Collins")]

    def ranked(checkpoint, **kw):
        linker = DimLinker(KnowledgeBase(path), hashing_preset(), checkpoint=checkpoint, text_encoder=hashing_encoder, **kw)
        return [[(c.entity.id, c.score) for c in r.candidates] for r in linker.pipe(mentions, k=8)]

    before = ranked(base_dir)
    assert ranked(head_dir) == before  # no link prior in the KB: the very same scores
    kb = KnowledgeBase(path)
    write_link_prior(path, {("norris", kb.idx_of("Q5")): 3, ("collins", kb.idx_of("Q6")): 1}, {"dataset": "t"})
    assert ranked(base_dir) == before  # a head without the term ignores the table
    assert ranked(head_dir, use_prior=False) == before
    after = ranked(head_dir)
    assert after[0][0][0] == "Q5" and after[1][0][0] == "Q6"


def _prior_trainer(tmp_path, base: DimFusion, out: str, **config):
    """A PriorTrainer on the saved `base` with no data (what `save` needs: the base, its payload, OUT)."""
    from mel.dim.prior_train import PriorTrainer
    from mel.training.checkpoint import load_config, save_pretrained_dir
    if not (tmp_path / "base").exists():
        save_pretrained_dir(base, base.config, tmp_path / "base")
    trainer = PriorTrainer.__new__(PriorTrainer)
    trainer.base_dir, trainer.out, trainer.config = tmp_path / "base", tmp_path / out, PriorTrainConfig(**config)
    trainer.base, trainer.payload = DimFusion.from_pretrained(str(tmp_path / "base"))[0], load_config(tmp_path / "base")
    return trainer


def test_a_float32_base_is_kept_float32_and_a_changed_base_is_never_published(tmp_path):
    """`train dim-prior` saved OUT in --save-dtype (default float16) and only then checked that the base's
    tensors were kept: a float32 base was cast, the check failed, and the bad head was already in OUT.
    The default is now the base's own dtype, and the check runs before anything is written."""
    from safetensors.numpy import load_file

    from mel.errors import CheckpointError
    trainer = _prior_trainer(tmp_path, _base(), "head")
    head = fit_prior(prior_head(trainer.base, NAMES), [_rows()], l2=0.1, steps=30)
    trainer.save(head, {"features": list(NAMES)})
    assert trainer.check_frozen()
    assert {str(v.dtype) for v in load_file(str(tmp_path / "head" / "model.safetensors")).values()} == {"float32"}
    for out, config in (("cast", {"save_dtype": "float16"}), ("changed", {})):
        trainer = _prior_trainer(tmp_path, _base(), out, **config)
        head = fit_prior(prior_head(trainer.base, NAMES), [_rows()], l2=0.1, steps=30)
        if out == "changed":
            with torch.no_grad():
                head.visual["face_sex"].weight.add_(1.0)
        with pytest.raises(CheckpointError, match="base tensors changed"):
            trainer.save(head, {"features": list(NAMES)})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "head"], "nothing of OUT written"
