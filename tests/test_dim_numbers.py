"""DIM's name-number term (issue #15, mel.dim.name_numbers / mel.dim.number_train): "William V" is not William VII.
Fitted on a FROZEN base head; exactly 0 for a caption without a regnal or title number. Tiny heads, no model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mel.cli import build_parser
from mel.dim.frozen_terms import TermRows, cross_validate_rows, evaluate_rows, fit_rows
from mel.dim.model import DimFusion, FusionConfig
from mel.dim.name_numbers import (
    N_NUMBER_FEATURES,
    NUMBER_FEATURES,
    number_pair_features,
    number_values,
    numbered_words,
    roman_value,
)
from mel.dim.number_train import NUMBER_TERM, NumberTrainConfig
from mel.dim.pairs import EntityFacts
from mel.errors import InputError
from mel.kb import KnowledgeBase, build_kb
from mel.types import Entity, Mention
from tests.test_dim_prior import TINY, _base  # the same tiny head with a trained visual term


def test_roman_numerals_and_ordinals_are_read_with_the_word_they_number():
    assert [roman_value(t) for t in ("I", "IV", "IX", "XIV", "MCMXC", "IIII", "iv", "", "VX")] == \
        [1, 4, 9, 14, 1990, None, None, None, None]
    assert numbered_words("William V , a member of the House of Hesse, was Landgrave of Hesse-Kassel") == {("william", 5)}
    assert numbered_words("Rupert II, Count Palatine of the Rhine (German: Ruprecht II.") == {("rupert", 2),
                                                                                              ("ruprecht", 2)}
    assert numbered_words("Johannes, 11th Prince of Thurn and Taxis") == {("prince", 11)}
    assert numbered_words("Frederick William I of Prussia and Louis XIV.") == {("william", 1), ("louis", 14)}
    assert numbered_words("Théodore II Laskaris") == {("theodore", 2)}
    # a possessive, a full stop, a hyphenated name
    assert numbered_words("Louis XIV's great-grandson and heir, Louis XV") == {("louis", 14), ("louis", 15)}
    assert numbered_words("Henry VIII’s wives") == {("henry", 8)}
    assert numbered_words("Queen Elizabeth I.") == {("elizabeth", 1)}
    assert numbered_words("Louis I. and his son Louis II") == {("louis", 1), ("louis", 2)}
    assert numbered_words("Elizabeth I was queen") == {("elizabeth", 1)}
    assert numbered_words("Heinrich LXVII Reuss") == {("heinrich", 67)}
    assert numbered_words("Hesse-Kassel V") == {("kassel", 5)}
    # not numbers: initials, the pronoun, punctuation between, wars and parts, dates, place abbreviations, lower-case
    # words, all-capital acronyms
    for text in ("Klaus M. Schmidt", "Sarah Jones L", "Louis V. Gerstner", "Then I went home", "Mary and I",
                 "In Paris I met her", "Mary, I think", "Henry; V", "World War II veteran", "Part II of the film",
                 "on 4th July", "the 3rd May 2019", "in the 19th Century", "Washington, DC", "Baltimore, MD",
                 "Detroit MI", "Huntington, LI", "a vi editor", "CIA V agents", "in 1976, the 3rd time",
                 "the 250th Regiment"):
        assert numbered_words(text) == set(), text


def _facts(name, *aliases):
    return EntityFacts.of(Entity("Q", name, list(aliases)))


def test_agree_clash_and_missing():
    caption = numbered_words("William V , a member of the House of Hesse, was Landgrave of Hesse-Kassel")

    def values(name, *aliases):
        e = _facts(name, *aliases)
        return number_values(caption, e.name_numbers, e.name_tokens).tolist()

    assert values("William V, Landgrave of Hesse-Kassel") == [1, 0, 0]
    assert values("William VII, Landgrave of Hesse-Kassel") == [0, 1, 0]
    assert values("William, Prince of Orange") == [0, 0, 1]  # the caption numbers a word the name leaves bare
    assert values("Amalie Elisabeth of Hanau-Münzenberg") == [0, 0, 0]  # nothing of the name is numbered
    assert values("Wilhelm von Hessen", "William V of Hesse") == [1, 0, 0]  # an alias carries it
    assert number_values(set(), _facts("William VII").name_numbers, ["william", "vii"]).tolist() == [0, 0, 0]
    facts = {0: _facts("William V"), 1: _facts("William VII")}
    out = number_pair_features([numbered_words("William V in 1630"), numbered_words("no number here")], facts, np.array([[1, 0, -1], [0, 1, -1]]),
                               np.array([[True, True, False], [True, True, False]]))
    assert out.shape == (2, 3, N_NUMBER_FEATURES)
    assert out[0].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]] and not out[1].any()


def _rows(n=300, w=4, seed=0) -> TermRows:
    """Gold in column 0; a quarter of the captions carry a number: the gold then agrees with it and a rival
    clashes; the base prefers the rival half of those times."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, w)).astype(np.float32)
    numbers = np.zeros((n, w, N_NUMBER_FEATURES), np.float32)
    for i in range(n):
        if rng.random() < 0.25:
            numbers[i, 0, 0], numbers[i, 1, 1] = 1.0, 1.0
            if rng.random() < 0.5:
                base[i, 1] = base[i, 0] + 1.0
    return TermRows(torch.from_numpy(base), torch.from_numpy(numbers), torch.ones(n, w, dtype=torch.bool),
                    torch.zeros(n, dtype=torch.long), [str(i // 2) for i in range(n)], "synthetic")


def test_the_fit_learns_the_numbers_keeps_the_base_and_adds_zero_without_numbers():
    base, names = _base(), ("number_agree", "number_clash")
    rows = _rows()
    head = fit_rows(NUMBER_TERM, NUMBER_TERM.head(base, names), [rows], l2=0.1, steps=50)
    weights = NUMBER_TERM.weights(head)
    assert weights["number_agree"] > 0.5 and weights["number_clash"] < -0.5 and head.numbers.bias.item() == 0.0
    before = base.state_dict()
    for k, v in head.state_dict().items():
        if not k.startswith("numbers."):
            assert torch.equal(v, before[k]), k
    assert set(head.state_dict()) - set(before) == {"numbers.weight", "numbers.bias"}
    assert evaluate_rows(NUMBER_TERM, head, [rows])["hits@1"] > evaluate_rows(NUMBER_TERM, None, [rows])["hits@1"]
    m = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(3, 5, 8), dim=-1)
    pair = torch.rand(3, 5, 3)
    with torch.no_grad():
        ref = base.score_candidates(m, e, pair)
        assert torch.equal(head.score_candidates(m, e, pair, numbers=torch.zeros(3, 5, N_NUMBER_FEATURES)), ref)
        assert torch.equal(head.score_candidates(m, e, pair), ref)
        assert not torch.equal(head.score_candidates(m, e, pair, numbers=torch.ones(3, 5, N_NUMBER_FEATURES)), ref)
    cv = cross_validate_rows(NUMBER_TERM, base, [rows], names, 0.1, NumberTrainConfig(folds=3, steps=20))
    assert cv["cv"]["n"] == len(rows) and len(cv["fold_weights"]) == 3


def test_config_refuses_bad_choices_and_the_cli_parses():
    for bad in ({"features": "number_agree;prior_pem"}, {"l2": "0"}, {"folds": 1}, {"features": ""}):
        with pytest.raises(InputError):
            NumberTrainConfig(**bad)
    with pytest.raises(InputError, match="name-number"):
        FusionConfig(**{**TINY, "number_feature_names": ("number_agree", "number_agree")})
    assert NumberTrainConfig().feature_sets()[-1] == NUMBER_FEATURES
    args = build_parser().parse_args(["train", "dim-numbers", "--base", "b", "--format", "richpedia", "--data", "d",
                                      "--kb", "k.sqlite", "--out", "o", "--l2", "0.01,1"])
    assert args.trainer == "dim-numbers" and args.l2 == "0.01,1"


def test_a_base_with_the_term_already_is_refused(tmp_path):
    from mel.dim.number_train import NumberTrainer
    from mel.training import save_pretrained_dir
    head = NUMBER_TERM.head(DimFusion(FusionConfig(**{**TINY, "n_pair_features": 0})), ("number_agree",))
    save_pretrained_dir(head, head.config, tmp_path / "base")
    with pytest.raises(InputError, match="already has a name-number term"):
        NumberTrainer(NumberTrainConfig(), tmp_path / "base", [], None, tmp_path / "out")


def test_the_linker_prefers_the_numbered_candidate_and_a_caption_without_numbers_scores_as_the_base(
        tmp_path, hashing_encoder):
    from mel.dim.linker import DimLinker
    from mel.training import save_pretrained_dir
    from tests.test_dim import hashing_preset, name_match_head
    base_dir = name_match_head(tmp_path / "base", hashing_encoder.dim)
    base, _ = DimFusion.from_pretrained(str(base_dir))
    head = NUMBER_TERM.head(base, ("number_agree", "number_clash"))
    with torch.no_grad():
        head.numbers.weight.copy_(torch.tensor([[20.0, -20.0]]))
    head_dir = save_pretrained_dir(head, head.config, tmp_path / "head")
    people = [Entity("Q1", "William VII, Landgrave of Hesse-Kassel", [], "Sex: male. Birth: 1651.", "person"),
              Entity("Q2", "William V, Landgrave of Hesse-Kassel", [], "Sex: male. Birth: 1602.", "person"),
              Entity("Q3", "Amalie Elisabeth of Hanau", [], "Sex: female. Birth: 1602.", "person")]
    path = tmp_path / "kb.sqlite"
    build_kb(people, path, text_encoder=hashing_encoder, progress=False)
    caption = "William V , a member of the House of Hesse, was Landgrave of Hesse-Kassel from 1627 to 1637."
    numbered = Mention(caption, caption.index("Hesse-Kassel"), caption.index("Hesse-Kassel") + len("Hesse-Kassel"))
    bare = Mention.from_text("Landgrave of Hesse-Kassel from 1627", "Hesse-Kassel")

    def ranked(checkpoint):
        linker = DimLinker(KnowledgeBase(path), hashing_preset(), checkpoint=checkpoint, text_encoder=hashing_encoder)
        return [[(c.entity.id, c.score) for c in r.candidates] for r in linker.pipe([numbered, bare], k=3)]

    before, after = ranked(base_dir), ranked(head_dir)
    assert after[1] == before[1]  # no number in the caption: the very same scores
    linker = DimLinker(KnowledgeBase(path), hashing_preset(), checkpoint=head_dir, text_encoder=hashing_encoder,
                       use_numbers="no")  # the ablation switch: the base's scores
    assert [[(c.entity.id, c.score) for c in r.candidates] for r in linker.pipe([numbered, bare], k=3)] == before
    assert after[0][0][0] == "Q2" and after[0] != before[0]
    scores = dict(after[0])
    assert scores["Q2"] - scores["Q1"] > 30  # +20 for the agreeing number, -20 for the clashing one
    # `train dim-visual` scores its base through the same path: the base's number term included
    from types import SimpleNamespace

    from mel.dim.visual_train import linker_rows
    linker = DimLinker(KnowledgeBase(path), hashing_preset(), checkpoint=head_dir, text_encoder=hashing_encoder)
    row = next(linker_rows(linker, [SimpleNamespace(mention=numbered)], ()))
    base = {linker.kb.entities_at([int(i)])[0].id: float(v)
            for i, v, ok in zip(row.idxs, row.base, row.valid, strict=True) if ok}
    assert base == pytest.approx(scores, abs=1e-4)


def test_the_shipped_head_loads_with_its_fitted_number_term():
    # `python -m mel train dim-numbers` on the held-out train records: the weights in config.json are the tensor's
    from pathlib import Path

    from mel.dim.linker import load_head
    model, payload = load_head(Path(__file__).resolve().parents[1] / "models" / "dim-offline")
    names = model.config.number_feature_names
    assert names and model.numbers is not None and model.numbers.bias.item() == 0.0
    saved = payload["number_terms"]["weights"]
    assert list(saved) == list(names)
    assert [round(float(w), 4) for w in model.numbers.weight.detach().flatten()] == [saved[n] for n in names]
    assert payload["number_terms"]["chosen_on"].startswith("5-fold cross-validation")


def test_the_trainer_fits_saves_and_reports_on_the_held_out_rows(tmp_path):
    """LinearTermTrainer.run (shared with `train dim-prior`) on synthetic held-out rows: the grid, the choice, the
    saved head (base tensors bit for bit) and the report's keys."""
    import json

    from mel.dim.number_train import NumberTrainer
    from mel.training.checkpoint import load_config, save_pretrained_dir
    save_pretrained_dir(_base(), _base().config, tmp_path / "base")
    trainer = NumberTrainer.__new__(NumberTrainer)
    trainer.base_dir, trainer.out = tmp_path / "base", tmp_path / "head"
    trainer.config = NumberTrainConfig(l2="0.1,10", folds=3, steps=30)
    trainer.base, trainer.payload = DimFusion.from_pretrained(str(tmp_path / "base"))[0], load_config(tmp_path / "base")
    trainer.collect = lambda: [_rows(seed=1), _rows(n=120, seed=2)]
    report = trainer.run(command="test")
    assert len(report["grid"]) == 4 and report["base_tensors_identical"]
    assert report["chosen"]["features"] in (["number_agree", "number_clash"], list(NUMBER_FEATURES))
    assert report["heldout_cv_with_numbers"]["hits@1"] > report["heldout_without_numbers"]["hits@1"]
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert saved["config"]["number_feature_names"] == report["chosen"]["features"]
    assert saved["number_terms"]["weights"]["number_agree"] > 0 > saved["number_terms"]["weights"]["number_clash"]
    head, _ = DimFusion.from_pretrained(str(tmp_path / "head"))
    assert head.numbers is not None and head.numbers.bias.item() == 0.0


def test_caption_number_features_of_cached_rows_are_the_linkers(tmp_path, hashing_encoder):
    """What the trainer computes for cached rows (captions of the held-out examples, KB rows of the pools) is what
    the linker computes at link time."""
    from types import SimpleNamespace

    from mel.dim.frozen_terms import caption_number_features
    from mel.dim.pipeline import EntityFactsCache
    people = [Entity("Q1", "William VII"), Entity("Q2", "William V"), Entity("Q3", "Amalie of Hanau")]
    build_kb(people, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    kb = KnowledgeBase(tmp_path / "kb.sqlite")
    examples = [SimpleNamespace(mention=Mention.from_text("William V in 1630", "William")),
                SimpleNamespace(mention=Mention.from_text("Amalie in 1630", "Amalie"))]
    split = SimpleNamespace(cand=np.array([[0, 1, 2], [2, 0, -1]]), valid=np.array([[True, True, True],
                                                                                 [True, True, False]]))
    got = caption_number_features(examples, kb, split)
    facts = EntityFactsCache(kb).get_many([0, 1, 2])
    want = number_pair_features([numbered_words(e.mention.caption) for e in examples], facts, split.cand,
                                split.valid)
    assert np.array_equal(got, want)
    assert got[0, :, 0].tolist() == [0, 1, 0] and got[0, :, 1].tolist() == [1, 0, 0] and not got[1].any()
