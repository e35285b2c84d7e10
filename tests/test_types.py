import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mel.errors import InputError
from mel.types import Candidate, Entity, Example, LinkResult, Mention, locate_mention


def test_mention_span_and_text():
    m = Mention("Collins waves from the ISS.", 0, 7, image="astronaut.png")
    assert m.text == "Collins"
    assert Mention.from_json(m.to_json()) == m


@pytest.mark.parametrize("caption,start,end,fragment", [
    ("", 0, 1, "empty"),
    ("abc", 2, 9, "outside"),
    ("abc", 2, 2, "outside the caption (length 3) or empty"),
    ("a  b", 1, 3, "whitespace"),
    ("abc", -1, 2, "outside"),
    ("x" * 30_000, 0, 1, "limit"),
])
def test_bad_spans_say_what_is_wrong(caption, start, end, fragment):
    with pytest.raises(InputError, match=re.escape(fragment)):
        Mention(caption, start, end)


def test_from_text_locates_exact_then_case_insensitive():
    assert Mention.from_text("Hopper at Harvard", "Hopper").start == 0
    m = Mention.from_text("THE ROCKET FALCON", "falcon")
    assert m.text == "FALCON"
    with pytest.raises(InputError, match="does not occur"):
        Mention.from_text("Grace Hopper", "Turing")


def test_link_result_round_trip():
    e = Entity("Q1", "Eileen Collins", aliases=["Collins"], description="astronaut", type="person")
    m = Mention("Collins in orbit", 0, 7)
    r = LinkResult("dense", m, e, [Candidate(e, 0.9, "dense")], score=0.9, timings={"total": 1.5},
                   preset="offline", models={"text_encoder": "minilm"}, details={"k": 4})
    back = LinkResult.from_json(r.to_json())
    assert back == r and back.ranked_ids() == ["Q1"]
    ex = Example(m, "Q1", "Eileen Collins", "s1", "wikimel", "dev")
    assert Example.from_dict(json.loads(ex.to_json())) == ex


def test_unknown_field_is_an_error():
    with pytest.raises(InputError, match="unknown field"):
        Entity.from_dict({"id": "Q1", "name": "x", "popularity": 3})


@given(st.text(min_size=1, max_size=40), st.integers(0, 39), st.integers(1, 40))
def test_located_span_matches_mention_case_insensitively(caption, i, length):
    mention = caption[i:i + length]
    if not mention.strip():
        return
    span = locate_mention(caption, mention)
    assert span is not None
    assert caption[span[0]:span[1]].lower() == mention.strip().lower() or caption[span[0]:span[1]] == mention.strip()


def test_malformed_records_are_input_errors_not_crashes():
    for call, pattern in [(lambda: Mention.from_dict({"caption": "abc"}), "not a valid Mention record"),
                          (lambda: Mention.from_json("{bad"), "not a JSON Mention"),
                          (lambda: Mention.from_dict(["x"]), "must be a JSON object"),
                          (lambda: Entity.from_dict({"id": "Q1"}), "not a valid Entity record"),
                          (lambda: LinkResult.from_dict({"linker": "x", "candidates": None}), "not a valid LinkResult"),
                          (lambda: Mention.from_text("Falcon lifts off", None), "the mention is empty"),
                          (lambda: Mention.from_text("Falcon lifts off", "   "), "the mention is empty"),
                          (lambda: Entity("", "x"), "non-empty id"),
                          (lambda: Entity("Q1", None), "the name must be text")]:
        with pytest.raises(InputError, match=pattern):
            call()


# -- the locating rules ---------------------------------------------------------------------------
from mel.types import locate_mention_rule  # noqa: E402


@pytest.mark.parametrize("caption,mention,found,rule", [
    ("Grace Hopper at Harvard", "Hopper", "Hopper", "exact"),
    ("Zoe\u0308 Kravitz on stage", "Zo\u00eb", "Zoe\u0308", "nfc"),  # NFD caption, NFC mention
    ("THE ROCKET FALCON", "falcon", "FALCON", "casefold"),
    ("Otto von Bismarck as Minister President", "Otto Bismarck", "Otto von Bismarck", "words"),
    ("Henk van Hoof (1970)", "Henk Hoof", "Henk van Hoof", "words"),
    ("James Hamilton, 1st Duke of Abercorn, c. 1870", "James Hamilton 1st Duke Abercorn",
     "James Hamilton, 1st Duke of Abercorn", "words"),
    ("Guillaume Dode de la Brunerie.", "Guillaume Dode Brunerie", "Guillaume Dode de la Brunerie", "words"),
    ("John J. Bell", "John Bell", "John J. Bell", "words"),
    ("Manuela Henkel  is a skier", "Henkel,", "Henkel", "words"),  # punctuation the caption lacks
])
def test_each_rule_locates_and_says_so(caption, mention, found, rule):
    (start, end), got = locate_mention_rule(caption, mention)
    assert (caption[start:end], got) == (found, rule)
    assert locate_mention(caption, mention, words_in_order=True) == (start, end)
    if rule == "words":  # not by default: a typed mention must be in the caption
        assert locate_mention(caption, mention) is None


@pytest.mark.parametrize("caption,mention", [
    ("Otto Max Bismarck", "Otto Bismarck"),          # a capitalised word is a name, not a particle
    ("Bush and Obama", "Bush Obama"),                # a conjunction joins two names
    ("Louis XIV in 1680", "Louis 1680"),             # a number is not skipped
    ("Otto von der zu Bismarck", "Otto Bismarck"),   # at most two particles between two words
    ("Sultana Delcheva - Gotse's mother", "Gotse Delcheva"),  # words out of order
    ("Ottoman Bismarckian", "Otto Bismarck"),        # whole words only
])
def test_words_rule_is_bounded(caption, mention):
    assert locate_mention_rule(caption, mention) is None
