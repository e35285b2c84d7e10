"""A joint DIM head: one head trained on several datasets, each featurised against its own KB."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_dim import ENTITIES, StubImageEncoder, write_tiny_training_set

from mel.errors import InputError
from mel.kb import build_kb
from mel.presets import Preset
from mel.types import Entity, Example, Mention

# the second dataset's KB: other entities in other rows; Q9 and Q10 exist only here, Q2 in both KBs
OTHER_ENTITIES = [
    Entity("Q9", "Ada Lovelace", [], "Sex: female. Birth: 1815, London. Death: 1852. Occupation: mathematician.",
           "person"),
    Entity("Q10", "Ada Yonath", [], "Sex: female. Birth: 1939, Jerusalem. Occupation: crystallographer.", "person"),
    Entity("Q11", "Lord Byron", ["Byron"], "Sex: male. Birth: 1788, London. Death: 1824. Occupation: poet.", "person"),
    Entity("Q12", "Byron Bay", [], "Town in New South Wales.", "place"),
    Entity("Q2", "Phil Collins", [], "Sex: male. Birth: 1951, London. Occupation: drummer, singer.", "person"),
]


def write_other_training_set(root, text_encoder):
    """A second jsonl dataset (root/data) and its own KB (root/kb.sqlite, OTHER_ENTITIES)."""
    from mel.datasets import write_jsonl_examples, write_jsonl_kb

    rows = [("Ada and her notes on the engine, 1843", "Ada", "Q9"), ("Ada at the Nobel ceremony, 2009", "Ada", "Q10"),
            ("Byron in Greece, 1823", "Byron", "Q11"), ("Surfers at Byron", "Byron", "Q12"),
            ("Phil Collins on stage", "Phil Collins", "Q2")] * 3
    examples = [Example(Mention.from_text(c, m, id=f"o{i}#0"), gold, sample_id=f"o{i}#0", split="train")
                for i, (c, m, gold) in enumerate(rows)]
    data = root / "data"
    data.mkdir(parents=True)
    write_jsonl_examples(examples, data / "train.jsonl")
    write_jsonl_examples(examples[:5], data / "dev.jsonl")
    write_jsonl_kb(OTHER_ENTITIES, data / "kb.jsonl")
    build_kb(OTHER_ENTITIES, root / "kb.sqlite", text_encoder=text_encoder, progress=False)
    return data


@pytest.fixture
def two_datasets(tmp_path, hashing_encoder, monkeypatch):
    """(data dirs, KB paths) of two tiny datasets with different KBs; the preset's encoders are the hashing one."""
    monkeypatch.setattr(Preset, "backend", lambda self, role: {"text_encoder": hashing_encoder,
                                                               "image_encoder": StubImageEncoder()}[role])
    (tmp_path / "a").mkdir()
    first = write_tiny_training_set(tmp_path / "a", hashing_encoder, dev=True)
    second = write_other_training_set(tmp_path / "b", hashing_encoder)
    return [first, second], [tmp_path / "a" / "kb.sqlite", tmp_path / "b" / "kb.sqlite"]


HEAD = ["--d-model", "16", "--n-heads", "2", "--ffn-dim", "16", "--out-dim", "8", "--train-width", "6", "--n-hard", "2",
        "--batch-size", "4", "--quiet"]


def _args(dirs, kbs, out, cache, epochs):
    return ["train", "dim", "--format", "jsonl", "--data", ",".join(map(str, dirs)), "--kb", ",".join(map(str, kbs)),
            "--preset", "offline", "--out", str(out), "--epochs", str(epochs), "--cache-dir", str(cache),
            "--holdout", "0.2", *HEAD]


