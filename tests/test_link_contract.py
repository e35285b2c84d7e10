"""What a linker returns (typed details, the KB row on each candidate, JSON) and the one span resolver."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from mel.errors import InputError
from mel.kb import build_kb
from mel.linkers import build_linker
from mel.spans import resolve_mention, resolve_span
from mel.types import (
    DETAILS_KINDS,
    Ambiguity,
    ApparentFace,
    Beam,
    Candidate,
    CandidateScores,
    DimDetails,
    Entity,
    ExactDetails,
    ExpertCue,
    FeatureMask,
    Fusion,
    GemelDetails,
    LinkDetails,
    LinkResult,
    Mention,
    PromptDemonstration,
    details_from_dict,
    register_details,
)

ENTITIES = [Entity("Q1", "Eileen Collins", ["Collins"], "American astronaut", "person"),
            Entity("Q2", "Phil Collins", [], "English drummer of Genesis", "person"),
            Entity("Q3", "Grace Hopper", ["Amazing Grace"], "computer scientist", "person")]
MENTION = Mention("Collins in orbit", 0, 7)


def _result(linker: str, details) -> LinkResult:
    e = ENTITIES[0]
    return LinkResult(linker, MENTION, e, [Candidate(e, -0.5, linker)], -0.5, {"total": 1.0}, "offline", {}, details)


GEMEL = GemelDetails(
    mode="bm25 top-20", ranking="every candidate by LLM log-likelihood", pool="train split (2 examples)",
    demonstrations=[PromptDemonstration("Collins flew Columbia", "Collins", "Q1", "Eileen Collins", 0.91, sample_id="s1")],
    visual_note="no mapper", generated="Eileen Collins", logprob=-0.4,
    beams=[Beam("Eileen Collins", -0.4, -0.4, ["Q1"]), Beam("Phil Collins", -2.0, -2.0, ["Q2"])],
    ambiguity=Ambiguity("Eileen Collins", ["Q1", "Q9"], "Q1", "rule"),
    retriever=[CandidateScores("Q1", "Eileen Collins", {"bm25": 3.2})],
    fusion=Fusion(0.25, {"bm25": 1.0}, "formula"),
    scores=[CandidateScores("Q1", "Eileen Collins", {"bm25": 3.2}, llm_logprob=-0.4, fused=-0.1)],
    decode={"steps": 3, "prefill_ms": 1.5})


@pytest.mark.parametrize("linker, details", [
    ("gemel+bm25", GEMEL),
    ("dim", DimDetails(protocol="whole-kb", n_candidates=40, feature_mask=FeatureMask(image=True, cue=True),
                       cue=ExpertCue("tabby cat", "imagenet-labels"), batch_size=8, pool=["Q1", "Q2"])),
    ("dim", DimDetails(protocol="whole-kb", n_candidates=9, feature_mask=FeatureMask(image=True, cue=True),
                       cue=ExpertCue("a photo of one person, apparently a woman aged about 30-40", "faces",
                                     faces=[ApparentFace([10, 20, 110, 140], 1.2, "female", 0.89, 31.9, [30, 40])],
                                     note=""))),
    ("exact", ExactDetails(n_exact_matches=2)),
    ("bm25", LinkDetails()),
])
def test_typed_details_survive_json(linker, details):
    result = _result(linker, details)
    data = json.loads(result.to_json())
    assert data["details"]["kind"] == details.kind and "extra" not in data["details"]
    back = LinkResult.from_json(result.to_json())
    assert back == result and type(back.details) is type(details)


def test_old_json_with_a_plain_details_dict_loads_into_the_linkers_class():
    old = {"mode": "whole-KB trie", "n_demos": 1, "generated": "Eileen Collins",
           "demonstrations": [{"caption": "Collins flew Columbia", "mention": "Collins", "gold_id": "Q1",
                               "gold_name": "Eileen Collins", "similarity": 0.91, "image": None, "sample_id": "s1"}],
           "llm_ranking": [{"name": "Eileen Collins", "logprob": -0.4, "score": -0.4, "entity_ids": ["Q1"]}],
           "retriever": [{"id": "Q1", "name": "Eileen Collins", "bm25": 3.2, "dense": 0.8}]}
    data = json.loads(_result("gemel+bm25", {}).to_json())
    data["details"] = old  # as written before the details were typed: no kind
    result = LinkResult.from_dict(data)
    d = result.details
    assert isinstance(d, GemelDetails) and d.n_demos == 1 and d.demonstrations[0].similarity == 0.91
    assert d.beams[0].entity_ids == ["Q1"]  # "llm_ranking" is the beams of rank="all"
    assert d.retriever[0].retrievers == {"bm25": 3.2, "dense": 0.8} and d.extra == {}
    assert LinkResult.from_json(result.to_json()) == result
    assert isinstance(_result("dim", {"protocol": "whole-kb", "cue": None}).details, DimDetails)
    assert isinstance(_result("gemel-free", {"not_a_kb_name": True}).details, GemelDetails)


def test_keys_without_a_field_are_kept_flat_and_unknown_kinds_are_kept_whole():
    plugin = _result("my-linker", {"vec": [1.0, 2.0], "note": "from a plugin"})
    assert type(plugin.details) is LinkDetails and plugin.details.note == "from a plugin"
    assert plugin.details.extra == {"vec": [1.0, 2.0]} and plugin.details.to_dict()["vec"] == [1.0, 2.0]
    other = details_from_dict({"kind": "their-kind", "score_map": {"a": 1}})
    assert type(other) is LinkDetails and other.to_dict()["kind"] == "their-kind"
    assert details_from_dict(other.to_dict()).to_dict() == other.to_dict()

    @register_details
    @dataclass
    class PluginDetails(LinkDetails):
        kind: ClassVar[str] = "test-plugin"
        vec: list[float] = field(default_factory=list)

    try:
        typed = _result("my-linker", PluginDetails(vec=[1.0]))
        assert LinkResult.from_json(typed.to_json()) == typed  # a registered kind comes back typed
    finally:
        DETAILS_KINDS.pop("test-plugin")
    with pytest.raises(InputError, match="details must be a LinkDetails"):
        _result("bm25", ["not", "details"])
    with pytest.raises(InputError, match="not a valid Beam"):
        LinkResult.from_dict({**json.loads(_result("gemel", {}).to_json()),
                              "details": {"kind": "gemel", "beams": [{"name": "x"}]}})


def test_candidates_carry_the_kbs_row(tmp_path, hashing_encoder):
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    for name in ("exact", "bm25"):
        result = build_linker(name, kb, None).link(Mention.from_text("Collins in orbit", "Collins"))
        assert result.candidates and all(c.entity == kb.get(c.entity.id) for c in result.candidates)
    exact = build_linker("exact", kb, None).link(Mention.from_text("Amazing Grace in orbit", "Amazing Grace"))
    assert exact.details == ExactDetails(n_exact_matches=1)


def test_kb_ids_to_rows_in_one_query(tmp_path, hashing_encoder, monkeypatch):
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    queries = []
    real = kb._query
    monkeypatch.setattr(kb, "_query", lambda sql, params=(): queries.append(sql) or real(sql, params))
    found = kb.idxs_of(["Q3", "Q1", "missing", "Q3"])
    assert set(found) == {"Q1", "Q3"} and len(queries) == 1
    assert kb.entities_at([found["Q3"]])[0].name == "Grace Hopper" and kb.idx_of("missing") is None
    assert kb.idxs_of([]) == {}


# -- one span resolver -------------------------------------------------------------------------------
def test_one_resolver_builds_the_mention_once():
    caption = "Collins met Collins."
    m = resolve_mention(caption, "Collins", 12, 19, image="photo.jpg", id="m1")
    assert (m.start, m.end, m.image, m.id) == (12, 19, "photo.jpg", "m1")
    assert resolve_mention(caption, "collins").start == 0  # typed: located
    assert resolve_span(caption, "Collins", 3, 9) == (0, 7)  # the app: stale offsets are ignored
    with pytest.raises(InputError, match="disagree"):
        resolve_mention(caption, "Collins", 3, 9, strict=True)  # the CLI: both typed, so say so
    with pytest.raises(InputError, match=r"span \[5, 99\) is outside"):
        resolve_mention(caption, "Collins", 5, 99, strict=True)
    nfd = "Zoe\u0308 Saldana"
    assert resolve_mention(nfd, "Zoe\u0308 Saldana", 0, 12, strict=True).text == "Zo\u00eb Saldana"
    assert resolve_span(nfd, None, 0, 12) == (0, 12)  # offsets of the caption as given


def test_demo_spans_are_the_librarys():
    import demo.spans
    import mel.spans
    for name in ("resolve_span", "resolve_mention", "span_from_selection", "utf16_to_index", "index_to_utf16"):
        assert getattr(demo.spans, name) is getattr(mel.spans, name)


def test_the_cli_link_uses_the_resolver(tmp_path, hashing_encoder, capsys):
    from mel.cli import main
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    base = ["link", "--kb", str(kb.path), "--linker", "exact", "--caption", "Collins met Collins."]
    assert main(base + ["--start", "12", "--end", "19", "--mention", "Collins", "--json"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["mention"]["start"] == 12 and out["details"]["kind"] == "exact"
    assert main(base + ["--start", "3", "--end", "9", "--mention", "Collins"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_a_cue_keeps_its_faces_typed_and_drops_what_is_not_a_face_attribute():
    from mel.dim.linker import expert_cue
    record = {"text": "a photo of one person", "provider": "faces", "question": "", "note": "",
              "faces": [{"box": [1, 2, 3, 4], "score": 0.9, "gender": "male", "gender_probability": 0.7,
                         "age": 40.2, "age_range": [40, 50], "embedding": [0.1] * 128}]}
    cue = expert_cue(record)
    assert cue.faces == [ApparentFace([1, 2, 3, 4], 0.9, "male", 0.7, 40.2, [40, 50])]
    assert "embedding" not in cue.to_dict()["faces"][0]  # the 128-d vector stays inside DIM
    assert ExpertCue.from_dict({"text": "tabby cat", "provider": "imagenet-labels"}).faces == []  # older records
    with pytest.raises(InputError, match="ApparentFace"):
        ExpertCue.from_dict({"text": "x", "faces": [{"box": [0, 0, 1, 1], "height": 3}]})


def test_dim_disable_visual_takes_known_groups_only():
    from mel.dim.linker import _visual_groups
    assert _visual_groups("face_sex+face_age") == {"face_sex", "face_age"} == _visual_groups("face_sex, face_age")
    assert _visual_groups(()) == set() and _visual_groups(["image_text"]) == {"image_text"}
    with pytest.raises(InputError, match="unknown visual feature group.*choose from image_text"):
        _visual_groups("face_size")
