"""Dataset readers: the real WikiMEL / RichpediaMEL / WikiDiverse files in ../shared/data,
synthetic MIMIC / GEMEL / jsonl directories, malformed input, and property tests of mention
location."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mel.datasets import (
    FORMATS,
    DatasetSplit,
    ReadReport,
    available_splits,
    load_dataset,
    read_kb_entities,
    write_jsonl_examples,
    write_jsonl_kb,
)
from mel.datasets.common import ExampleBuilder, carve_dev
from mel.errors import DatasetFormatError, InputError
from mel.types import NIL, Entity, Example, Mention

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKIMEL, RICHPEDIA, WIKIDIVERSE = DATA / "wikimel", DATA / "richpedia", DATA / "wikidiverse"


@pytest.fixture(scope="module", autouse=True)
def _shared_data_present():
    assert DATA.is_dir(), f"the real datasets are expected at {DATA} (../shared/data beside the repo)"


def check_invariants(split: DatasetSplit) -> None:
    r = split.report
    assert r.n_located == r.n_located_exact + r.n_located_casefold + r.n_located_words
    assert r.n_located_nfc <= r.n_located_exact
    assert r.n_mentions == r.n_with_span + r.n_located + r.n_unlocated + r.n_invalid
    kept = r.n_unlocated if r.unlocated_policy == "context" else 0
    assert len(split) == r.n_examples == r.n_with_span + r.n_located + kept
    assert sum(r.rule_counts().values()) == len(split)
    by_rule = {}
    for e in split:  # examples read with offsets (jsonl) keep the rule their source reader used
        rule = "offsets" if r.n_with_span else e.located
        by_rule[rule] = by_rule.get(rule, 0) + 1
    assert {k: v for k, v in r.rule_counts().items() if v} == by_rule
    assert r.n_records == r.n_with_image + r.n_missing_image
    assert r.n_unlocated == len(r.unlocated) and r.n_invalid == len(r.invalid)
    assert r.n_nil == sum(e.gold_id == NIL for e in split)
    assert len({e.sample_id for e in split}) == len(split), "sample ids must be unique"
    for e in split:
        assert e.mention.image is None or Path(e.mention.image).is_file()
        assert e.mention.caption[e.mention.start:e.mention.end] == e.mention.text
    json.dumps(r.to_dict())  # serialisable
    assert isinstance(r.summary(), str) and str(r.n_records) in r.summary().replace(",", "")


# --------------------------------------------------------------------------------------------- WikiMEL


@pytest.fixture(scope="module")
def wikimel_raw():
    samples = json.loads((WIKIMEL / "Wikidata-MEL.json").read_text(encoding="utf-8"))
    splits = json.loads((WIKIMEL / "splits.json").read_text(encoding="utf-8"))
    return samples, splits


@pytest.fixture(scope="module")
def wikimel_dev():
    return load_dataset("wikimel", WIKIMEL, "dev", unlocated="context")  # as mel eval reads it


def test_wikimel_dev_counts_match_splits(wikimel_dev, wikimel_raw):
    samples, splits = wikimel_raw
    dev_ids = [i for i in splits["dev"] if i in samples]
    r = wikimel_dev.report
    assert r.n_records == len(dev_ids) == 2213
    assert r.n_mentions == sum(len(samples[i]["mentions"]) for i in dev_ids)
    assert r.n_unlocated > 0 and r.n_invalid == 0
    assert any("not in Wikidata-MEL.json" in n for n in r.notes)  # the withheld ids are reported
    check_invariants(wikimel_dev)
    assert {e.sample_id.split("#")[0] for e in wikimel_dev} <= set(dev_ids)
    assert (wikimel_dev.format, wikimel_dev.split, len(wikimel_dev)) == ("wikimel", "dev", r.n_examples)


def test_wikimel_examples_agree_with_raw_records(wikimel_dev, wikimel_raw):
    samples, _ = wikimel_raw
    for e in wikimel_dev:
        sid, idx = e.sample_id.split("#")
        raw = samples[sid]
        i = int(idx)
        m = raw["mentions"][i].strip()
        if e.located == "context":  # not in the caption: linked by the mention string, caption as context
            assert e.mention.caption == f"{m}: {raw['sentence']}" and e.mention.text == m
        else:
            assert e.mention.caption == raw["sentence"]
        if e.located in ("exact", "casefold"):
            assert e.mention.text.lower() == m.lower()
        elif e.located == "words":  # the mention's words, in order, in the caption's phrase
            words = re.findall(r"\w+", e.mention.text.lower())
            it = iter(words)
            assert all(w in it for w in re.findall(r"\w+", m.lower())), (m, e.mention.text)
            assert m.lower() not in raw["sentence"].lower()
        assert (e.gold_id, e.gold_name) == (raw["answer"][i], raw["entities"][i])
        assert (e.dataset, e.split, e.mention.id) == ("wikimel", "dev", e.sample_id)
    for sid, mention, prefix in wikimel_dev.report.unlocated:
        raw = samples[sid.split("#")[0]]
        assert mention.lower() not in raw["sentence"].lower() and raw["sentence"].startswith(prefix)


def test_wikimel_images_found_for_the_few_that_exist(wikimel_dev, wikimel_raw):
    _, splits = wikimel_raw
    on_disk = {p.stem for p in (WIKIMEL / "images").glob("*.jpg")}
    expected = on_disk & set(splits["dev"])
    with_image = {e.sample_id.split("#")[0] for e in wikimel_dev if e.mention.image}
    assert with_image == expected and expected
    assert wikimel_dev.report.n_with_image == len(expected)
    assert all(Path(e.mention.image).name == e.sample_id.split("#")[0] + ".jpg" for e in wikimel_dev if e.mention.image)


def test_wikimel_train_reads_deterministically():  # its speed is a benchmark's business, not a test's
    a = load_dataset("wikimel", WIKIMEL, "train")
    b = load_dataset("wikimel", WIKIMEL, "train")
    assert a.examples == b.examples
    assert a.report.to_dict() == b.report.to_dict()
    check_invariants(a)
    assert a.report.n_records == 15511


def test_wikimel_kb_covers_every_gold(wikimel_dev):
    kb = {e.id: e for e in read_kb_entities("wikimel", WIKIMEL)}
    assert len(kb) == 18880
    assert all(e.gold_id in kb for e in wikimel_dev)
    assert all(kb[e.gold_id].name == e.gold_name for e in wikimel_dev)
    assert sum(bool(e.description) for e in kb.values()) > 0.9 * len(kb)


def test_wikimel_aliases_come_from_ne2qid(tmp_path):
    (tmp_path / "qid2ne.json").write_text(json.dumps({"Q1": "Alpha", "Q2": "Beta"}))
    (tmp_path / "ne2qid.json").write_text(json.dumps({"Alpha": "Q1", "Alpha (letter)": "Q1", "Beta": "Q2"}))
    kb = list(read_kb_entities("wikimel", tmp_path))
    assert [(e.id, e.name, e.aliases, e.description) for e in kb] == [
        ("Q1", "Alpha", ["Alpha (letter)"], ""), ("Q2", "Beta", [], "")]


# --------------------------------------------------------------------------------------------- RichpediaMEL


def test_richpedia_dev_is_carved_deterministically_and_disjoint():
    assert available_splits("richpedia", RICHPEDIA) == ["train", "dev"]
    dev = load_dataset("richpedia", RICHPEDIA, "dev")
    train = load_dataset("richpedia", RICHPEDIA, "train")
    n_all = len(json.loads((RICHPEDIA / "train.json").read_text(encoding="utf-8")))
    assert dev.report.n_records == round(0.1 * n_all)
    assert dev.report.n_records + train.report.n_records == n_all
    dev_ids = {e.sample_id for e in dev} | {sid for sid, _, _ in dev.report.unlocated}
    train_ids = {e.sample_id for e in train} | {sid for sid, _, _ in train.report.unlocated}
    assert not dev_ids & train_ids
    assert any("carved" in n for n in dev.report.notes)
    again = load_dataset("richpedia", RICHPEDIA, "val")  # alias of the carved dev
    assert [e.sample_id for e in again] == [e.sample_id for e in dev]
    other = load_dataset("richpedia", RICHPEDIA, "dev", seed=1)
    assert {e.sample_id for e in other} != {e.sample_id for e in dev}
    check_invariants(dev)
    check_invariants(train)
    assert all(e.gold_id == e.sample_id.split("#")[0] for e in dev)  # GHMFC keys samples by their QID


def test_richpedia_kb_has_descriptions_and_entity_images():
    kb = {e.id: e for e in read_kb_entities("richpedia", RICHPEDIA)}
    assert len(kb) == 17805
    assert kb["Q80"].images and Path(kb["Q80"].images[0]).is_file()
    assert sum(bool(e.images) for e in kb.values()) == len(list((RICHPEDIA / "entity_images").glob("Q*.jpg")))
    assert all(e.description for e in kb.values())  # empty short ones fall back to qid2abs_long.json
    long = {e.id: e for e in read_kb_entities("richpedia", RICHPEDIA, long_descriptions=True)}
    assert len(long["Q23"].description) > len(kb["Q23"].description)


def test_richpedia_uses_a_dev_file_when_there_is_one(tmp_path):
    rec = {"id": "Q1", "sentence": "Ada Lovelace wrote notes.", "mentions": "Ada Lovelace",
           "entities": "Ada Lovelace", "answer": "Q1"}
    (tmp_path / "train.json").write_text(json.dumps({"Q1": rec}))
    (tmp_path / "dev.json").write_text(json.dumps({"Q2": dict(rec, id="Q2", answer="Q2")}))
    assert available_splits("richpedia", tmp_path) == ["train", "dev"]
    assert [e.gold_id for e in load_dataset("richpedia", tmp_path, "dev")] == ["Q2"]
    assert [e.gold_id for e in load_dataset("richpedia", tmp_path, "train")] == ["Q1"]


def test_bad_dev_fraction_is_refused():
    with pytest.raises(InputError, match="dev_fraction"):
        load_dataset("richpedia", RICHPEDIA, "dev", dev_fraction=1.5)


# --------------------------------------------------------------------------------------------- WikiDiverse


def test_wikidiverse_val_and_dev_are_the_same_split():
    assert available_splits("wikidiverse", WIKIDIVERSE) == ["train", "val"]
    val = load_dataset("wikidiverse", WIKIDIVERSE, "val")
    dev = load_dataset("wikidiverse", WIKIDIVERSE, "dev")
    assert [e.to_dict() | {"split": ""} for e in val] == [e.to_dict() | {"split": ""} for e in dev]
    assert dev.split == "dev" and all(e.split == "dev" for e in dev)
    splits = json.loads((WIKIDIVERSE / "splits.json").read_text(encoding="utf-8"))
    assert val.report.n_records == len(splits["val"])
    check_invariants(val)
    # no images ship: every record is counted as missing, and the URL is kept aside
    assert val.report.n_missing_image == val.report.n_records
    assert all(e.mention.image is None for e in val)
    assert val.image_urls and all(u.startswith("http") for u in val.image_urls.values())
    assert set(val.image_urls) <= {e.sample_id for e in val}


def test_wikidiverse_kb_from_gold_names():
    kb = {e.id: e for e in read_kb_entities("wikidiverse", WIKIDIVERSE)}
    assert kb["Q145"].name == "United Kingdom" and kb["Q145"].description == ""
    train = load_dataset("wikidiverse", WIKIDIVERSE, "train")
    assert all(e.gold_id in kb for e in train)
    assert all(e.gold_name == kb[e.gold_id].name or e.gold_name in kb[e.gold_id].aliases for e in train)


def test_wikidiverse_local_image_is_used_when_present(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mention_7.jpg").write_bytes(b"\xff\xd8\xff")
    recs = [{"id": 7, "sentence": "Obama in Paris.", "imgPath": "mention_7.jpg", "mention": ["Obama", "Paris"],
             "entity": ["Barack Obama", "Paris"], "answer": ["Q76", "Q90"], "img-url": "https://x/a.jpg"},
            {"id": 8, "sentence": "Paris at night.", "imgPath": "mention_8.jpg", "mention": ["Paris"],
             "entity": ["Paris"], "answer": ["Q90"]}]
    (tmp_path / "WikiDiverse.json").write_text(json.dumps(recs))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [7, 8], "dev": []}))
    split = load_dataset("wikidiverse", tmp_path, "train")
    assert [e.mention.image is not None for e in split] == [True, True, False]
    assert split.image_urls == {"7#0": "https://x/a.jpg", "7#1": "https://x/a.jpg"}
    assert (split.report.n_with_image, split.report.n_missing_image) == (1, 1)


# --------------------------------------------------------------------------------------------- MIMIC


def make_mimic(root: Path) -> Path:
    (root / "mention_image").mkdir(parents=True)
    (root / "kb_image").mkdir()
    (root / "mention_image" / "m1.jpg").write_bytes(b"\xff\xd8\xff")  # MIMIC converted m1.png to jpg
    (root / "kb_image" / "e1.jpg").write_bytes(b"\xff\xd8\xff")
    train = [{"id": "a", "sentence": "Caf\u00e9 de Flore in Paris", "mentions": "Caf%C3%A9%20de%20Flore",
              "entities": "Caf\u00e9 de Flore", "answer": "Q1", "imgPath": "m1.png"},
             {"id": "b", "sentence": "Someone unknown.", "mentions": "Someone", "answer": "nil", "imgPath": ""}]
    dev = [{"sentence": "PARIS at dawn", "mentions": ["Paris"], "answer": ["Q2"], "imgPath": "nope.jpg"}]
    (root / "WIKIMEL_train.json").write_text(json.dumps(train))
    (root / "WIKIMEL_dev.json").write_text(json.dumps(dev))
    kb = [{"entity_name": "Caf%C3%A9 de Flore", "attr": "A caf\u00e9.", "image_list": ["e1.jpg", "gone.jpg"], "id": 0},
          {"entity_name": "Paris", "attr": "Capital of France.", "image_list": [], "id": 1}]
    (root / "kb_entity.json").write_text(json.dumps(kb))
    (root / "qid2id.json").write_text(json.dumps({"Q1": 0, "Q2": 1}))
    return root


def test_mimic_reader(tmp_path):
    root = make_mimic(tmp_path / "mimic")
    assert available_splits("mimic", root) == ["train", "dev"]
    train = load_dataset("mimic", root, "train")
    check_invariants(train)
    first, nil = train.examples
    assert (first.sample_id, first.mention.text, first.gold_id, first.gold_name) == (
        "a#0", "Caf\u00e9 de Flore", "Q1", "Caf\u00e9 de Flore")
    assert Path(first.mention.image).name == "m1.jpg"
    assert nil.gold_id == NIL and nil.mention.image is None and train.report.n_nil == 1
    dev = load_dataset("mimic", root, "val")
    (e,) = dev.examples
    assert (e.sample_id, e.mention.text, e.gold_name) == ("0#0", "PARIS", "Paris")  # name looked up in the KB
    assert dev.report.n_located_casefold == 1 and dev.report.n_missing_image == 1
    kb = list(read_kb_entities("mimic", root))
    assert [(x.id, x.name) for x in kb] == [("Q1", "Caf\u00e9 de Flore"), ("Q2", "Paris")]
    assert [Path(p).name for p in kb[0].images] == ["e1.jpg"] and kb[1].description == "Capital of France."
    assert [x.id for x in read_kb_entities("mimic", root / "kb_entity.json")] == ["Q1", "Q2"]


def test_mimic_kb_needs_an_id(tmp_path):
    root = make_mimic(tmp_path)
    (root / "kb_entity.json").write_text(json.dumps([{"entity_name": "X", "attr": ""}]))
    with pytest.raises(DatasetFormatError, match=r"kb_entity\.json, record 0: .*'id' or a 'qid'"):
        list(read_kb_entities("mimic", root))


# --------------------------------------------------------------------------------------------- GEMEL


def write_lines(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_gemel_reader(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(b"\xff\xd8\xff")
    write_lines(tmp_path / "train.json", [
        {"mention": "Obama", "text": "Obama speaks.", "img_name": "1.jpg", "golden": "Q76", "target": "Barack Obama"},
        {"mention": "Paris", "text": "Paris by night.", "img_url": "https://x/p.jpg", "golden": "Paris"},
        {"mention": "Bob", "text": "Bob waves.", "img_name": "2.jpg", "golden": "NIL", "target": "Bob"},
        {"mention": "Rome", "text": "Rome.", "img_name": "3.jpg", "target": "Q220"},
    ])
    split = load_dataset("gemel", tmp_path, "train")
    check_invariants(split)
    got = [(e.sample_id, e.gold_id, e.gold_name) for e in split]
    assert got == [("0#0", "Q76", "Barack Obama"), ("1#0", "Paris", "Paris"), ("2#0", NIL, ""), ("3#0", "Q220", "")]
    assert split.examples[0].mention.image and split.examples[1].mention.image is None
    assert split.image_urls == {"1#0": "https://x/p.jpg"}
    kb = list(read_kb_entities("gemel", tmp_path))
    assert [(e.id, e.name) for e in kb] == [("Q76", "Barack Obama"), ("Paris", "Paris"), ("Q220", "Q220")]
    write_jsonl_kb([Entity("Q76", "Barack Obama", description="44th president")], tmp_path / "kb.jsonl")
    assert [e.description for e in read_kb_entities("gemel", tmp_path)] == ["44th president"]


def test_gemel_accepts_a_json_list_and_needs_a_gold(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps([{"id": 5, "mention": "A", "text": "A b", "golden": "Q1"}]))
    assert [e.sample_id for e in load_dataset("gemel", tmp_path, "dev")] == ["5#0"]
    write_lines(tmp_path / "test.jsonl", [{"mention": "A", "text": "A b", "golden": "Q1"},
                                          {"mention": "A", "text": "A b", "img_name": "x.jpg"}])
    with pytest.raises(DatasetFormatError, match=r"test\.jsonl, record 'line 2': .*'golden' or 'target'"):
        load_dataset("gemel", tmp_path, "test")


# --------------------------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip(tmp_path, wikimel_dev):
    examples = wikimel_dev.examples[:200]
    entities = list(read_kb_entities("wikimel", WIKIMEL))[:50]
    assert write_jsonl_examples(examples, tmp_path / "ds" / "dev.jsonl") == 200
    assert write_jsonl_kb(entities, tmp_path / "ds" / "kb.jsonl") == 50
    back = load_dataset("jsonl", tmp_path / "ds", "dev")
    assert back.examples == examples
    assert back.report.n_with_span == 200 and back.report.n_located_exact == 0
    check_invariants(back)
    assert list(read_kb_entities("jsonl", tmp_path / "ds")) == entities
    assert list(read_kb_entities("jsonl", tmp_path / "ds" / "kb.jsonl")) == entities
    assert load_dataset("jsonl", tmp_path / "ds" / "dev.jsonl", "dev").examples == examples
    assert available_splits("jsonl", tmp_path / "ds") == ["dev"]


def test_jsonl_invalid_span_is_counted_and_bad_types_raise(tmp_path):
    good = Example(Mention("Ada wrote.", 0, 3), "Q7259", "Ada Lovelace", "s1").to_dict()
    bad_span = json.loads(json.dumps(good))
    bad_span["mention"]["end"] = 99
    bad_span["sample_id"] = "s2"
    write_lines(tmp_path / "dev.jsonl", [good, bad_span])
    split = load_dataset("jsonl", tmp_path, "dev")
    assert [e.sample_id for e in split] == ["s1"]
    assert split.report.n_invalid == 1 and split.report.invalid[0][0] == "s2"
    assert split.examples[0].dataset == "jsonl" and split.examples[0].split == "dev"
    check_invariants(split)
    wrong = json.loads(json.dumps(good))
    wrong["mention"]["start"] = "0"
    write_lines(tmp_path / "test.jsonl", [good, wrong])
    with pytest.raises(DatasetFormatError, match=r"test\.jsonl, record 'line 2': 'mention.start'"):
        load_dataset("jsonl", tmp_path, "test")


# --------------------------------------------------------------------------------------------- malformed input


def make_wikimel(root: Path, samples: dict, splits=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Wikidata-MEL.json").write_text(json.dumps(samples), encoding="utf-8")
    (root / "splits.json").write_text(json.dumps(splits or {"train": [], "dev": list(samples)}))
    return root


def sample(sid, sentence, mentions, answers=None, names=None):
    answers = answers or [f"Q{i + 1}" for i in range(len(mentions))]
    return {"id": sid, "sentence": sentence, "mentions": mentions,
            "entities": names or [f"E{i}" for i in range(len(mentions))], "answer": answers}


def test_bad_json_names_the_file(tmp_path):
    root = make_wikimel(tmp_path, {"1": sample("1", "Ann met Bo.", ["Ann"])})
    (root / "Wikidata-MEL.json").write_text('{"1": {"id": "1",', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"Wikidata-MEL\.json: not valid JSON"):
        load_dataset("wikimel", root, "dev")


def test_missing_key_names_file_and_record(tmp_path):
    broken = sample("42", "Ann met Bo.", ["Ann"])
    del broken["answer"]
    root = make_wikimel(tmp_path, {"1": sample("1", "Ann met Bo.", ["Ann"]), "42": broken})
    with pytest.raises(DatasetFormatError) as info:
        load_dataset("wikimel", root, "dev")
    assert "Wikidata-MEL.json" in str(info.value) and "'42'" in str(info.value) and "'answer'" in str(info.value)
    assert info.value.record == "42" and info.value.path.endswith("Wikidata-MEL.json")


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s.update(sentence=7), r"'sentence' must be a string"),
    (lambda s: s.update(mentions=[1]), r"'mentions' must be a string or a list of strings"),
    (lambda s: s.update(answer=["Q1", "Q2"]), r"differ in length"),
    (lambda s: s.update(answer=[" "]), r"empty gold entity id"),
])
def test_wrong_types_raise(tmp_path, change, pattern):
    s = sample("9", "Ann met Bo.", ["Ann"])
    change(s)
    root = make_wikimel(tmp_path, {"9": s})
    with pytest.raises(DatasetFormatError, match=r"record '9': .*" + pattern):
        load_dataset("wikimel", root, "dev")


def test_wrong_top_level_type(tmp_path):
    root = make_wikimel(tmp_path, {})
    (root / "Wikidata-MEL.json").write_text("[]")
    with pytest.raises(DatasetFormatError, match="top level must be an object, got a list"):
        load_dataset("wikimel", root, "dev")


def test_missing_file_says_which_layout(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"splits\.json: file not found; the wikimel layout expects"):
        load_dataset("wikimel", tmp_path, "dev")
    with pytest.raises(DatasetFormatError, match="no such directory"):
        load_dataset("wikidiverse", tmp_path / "nowhere", "dev")
    with pytest.raises(DatasetFormatError, match=r"qid2ne\.json: file not found"):
        list(read_kb_entities("richpedia", tmp_path))


def test_unknown_split_and_format(tmp_path):
    with pytest.raises(InputError, match="no split 'test'; splits present: train, val"):
        load_dataset("wikidiverse", WIKIDIVERSE, "test")
    with pytest.raises(InputError) as info:
        load_dataset("nope", WIKIDIVERSE)
    assert all(f in str(info.value) for f in FORMATS)
    with pytest.raises(InputError, match="known formats"):
        read_kb_entities("nope", WIKIDIVERSE)


def test_unlocatable_mention_is_counted_and_listed(tmp_path):
    root = make_wikimel(tmp_path, {
        "1": sample("1", "Ann met Bo in Rome.", ["Ann", "Carl", "rome"]),
        "2": sample("2", "   ", ["Ann"]),
    })
    split = load_dataset("wikimel", root, "dev", unlocated="context")
    r = split.report
    # Carl is not in the caption: still an example, linked by its mention string with the caption as context
    assert [(e.sample_id, e.located) for e in split] == [("1#0", "exact"), ("1#1", "context"), ("1#2", "casefold")]
    assert split[1].mention.caption == "Carl: Ann met Bo in Rome." and split[1].mention.text == "Carl"
    assert (r.n_mentions, r.n_located_exact, r.n_located_casefold, r.n_unlocated, r.n_invalid) == (4, 1, 1, 1, 1)
    assert r.unlocated == [("1#1", "Carl", "Ann met Bo in Rome.")]
    assert r.invalid[0][0] == "2#0" and "empty" in r.invalid[0][1]
    assert "1 mentions not found" in r.summary() and "Carl" in r.summary()
    check_invariants(split)
    skipped = load_dataset("wikimel", root, "dev")  # by default (training, annotation import): left out
    assert [e.sample_id for e in skipped] == ["1#0", "1#2"] and skipped.report.n_unlocated == 1
    check_invariants(skipped)
    with pytest.raises(InputError, match="unlocated must be one of"):
        load_dataset("wikimel", root, "dev", unlocated="drop")


def test_repeated_mention_takes_the_next_occurrence(tmp_path):
    root = make_wikimel(tmp_path, {"1": sample("1", "Smith and Smith", ["Smith", "Smith"]),
                                   "2": sample("2", "The Fords wed", ["Fords", "Fords"])})
    spans = [(e.mention.start, e.mention.end) for e in load_dataset("wikimel", root, "dev")]
    assert spans == [(0, 5), (10, 15), (4, 9), (4, 9)]


# --------------------------------------------------------------------------------------------- properties

CAPTION = st.text(min_size=1, max_size=80).filter(lambda s: s.strip())
ASCII_CAPTION = st.text(st.sampled_from("abcdefgXYZ ,.-'"), min_size=1, max_size=60).filter(lambda s: s.strip())


def read_one(caption: str, mentions: list[str]) -> DatasetSplit:
    builder = ExampleBuilder("wikimel", "dev", Path("."))
    builder.add_record("s", caption, [(m, f"Q{i}", "") for i, m in enumerate(mentions)], None)
    return builder.build()


@settings(max_examples=100, deadline=None)
@given(CAPTION, st.data())
def test_any_substring_is_located_exactly(caption, data):
    i = data.draw(st.integers(0, len(caption) - 1))
    j = data.draw(st.integers(i + 1, len(caption)))
    mention = caption[i:j]
    split = read_one(caption, [mention])
    if not mention.strip():  # an empty mention cannot be linked: invalid, not an example
        assert split.report.n_invalid == 1 and not split.examples
        return
    (e,) = split.examples
    assert e.mention.text == mention.strip() and split.report.n_located_exact == 1


@settings(max_examples=100, deadline=None)
@given(ASCII_CAPTION, st.data())
def test_case_changed_substring_is_located_ignoring_case(caption, data):
    i = data.draw(st.integers(0, len(caption) - 1))
    j = data.draw(st.integers(i + 1, len(caption)))
    mention = data.draw(st.sampled_from([str.upper, str.lower, str.swapcase]))(caption[i:j])
    split = read_one(caption, [mention])
    if not mention.strip():
        assert split.report.n_invalid == 1
        return
    (e,) = split.examples
    assert e.mention.text.lower() == mention.strip().lower()
    check_invariants(split)


@settings(max_examples=100, deadline=None)
@given(CAPTION, st.lists(st.text(max_size=12), min_size=1, max_size=5))
def test_report_accounts_for_every_mention(caption, mentions):
    split = read_one(caption, mentions)
    check_invariants(split)
    assert split.report.n_mentions == len(mentions)
    for _sid, m, _ in split.report.unlocated:
        assert not m.strip() or m.strip().lower() not in caption.lower() or len(caption.lower()) != len(caption)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=6), max_size=60), st.floats(0.05, 0.95), st.integers(0, 3))
def test_carve_dev_is_stable_and_sized(ids, fraction, seed):
    dev = carve_dev(ids, fraction, seed)
    assert dev <= ids and len(dev) == round(len(ids) * fraction)
    assert carve_dev(sorted(ids, reverse=True), fraction, seed) == dev  # independent of input order


def test_public_api_types():
    assert FORMATS == ("wikimel", "richpedia", "wikidiverse", "mimic", "gemel", "jsonl")
    assert isinstance(ReadReport().summary(), str)


def test_repeated_record_ids_stay_unique(tmp_path):
    write_lines(tmp_path / "dev.jsonl", [{"id": 1, "mention": "A", "text": "A b", "golden": "Q1"},
                                         {"id": 1, "mention": "b", "text": "A b", "golden": "Q2"}])
    split = load_dataset("gemel", tmp_path, "dev")
    assert [e.sample_id for e in split] == ["1#0", "1@1#0"]
    assert any("repeat an id" in n for n in split.report.notes)


def test_wikimel_mentions_without_particles_are_located_by_their_words(wikimel_dev):
    by_id = {e.sample_id: e for e in wikimel_dev}
    for sid, text in (("27822#0", "Otto von Bismarck"), ("27268#0", "James Hamilton, 1st Duke of Abercorn"),
                      ("21136#0", "Kees van Dijk"), ("21743#0", "Guillaume Dode de la Brunerie")):
        assert (by_id[sid].located, by_id[sid].mention.text) == ("words", text)
    lost = by_id["19682#0"]  # 'Gotse Delcheva' in "Sultana Delcheva – Gotse's mother": words out of order
    assert lost.located == "context" and lost.mention.caption.startswith("Gotse Delcheva: Sultana Delcheva")
    r = wikimel_dev.report
    assert r.n_located_words > 0 and len(wikimel_dev) == r.n_mentions  # nothing left out of n
    assert "words" in r.rules_line() and r.located_samples["words"]


def test_a_batch_over_a_split_links_every_mention_mel_eval_counts(tmp_path):
    """`mel batch link/eval --format F` over a split left out a mention no rule finds in its caption,
    which `mel eval` links by its mention string and counts in n."""
    from mel.batch.sources import open_source
    data = make_wikimel(tmp_path / "wm", {"1": sample("1", "Norris in 1976, on the set", ["Norris"]),
                                          "2": sample("2", "The mission patch, 1999", ["Collins"])})
    source = open_source(format="wikimel", data=str(data), split="dev")
    mentions = [json.loads(r)["mention"] for r in source.records or []]
    assert source.n_rows == 2 and [m["caption"][m["start"]:m["end"]] for m in mentions] == ["Norris", "Collins"]
