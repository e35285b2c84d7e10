"""Text encoders and causal LMs: the real loading code on tiny random models saved locally
(same `from_pretrained` path as hub ids), and the packaged MiniLM / SmolLM2 for real behaviour."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mel.errors import CheckpointError, InputError, ModelUnavailableError

SENTENCES = [
    "the eiffel tower is an iron tower in paris",
    "what does the mention in the text refer to",
    "answer the question about the image",
    "barack obama was the president of the united states",
    "a recipe for sourdough bread with flour and water",
]
NO_HUB_ID = "definitely-not/a-real-model-xyz"


# ---------------------------------------------------------------------------------------------
# tiny local models, built without any download


def _word_tokenizer(specials: list[str], template: tuple[str, ...] = ()):
    """A WordLevel tokenizer trained on SENTENCES, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>"] + specials))
    if template:
        first, last = template
        single = " ".join(t for t in (first, "$A", last) if t)
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, tok.token_to_id(t)) for t in (first, last) if t])
    return tok, PreTrainedTokenizerFast


def _save_tiny_bert(path: Path, with_pooler: bool = True) -> Path:
    from transformers import BertConfig, BertModel

    raw, cls = _word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[MASK]"], template=("[CLS]", "[SEP]"))
    tok = cls(tokenizer_object=raw, unk_token="<unk>", pad_token="[PAD]", cls_token="[CLS]",
              sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg, add_pooling_layer=with_pooler).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_tiny_lm(path: Path, arch: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if arch == "opt":  # OPT: pad, bos = eos = </s> as in facebook/opt-*
        raw, cls = _word_tokenizer(["<pad>", "</s>"], template=("</s>", ""))
        tok = cls(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", bos_token="</s>", eos_token="</s>")
        cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                        ffn_dim=64, num_attention_heads=4, max_position_embeddings=128,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = OPTForCausalLM(cfg)
    elif arch == "gpt2":  # a tokenizer that declares no special tokens: EOS comes from the config
        raw, cls = _word_tokenizer(["<|endoftext|>"])
        tok = cls(tokenizer_object=raw, unk_token="<unk>")
        eos = raw.token_to_id("<|endoftext|>")
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                         bos_token_id=eos, eos_token_id=eos)
        model = GPT2LMHeadModel(cfg)
    else:  # Llama: no pad token at all, as in the Llama checkpoints -> loader must set pad = eos
        raw, cls = _word_tokenizer(["<s>", "</s>"], template=("<s>", ""))
        tok = cls(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


# ---------------------------------------------------------------------------------------------
# text encoders


@pytest.fixture(scope="module")
def minilm():
    from mel.backends.text import load_text_encoder

    return load_text_encoder("minilm")


def test_minilm_puts_eiffel_tower_near_iron_tower(minilm):
    emb = minilm.encode(["Eiffel Tower", "iron tower in Paris", "a recipe for sourdough bread"])
    assert emb.dtype == np.float32 and emb.shape == (3, 384) and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    print(f"\ncos(Eiffel Tower, iron tower in Paris)={near:.3f}  cos(.., sourdough)={far:.3f}")
    assert near > far + 0.2


def test_minilm_batching_keeps_order_and_matches_single(minilm):
    texts = ["Paris", "a much longer text about the history of the city of Paris and its towers", "", "Obama"]
    batched = minilm.encode(texts, batch_size=2)
    single = np.stack([minilm.encode([t])[0] for t in texts])
    assert (batched * single).sum(1).min() > 0.999
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(InputError):
        minilm.encode("not a list")


def test_minilm_float32_and_auto_agree():
    from mel.backends.text import load_text_encoder

    fp32 = load_text_encoder("minilm", precision="float32")
    auto = load_text_encoder("minilm")
    a, b = fp32.encode(SENTENCES), auto.encode(SENTENCES)
    assert (a * b).sum(1).min() > 0.999


# MiniLM's speed (entities/s) is measured by bench/bench_backends.py, not asserted here.


def test_every_library_text_encoder_is_a_text_encoder(minilm, tiny_bert):
    """One interface: name, dim, encode(texts, batch_size=, show_progress=) -> float32, L2-normalised."""
    from mel.backends.image import CLIPTextEncoder
    from mel.backends.text import TextEncoder, as_text_encoder, load_text_encoder

    encoders = [minilm] + [load_text_encoder(f"{kind}:{tiny_bert}", precision="float32")
                           for kind in ("st", "hf-mean", "hf-cls", "hf-cls-raw")]
    for enc in encoders:
        assert isinstance(enc, TextEncoder) and as_text_encoder(enc) is enc
        out = enc.encode(SENTENCES, batch_size=2, show_progress=True)
        assert out.dtype == np.float32 and out.shape == (len(SENTENCES), enc.dim) and enc.name
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    assert issubclass(CLIPTextEncoder, TextEncoder)  # the CLIP text tower (real ones: test_image_backends)


def test_as_text_encoder_adapts_an_encoder_without_show_progress():
    from mel.backends.text import TextEncoder, as_text_encoder

    class Plain:  # what a user or a test double may hand in: no show_progress, float64 rows
        name, dim = "plain", 3

        def __init__(self):
            self.calls = []

        def encode(self, texts, batch_size=64):
            self.calls.append((list(texts), batch_size))
            return [[1.0, 0.0, 0.0]] * len(texts)

    plain = Plain()
    enc = as_text_encoder(plain)
    assert isinstance(enc, TextEncoder) and enc.name == "plain" and enc.dim == 3
    out = enc.encode(["a", "b"], batch_size=7, show_progress=True)
    assert out.dtype == np.float32 and out.shape == (2, 3) and plain.calls == [(["a", "b"], 7)]
    with pytest.raises(InputError, match="encode"):
        as_text_encoder(object())


def test_tiny_bert_mean_cls_and_st(tiny_bert, tmp_path):
    from mel.backends.text import load_text_encoder

    mean = load_text_encoder("hf-mean:" + str(tiny_bert), precision="float32")
    cls = load_text_encoder("hf-cls:" + str(tiny_bert), precision="float32")
    raw = load_text_encoder("hf-cls-raw:" + str(tiny_bert), precision="float32")
    assert mean.dim == cls.dim == raw.dim == 32 and cls.pooling == "cls"
    m, c, r = mean.encode(SENTENCES), cls.encode(SENTENCES), raw.encode(SENTENCES)
    for e in (m, c, r):
        assert e.shape == (5, 32) and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(c, r)  # pooler output differs from the raw [CLS] state

    # a checkpoint without pooler weights: hf-cls falls back to the raw [CLS] state
    no_pool = _save_tiny_bert(tmp_path / "no-pooler", with_pooler=False)
    cls2 = load_text_encoder("hf-cls:" + str(no_pool), precision="float32")
    raw2 = load_text_encoder("hf-cls-raw:" + str(no_pool), precision="float32")
    assert cls2.pooling == "cls-raw"
    np.testing.assert_allclose(cls2.encode(SENTENCES), raw2.encode(SENTENCES), atol=1e-5)

    # sentence-transformers wraps a plain transformers dir with mean pooling: same vectors
    st = load_text_encoder("st:" + str(tiny_bert), precision="float32")
    assert st.dim == 32
    np.testing.assert_allclose(st.encode(SENTENCES), m, atol=1e-4)


def test_text_hub_unreachable_and_bad_specs(monkeypatch, tmp_path):
    from mel.backends.text import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("st:" + NO_HUB_ID, "hf-cls:" + NO_HUB_ID):
        with pytest.raises(ModelUnavailableError) as err:
            load_text_encoder(spec)
        assert "unreachable" in str(err.value) and "--preset offline" in str(err.value)
    with pytest.raises(CheckpointError):
        load_text_encoder("hf-mean:" + str(tmp_path / "missing" / "dir"))
    with pytest.raises(CheckpointError):  # an existing dir that holds no model
        load_text_encoder("hf-mean:" + str(tmp_path))
    for bad in ("nope", "hf-max:x", "st:", ""):
        with pytest.raises(InputError):
            load_text_encoder(bad)


# ---------------------------------------------------------------------------------------------
# causal LMs


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_tiny_lm_loads_frozen_and_generates_from_embeds(arch, tmp_path):
    from mel.backends.llm import CausalLM, load_causal_lm

    path = _save_tiny_lm(tmp_path / arch, arch)
    lm = load_causal_lm("hf:" + str(path))
    assert isinstance(lm, CausalLM) and lm.name == "hf:" + str(path)
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.model.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.hidden_size == lm.model.config.hidden_size
    tok = lm.tokenizer
    assert tok.eos_token is not None and tok.pad_token is not None
    if arch in ("llama", "gpt2"):
        assert tok.pad_token == tok.eos_token  # no pad in the checkpoint -> pad = eos
    if arch == "gpt2":
        assert tok.eos_token == "<|endoftext|>"  # named by the config only
    assert lm.model.generation_config.pad_token_id == tok.pad_token_id

    ids = tok(["the eiffel tower is"], return_tensors="pt")["input_ids"]
    emb = lm.embed_tokens(ids)
    assert emb.shape == (1, ids.shape[1], lm.hidden_size)
    torch.testing.assert_close(emb, lm.model.get_input_embeddings()(ids))

    # the inputs_embeds path is the input_ids path: same logits, same greedy continuation
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(inputs_embeds=emb, attention_mask=mask).logits,
                                   lm.model(input_ids=ids, attention_mask=mask).logits)
    gen_kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    from_ids = lm.model.generate(input_ids=ids, attention_mask=mask, **gen_kw)[:, ids.shape[1]:]
    from_embeds = lm.model.generate(inputs_embeds=emb, attention_mask=mask, **gen_kw)
    assert from_embeds.shape == (1, 6)  # only the new tokens come back
    assert torch.equal(from_ids, from_embeds)

    # GEMEL-style: 4 soft visual prefix tokens before the text, batch of 2 with left padding, beams
    prefix = torch.randn(2, 4, lm.hidden_size, dtype=lm.dtype)
    short = tok(["paris"], return_tensors="pt")["input_ids"]
    pad = torch.full((1, ids.shape[1] - short.shape[1]), tok.pad_token_id)
    text_ids = torch.cat([ids, torch.cat([pad, short], 1)])
    text_mask = torch.cat([mask, torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1)])
    embeds = torch.cat([prefix, lm.embed_tokens(text_ids)], 1)
    attn = torch.cat([torch.ones(2, 4, dtype=text_mask.dtype), text_mask], 1)
    out = lm.model.generate(inputs_embeds=embeds, attention_mask=attn, max_new_tokens=5, num_beams=2,
                            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 5


def test_llm_hub_unreachable_and_bad_specs(monkeypatch, tmp_path):
    from mel.backends.llm import load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:  # at once, without the network: test_backends_offline
        load_causal_lm("hf:" + NO_HUB_ID)
    assert "unreachable" in str(err.value) and "--preset offline" in str(err.value)
    with pytest.raises(CheckpointError):
        load_causal_lm("hf:" + str(tmp_path / "no" / "such-dir"))
    for bad in ("gpt", "hf:", ""):
        with pytest.raises(InputError):
            load_causal_lm(bad)
    with pytest.raises(InputError):
        load_causal_lm("hf:" + NO_HUB_ID, dtype="float8")


def test_smollm2_cache_is_written_atomically(monkeypatch, tmp_path):
    """Conversion logic with a fake converter: complete dirs are reused, incomplete ones replaced,
    a crash leaves neither a cache dir nor temp files."""
    from mel.backends import llm

    monkeypatch.setenv("MEL_CACHE", str(tmp_path))
    final = tmp_path / "models" / llm.SMOLLM2_CACHE_NAME
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"x")
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        marker = {"format": llm._CONVERSION_FORMAT, "gguf_size": gguf.stat().st_size}
        (target / llm._MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(llm, "_convert_smollm2", fake_convert)
    final.mkdir(parents=True)
    (final / "config.json").write_text("half-written")  # no marker: incomplete
    assert llm.ensure_converted_smollm2() == final and len(calls) == 1
    assert (final / llm._MARKER).is_file() and (final / "config.json").read_text() == "{}"
    assert llm.ensure_converted_smollm2() == final and len(calls) == 1  # reused, not redone

    (final / llm._MARKER).unlink()
    with pytest.raises(ModelUnavailableError):
        llm.ensure_converted_smollm2()  # second conversion crashes
    assert len(calls) == 2
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == []
    assert llm.ensure_converted_smollm2() == final and len(calls) == 3


@pytest.fixture(scope="module")
def smollm2():
    """The packaged SmolLM2: converted once per machine; a load afterwards reads the converted copy and
    never converts again (load times: bench/bench_backends.py)."""
    from mel.backends import llm

    path = llm.ensure_converted_smollm2()  # converts once (~30 s), cached afterwards
    marker = path / llm._MARKER
    written = marker.stat().st_mtime_ns

    def no_conversion(gguf, target):
        raise AssertionError("load_causal_lm('smollm2') converted the GGUF again instead of reading the copy")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm, "_convert_smollm2", no_conversion)
        lm = llm.load_causal_lm("smollm2")
        assert llm.load_causal_lm("smollm2") is not lm  # a second load: again from the converted copy
        assert llm.ensure_converted_smollm2() == path
    assert marker.stat().st_mtime_ns == written  # the converted copy was not rewritten
    return lm


