"""GEMEL's image feature option (encoder | conse) and the `cue` prompt (beyond the paper).

Tiny random LMs and stand-in encoders from test_gemel; the ConSE encoder and the cue provider are
stubs here (their real models are tested in test_image_backends / test_visual_signal).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_gemel import ENTITIES, PixelEncoder, StubPreset, _examples, _save_tiny_lm, images  # noqa: F401

from mel.backends.cue import Cue
from mel.errors import CheckpointError, InputError
from mel.gemel import features
from mel.gemel.linker import GemelConfig, GemelLinker
from mel.gemel.mapper import FeatureMapper, MapperConfig
from mel.gemel.prompt import PromptBuilder, Segment, encode_answer, render_prompt
from mel.gemel.train import GemelTrainConfig, MapperTrainer
from mel.kb import build_kb
from mel.types import Mention


class StubConSE:
    """Stands in for mel.backends.conse.ConSEImageEncoder: a 64-d vector per image (not 12-d like PixelEncoder)."""

    name = "conse:test-hashing"
    dim = 64

    def encode(self, pictures, batch_size=16):
        out = []
        for im in pictures:
            a = np.resize(np.asarray(im.convert("RGB").resize((4, 4)), np.float32).reshape(-1), self.dim) + 1.0
            out.append(a / np.linalg.norm(a))
        return np.stack(out).astype(np.float32)


class StubCues:
    """Stands in for the offline `faces` cue: names the image's dominant colour."""

    name = "test-cues"

    def cue(self, image, question=None):
        r, g, b = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
        colour = max((r, "red"), (g, "green"), (b, "blue"))[1]
        return Cue(text=f"something {colour}", provider=self.name)


@dataclasses.dataclass(frozen=True)
class CuePreset(StubPreset):
    def backend(self, role):
        if role == "cue":
            return StubCues()
        return super().backend(role)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    spec = _save_tiny_lm("llama", tmp_path_factory.mktemp("tiny-llama-feature"))
    preset = CuePreset("test", image_encoder="test-pixels", text_encoder="test-hashing",
                       mention_encoder="test-hashing", llm=spec, cue="test-cues")
    return preset, preset.backend("llm")


@pytest.fixture
def kb(tmp_path, hashing_encoder):
    return build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)


@pytest.fixture
def stub_conse(monkeypatch):
    monkeypatch.setattr(features, "load_conse", lambda preset: StubConSE())


# -- the prompt ------------------------------------------------------------------------------------
def test_cue_prompt_renders_as_documented():
    img = np.ones(4, np.float32)
    segments = [Segment("Collins on stage with Genesis", "Collins", "Phil Collins", img, "a photo of one person"),
                Segment("Hopper at the console", "Hopper", "Grace Hopper", None),
                Segment("Java first thing in the morning", "Java", None, img, "espresso,\ncoffee mug")]
    expected_cue = ("<image><image>[Image]a photo of one person\n[Text]Collins on stage with Genesis\n"
                    "[Question]What does Collins mentioned in the text refer to?\n[Answer]Phil Collins\n"
                    "[Text]Hopper at the console\n"
                    "[Question]What does Hopper mentioned in the text refer to?\n[Answer]Grace Hopper\n"
                    "<image><image>[Image]espresso, coffee mug\n[Text]Java first thing in the morning\n"
                    "[Question]What does Java mentioned in the text refer to?\n[Answer]")
    assert render_prompt(segments, n_image_tokens=2, style="cue") == expected_cue
    # the paper's prompt (the default) never shows a cue: one switch away
    paper = render_prompt(segments, n_image_tokens=2)
    assert paper == render_prompt(segments, n_image_tokens=2, style="paper")
    assert "[Image]" not in paper and paper == expected_cue.replace("[Image]a photo of one person\n", "").replace(
        "[Image]espresso, coffee mug\n", "")
    with pytest.raises(InputError, match="prompt must be one of"):
        render_prompt(segments, n_image_tokens=2, style="blip")