def test_each_dataset_is_featurised_and_scored_against_its_own_kb(two_datasets, tmp_path):
    from mel.datasets import load_dataset
    from mel.dim.train import DimTrainConfig, DimTrainer, TrainingSet, heldout_examples
    from mel.kb import KnowledgeBase
    from mel.presets import get_preset

    dirs, kb_paths = two_datasets
    kbs = [KnowledgeBase(p) for p in kb_paths]
    sets = [TrainingSet(name, kb, load_dataset("jsonl", d, "train").examples, load_dataset("jsonl", d, "dev").examples,
                        {"dataset": "jsonl", "split": "train"})
            for name, kb, d in zip(("a", "b"), kbs, dirs, strict=True)]
    trainer = DimTrainer(DimTrainConfig(n_hard=2, train_width=6, holdout=0.2), None, get_preset("offline"),
                         tmp_path / "out", datasets=sets, cache_dir=tmp_path / "cache", progress=False)
    parts = trainer.prepare()
    for part, kb in zip(parts, kbs, strict=True):
        assert part.kb is kb and part.table.text.shape[0] == kb.size
        for split, examples in ((part.tr, part.train), (part.dv, part.dev), (part.ho, part.holdout)):
            assert len(split) == len(examples)
            for row, ex in enumerate(examples):  # the gold's row and every candidate are rows of THIS KB
                assert kb.entity_at(int(split.gold[row])).id == ex.gold_id
                assert split.cand[row][split.valid[row]].max() < kb.size
                if split is part.tr:
                    assert split.gold_pos[row] == 0 and split.cand[row, 0] == split.gold[row]
    # Q9 lives only in KB b, in a row that is another entity in KB a: its features come from b's table
    b, row = parts[1], kbs[1].idx_of("Q9")
    assert kbs[0].entity_at(row).id != "Q9"
    assert torch.equal(b.table.text[row], torch.from_numpy(b.extractor.entity_text_features([row])[0]))
    assert not torch.equal(b.table.text[row], parts[0].table.text[row])
    # calibration finds each dataset's held-out records again from what config.json records
    payload = {"train": {"holdout": 0.2, "seed": 42},
               "datasets": [{"dataset": "jsonl", "split": "train", "n_heldout": len(p.holdout)} for p in parts]}
    for part, d in zip(parts, dirs, strict=True):
        every = load_dataset("jsonl", d, "train", unlocated="context").examples
        assert {e.sample_id for e in heldout_examples(payload, every, "jsonl", "train", part.kb)} == \
            {e.sample_id for e in part.holdout}
    assert heldout_examples(payload, every, "wikimel", "train", part.kb) is None  # not trained on: all unseen
    # every batch holds one dataset's rows, and each training row comes once per epoch
    seen = {part.name: [] for part in parts}
    for part, rows in trainer._epoch_batches(np.random.default_rng(0)):
        seen[part.name] += rows.tolist()
    assert {name: sorted(rows) for name, rows in seen.items()} == {p.name: list(range(len(p.tr))) for p in parts}


@pytest.mark.slow
def test_joint_training_records_every_dataset_and_resumes(two_datasets, tmp_path):
    from mel.cli import main
    from mel.dim.linker import DimLinker
    from mel.dim.train import DimTrainer
    from mel.kb import KnowledgeBase
    from mel.presets import get_preset

    dirs, kbs = two_datasets
    cache = tmp_path / "cache"
    assert main(_args(dirs, kbs, tmp_path / "joint", cache, 2)) == 0
    payload = json.loads((tmp_path / "joint" / "config.json").read_text())
    assert [d["name"] for d in payload["datasets"]] == ["jsonl1", "jsonl2"]
    assert [d["kb"]["size"] for d in payload["datasets"]] == [len(ENTITIES), len(OTHER_ENTITIES)]
    assert payload["selected_on"] == "heldout" and payload["dev"]["mean_over"] == ["jsonl1", "jsonl2"]
    for d in payload["datasets"]:
        assert d["dev"]["n"] == {"jsonl1": 6, "jsonl2": 5}[d["name"]] and "hits@1" in d["heldout"]
    mean = np.mean([d["heldout"]["hits@1"] for d in payload["datasets"]])
    assert payload["heldout"]["hits@1"] == pytest.approx(mean, abs=1e-4)  # the epoch is chosen on this mean

    # a run stopped after epoch 1 and resumed ends with the same head as the uninterrupted one
    train_epoch = DimTrainer._train_epoch

    def stop_at_epoch_2(self, model, optimizer, scheduler, epoch, step):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, model, optimizer, scheduler, epoch, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DimTrainer, "_train_epoch", stop_at_epoch_2)
        assert main(_args(dirs, kbs, tmp_path / "cut", cache, 2)) == 130  # "interrupted", after epoch 1's save
    assert main(_args(dirs, kbs, tmp_path / "cut", cache, 2) + ["--resume"]) == 0
    a, b = load_file(str(tmp_path / "joint" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["epoch"] == payload["epoch"]

    # the head links against either KB
    for kb_path, mention, gold in ((kbs[0], Mention.from_text("Norris in 1976", "Norris"), "Q4"),
                                   (kbs[1], Mention.from_text("Ada and her notes on the engine", "Ada"), "Q9")):
        linker = DimLinker(KnowledgeBase(kb_path), get_preset("offline"), checkpoint=tmp_path / "joint")
        assert linker.link(mention).candidates and gold in [c.entity.id for c in linker.link(mention, k=5).candidates]


def test_dataset_flags_must_match(tmp_path):
    from mel.cli import build_parser
    from mel.dim.train import dataset_args

    def parsed(fmt, data, kb):
        return dataset_args(build_parser().parse_args(["train", "dim", "--format", fmt, "--data", data, "--kb", kb,
                                                       "--out", str(tmp_path / "o")]))

    assert parsed("wikimel", "D", "K") == [("wikimel", "wikimel", "D", "K")]
    assert parsed("wikimel,richpedia", "D1,D2", "K1,K2") == [("wikimel", "wikimel", "D1", "K1"),
                                                             ("richpedia", "richpedia", "D2", "K2")]
    assert [n for n, *_ in parsed("jsonl", "D1,D2", "K1,K2")] == ["jsonl1", "jsonl2"]
    with pytest.raises(InputError, match="one entry per dataset"):
        parsed("wikimel,richpedia", "D1,D2", "K1")