def test_smollm2_generates_sensibly(smollm2):
    lm = smollm2
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.hidden_size == 576 and lm.tokenizer.eos_token and lm.tokenizer.pad_token
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = time.perf_counter()
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1]:]
    rate = len(new) / (time.perf_counter() - start)
    answer = lm.tokenizer.decode(new, skip_special_tokens=True)
    print(f"\nSmolLM2: {answer!r} ({rate:.1f} tokens/s greedy)")
    assert "Paris" in answer

    # the same through inputs_embeds (how GEMEL prompts the LLM)
    emb_out = lm.model.generate(inputs_embeds=lm.embed_tokens(ids), attention_mask=torch.ones_like(ids),
                                max_new_tokens=12, do_sample=False)
    assert lm.tokenizer.decode(emb_out[0], skip_special_tokens=True) == answer


def test_mel_threads_sets_torch_threads_for_the_whole_library(monkeypatch, capsys):
    import mel.backends.text as text
    from mel.cli import main
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MEL_THREADS", "1")
        monkeypatch.setattr(text, "_threads_done", False)
        torch.set_num_threads(2)
        assert text.configure_cpu_threads() == 1 == torch.get_num_threads()
        monkeypatch.setenv("MEL_THREADS", "two")
        monkeypatch.setattr(text, "_threads_done", False)
        with pytest.raises(InputError, match="MEL_THREADS must be a whole number of threads >= 1, got 'two'"):
            text.configure_cpu_threads()
        monkeypatch.delenv("MEL_THREADS")
        assert main(["--threads", "0", "models"]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