def test_cue_prompt_tokens_match_the_rendered_text(tiny_llama):
    _, llm = tiny_llama
    segs = [Segment("Collins on stage", "Collins", "Phil Collins", None, "something red"),
            Segment("Obama speaks", "Obama", None, None, "something blue")]
    def holds(ids, piece):
        return any(ids[i:i + len(piece)] == piece for i in range(len(ids) - len(piece) + 1))

    body = encode_answer(llm.tokenizer, "[Image]something red\n[Text]Collins on stage")
    for style in ("paper", "cue"):
        prompt = PromptBuilder(llm.tokenizer, n_image_tokens=2, style=style).build(segs)
        assert ("[Image]" in prompt.text) == (style == "cue") == holds(prompt.input_ids, body)
    no_cue = PromptBuilder(llm.tokenizer, n_image_tokens=2, style="cue").build(segs, use_cues=False)
    assert "[Image]" not in no_cue.text


# -- the checkpoint --------------------------------------------------------------------------------
def test_image_feature_and_prompt_round_trip_through_the_checkpoint(tmp_path):
    mapper = FeatureMapper(MapperConfig(d_vision=64, d_embed=8, n_tokens=2, image_encoder="conse:test-hashing",
                                        image_feature="conse", prompt="cue"))
    path = mapper.save_pretrained(tmp_path / "m")
    saved = json.loads((path / "config.json").read_text())["config"]
    assert saved["image_feature"] == "conse" and saved["prompt"] == "cue"
    loaded, _ = FeatureMapper.from_pretrained(path, d_vision=64, d_embed=8)
    assert loaded.config == mapper.config
    with pytest.raises(CheckpointError, match="image_feature must be one of"):
        MapperConfig(d_vision=64, d_embed=8, image_feature="clip")
    with pytest.raises(CheckpointError, match="prompt must be one of"):
        MapperConfig(d_vision=64, d_embed=8, prompt="fancy")


def test_an_old_checkpoint_without_the_fields_loads_as_before(tmp_path, tiny_llama, kb, images):  # noqa: F811
    preset, llm = tiny_llama
    mapper = FeatureMapper(MapperConfig(d_vision=PixelEncoder.dim, d_embed=llm.hidden_size, n_tokens=2,
                                        image_encoder="test-pixels", llm=llm.name))
    path = mapper.save_pretrained(tmp_path / "old")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["config"]["image_feature"], cfg["config"]["prompt"]  # as written before the option existed
    (path / "config.json").write_text(json.dumps(cfg))
    loaded, _ = FeatureMapper.from_pretrained(path)
    assert loaded.config.image_feature == "encoder" and loaded.config.prompt == "paper"
    linker = GemelLinker(kb, preset, mapper=str(path), pool=_examples(images), n_demos=2, show_prompt=True)
    assert linker.image_feature == "encoder" and linker.prompt_style == "paper" and linker.cues is None
    assert linker.images is not None and linker.images.encoder.dim == PixelEncoder.dim
    r = linker.link(Mention.from_text("Collins flew the shuttle", "Collins", image=images["blue"]))
    assert r.details.visual_tokens and "[Image]" not in r.details.prompt
    assert "image encoder's features" in r.details.visual_note
    # a feature the mapper was not trained on is refused, with the reason
    with pytest.raises(CheckpointError, match="trained on image_feature=encoder"):
        GemelLinker(kb, preset, mapper=str(path), image_feature="conse")
    # the shipped mapper's config loads too (whatever it was trained on)
    from mel.gemel.linker import SHIPPED_MAPPERS
    shipped = SHIPPED_MAPPERS["offline"]
    if (shipped / "config.json").exists():
        m, _ = FeatureMapper.from_pretrained(shipped)
        assert m.config.image_feature in features.IMAGE_FEATURES


def test_conse_mapper_trains_saves_and_links_with_the_cue_prompt(tmp_path, tiny_llama, kb, images, stub_conse):  # noqa: F811
    preset, llm = tiny_llama
    out = tmp_path / "conse-mapper"
    config = GemelTrainConfig(n_demos=2, n_image_tokens=2, grad_accum=2, epochs=1, image_feature="conse", prompt="cue",
                              retrieval="multimodal")
    trainer = MapperTrainer(_examples(images), kb, preset, out, config, progress=False)
    assert trainer.mapper.config.d_vision == StubConSE.dim and trainer.mapper.config.image_encoder == "conse:test-hashing"
    query = trainer.items[0].segments[-1]
    assert query.cue and query.cue.startswith("something ")
    assert "[Image]something" in trainer.builder.build(trainer.items[0].segments).text
    trainer.run()
    fit = trainer.fit_report()
    assert "mean_loss_cue_without_visual_tokens" in fit
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["image_feature"] == "conse" and saved["config"]["prompt"] == "cue"
    assert saved["training"]["recipe"]["image_feature"] == "conse"

    # the linker follows the checkpoint: ConSE features, the cue prompt, multimodal retrieval by ConSE
    linker = GemelLinker(kb, preset, mapper=str(out), pool=_examples(images), n_demos=2, show_prompt=True,
                         retrieval="multimodal")
    assert linker.image_feature == "conse" and linker.prompt_style == "cue"
    assert isinstance(linker.pool.image_encoder, StubConSE)
    r = linker.link(Mention.from_text("Collins flew the shuttle", "Collins", image=images["blue"]))
    assert "[Image]something blue\n[Text]Collins flew the shuttle" in r.details.prompt
    assert "ConSE" in r.details.visual_note and "beyond the paper" in r.details.visual_note
    assert r.details.visual_tokens and r.prediction is not None
    assert linker.models().get("image_feature") == "conse:test-hashing"
    # the paper's prompt is one switch away; use_images=False drops the cue as well as the visual tokens
    paper = GemelLinker(kb, preset, mapper=str(out), pool=_examples(images), n_demos=2, show_prompt=True, prompt="paper")
    r = paper.link(Mention.from_text("Collins flew the shuttle", "Collins", image=images["blue"]))
    assert "[Image]" not in r.details.prompt and r.details.visual_tokens
    blind = GemelLinker(kb, preset, mapper=str(out), pool=_examples(images), n_demos=2, show_prompt=True,
                        use_images=False)
    r = blind.link(Mention.from_text("Collins flew the shuttle", "Collins", image=images["blue"]))
    assert "[Image]" not in r.details.prompt and "<image>" not in r.details.prompt
    # a 12-d encoder cannot feed a mapper trained on 64-d ConSE vectors
    with pytest.raises(CheckpointError):
        GemelLinker(kb, preset, mapper=str(out), image_feature="encoder")


def test_image_feature_option_is_checked():
    assert GemelConfig.from_options(image_feature="conse", prompt="cue").prompt == "cue"
    with pytest.raises(InputError, match="image_feature must be one of"):
        GemelConfig(image_feature="clip")
    with pytest.raises(InputError, match="prompt must be one of"):
        GemelConfig(prompt="blip")
    with pytest.raises(InputError, match="image_feature must be one of"):
        features.image_feature_encoder(None, "pixels")


def test_conse_feature_is_the_text_aligned_vector(monkeypatch):
    """image_feature_encoder('conse') gives the ConSE encoder over the preset's text encoder, and names it."""
    calls = []

    class Preset:
        device = "cpu"
        image_encoder = "pixels"

        def backend(self, role):
            calls.append(role)
            return PixelEncoder() if role == "image_encoder" else "TEXT"

    monkeypatch.setattr(features, "_conse_over", lambda text, device: (text, device, StubConSE())[2])
    enc, spec = features.image_feature_encoder(Preset(), "conse")
    assert isinstance(enc, StubConSE) and spec == "conse:test-hashing" and calls == ["text_encoder"]
    enc, spec = features.image_feature_encoder(Preset(), "encoder")
    assert isinstance(enc, PixelEncoder) and spec == "pixels"
