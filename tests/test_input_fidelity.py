"""Input fidelity (issue #16): every pixel mode Pillow reads becomes the right 8-bit RGB (16-bit
images scaled, not clipped to white), captions and mentions match whatever their Unicode
normalisation and link the right span, and lone surrogates are refused where they come in,
with a message naming the field, through the Python API, the dataset readers and the CLI.
"""
from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image
from test_reliability import REPO, _png_chunk, assert_clear_error, build_bm25_kb, run_cli

from demo.spans import resolve_span, span_from_selection
from mel.datasets import load_dataset, read_kb_entities
from mel.datasets.common import ExampleBuilder
from mel.errors import DatasetFormatError, InputError
from mel.imageio import load_image
from mel.types import Entity, Example, LinkResult, Mention, locate_mention


@pytest.fixture(scope="module")
def bm25_kb(tmp_path_factory):
    return build_bm25_kb(tmp_path_factory)


# -- images ----------------------------------------------------------------------------------------
def png_grey16(rows: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG written by hand (not by Pillow): IHDR bit depth 16, colour type 0."""
    height, width = rows.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rows)  # filter 0, big-endian samples
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def test_a_16_bit_png_gradient_reads_as_the_right_8_bit_values():
    levels = np.arange(256)
    # row 0: exact 16-bit equivalents of 0..255; row 1: just under half a step above them (still rounds down)
    data = png_grey16(np.stack([levels * 257, np.minimum(levels * 257 + 128, 65535)]))
    assert data[24] == 16  # the IHDR bit depth: a real 16-bit file
    rgb = np.asarray(load_image(data))
    assert rgb.shape == (2, 256, 3) and rgb.dtype == np.uint8
    assert (rgb == rgb[..., :1]).all()  # grey stays grey
    assert rgb[0, :, 0].tolist() == levels.tolist(), rgb[0, :8, 0]  # 65535 -> 255, 32896 -> 128, not near white
    assert rgb[1, :, 0].tolist() == levels.tolist()
    assert rgb.mean() == pytest.approx(127.5, abs=0.5)


def _palette(im: Image.Image) -> Image.Image:
    im.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 12))
    return im


def _p_with_transparency() -> Image.Image:
    im = _palette(Image.new("P", (3, 2), 3))
    im.info["transparency"] = 3  # index 3 is transparent
    return im


# mode -> (tiny image, the RGB every pixel must become); each colour worked out by hand, +-1 for rounding
MODE_CASES = {
    "1": (lambda: Image.new("1", (3, 2), 1), (255, 255, 255)),
    "L": (lambda: Image.new("L", (3, 2), 100), (100, 100, 100)),
    "P": (lambda: _palette(Image.new("P", (3, 2), 3)), (10, 20, 30)),
    "P with transparency": (_p_with_transparency, (255, 255, 255)),  # composited on white
    "RGB": (lambda: Image.new("RGB", (3, 2), (1, 2, 3)), (1, 2, 3)),
    "RGBX": (lambda: Image.new("RGBX", (3, 2), (1, 2, 3, 4)), (1, 2, 3)),
    "RGBA": (lambda: Image.new("RGBA", (3, 2), (200, 100, 0, 128)), (227, 178, 127)),  # half over white
    "RGBA transparent": (lambda: Image.new("RGBA", (3, 2), (10, 20, 30, 0)), (255, 255, 255)),
    "RGBa": (lambda: Image.new("RGBa", (3, 2), (50, 50, 50, 128)), (177, 177, 177)),  # premultiplied
    "LA": (lambda: Image.new("LA", (3, 2), (100, 255)), (100, 100, 100)),
    "LA transparent": (lambda: Image.new("LA", (3, 2), (0, 0)), (255, 255, 255)),
    "La": (lambda: Image.new("La", (3, 2), (100, 128)), (227, 227, 227)),  # premultiplied: 199 at half alpha
    "PA": (lambda: _palette(Image.new("PA", (3, 2), (3, 255))), (10, 20, 30)),
    "PA transparent": (lambda: _palette(Image.new("PA", (3, 2), (3, 0))), (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (3, 2), (0, 255, 0, 0)), (255, 0, 255)),  # magenta ink
    "CMYK black": (lambda: Image.new("CMYK", (3, 2), (0, 0, 0, 255)), (0, 0, 0)),
    "YCbCr": (lambda: Image.new("YCbCr", (3, 2), (76, 85, 255)), (254, 0, 0)),  # JFIF: Y + 1.402 (Cr - 128)...
    "LAB": (lambda: Image.new("LAB", (3, 2), (128, 128, 128)), (119, 119, 119)),  # L* 50, a* = b* = 0: mid grey
    "HSV": (lambda: Image.new("HSV", (3, 2), (0, 255, 255)), (255, 0, 0)),
    "I;16": (lambda: Image.new("I;16", (3, 2), 32896), (128, 128, 128)),  # 32896 / 65535 * 255
    "I;16L": (lambda: Image.new("I;16L", (3, 2), 65535), (255, 255, 255)),
    "I;16B": (lambda: Image.new("I;16B", (3, 2), 32896), (128, 128, 128)),
    "I;16N": (lambda: Image.new("I;16N", (3, 2), 257), (1, 1, 1)),
    "I": (lambda: Image.new("I", (3, 2), 40000), (156, 156, 156)),  # over 255: 16-bit, 40000 / 257
    "I within 0..255": (lambda: Image.new("I", (3, 2), 200), (200, 200, 200)),
    "F": (lambda: Image.new("F", (3, 2), 0.5), (128, 128, 128)),  # 0..1 floats
    "F within 0..255": (lambda: Image.new("F", (3, 2), 200.0), (200, 200, 200)),
}


def test_the_mode_cases_cover_every_mode_pillow_has():
    assert set(Image.MODES) <= {name.split(" ")[0] for name in MODE_CASES}, set(Image.MODES)


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_each_pillow_mode_converts_to_the_expected_rgb_pixel(case):
    make, expected = MODE_CASES[case]
    im = make()
    out = load_image(im)
    assert out.mode == "RGB" and out.size == im.size
    pixels = np.asarray(out).reshape(-1, 3)
    assert (pixels == pixels[0]).all()
    assert np.abs(pixels[0].astype(int) - expected).max() <= 1, (case, tuple(pixels[0]), expected)


def test_a_16_bit_tiff_and_png_written_by_pillow_read_the_same():
    gradient = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256)
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.frombytes("I;16", (256, 1), gradient.astype("<u2").tobytes()).save(buf, format=fmt)
        assert np.asarray(load_image(buf.getvalue()))[0, :, 1].tolist() == list(range(256)), fmt


def test_exif_orientation_is_applied_once():
    im = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    rotated = load_image(buf.getvalue())
    assert rotated.size == (20, 40)
    assert load_image(rotated).size == (20, 40)  # loading the loaded image again does not turn it again


@pytest.mark.parametrize("make, pattern", [
    (lambda: Image.new("F", (3, 2), 300.0), r"floating-point image \(mode F\) with values from 300 to 300.*8-bit"),
    (lambda: Image.new("F", (3, 2), float("nan")), r"mode F\) with values that are not numbers.*try again"),
    (lambda: Image.new("I", (3, 2), -5), r"32-bit integer image \(mode I\) with values from -5.*try again"),
])
def test_images_without_a_faithful_rgb_version_are_refused_clearly(make, pattern):
    with pytest.raises(InputError, match=pattern):
        load_image(make(), name="the image scan.tif")


# -- Unicode normalisation -------------------------------------------------------------------------
NFC_CAPTION = "Actress Zo\u00eb Saldana at the premi\u00e8re, with Zoe Kravitz"
NFD_CAPTION = "Actress Zoe\u0308 Saldana at the premie\u0300re, with Zoe Kravitz"


@pytest.mark.parametrize("caption", [NFC_CAPTION, NFD_CAPTION], ids=["nfc-caption", "nfd-caption"])
@pytest.mark.parametrize("typed", ["Zo\u00eb Saldana", "Zoe\u0308 Saldana"], ids=["nfc-mention", "nfd-mention"])
def test_nfc_and_nfd_captions_and_mentions_match_on_the_right_span(caption, typed):
    m = Mention.from_text(caption, typed)
    assert m.caption == NFC_CAPTION  # stored in NFC
    assert (m.start, m.end, m.text) == (8, 19, "Zo\u00eb Saldana")
    # resolve_span (the app's Link button) answers in offsets of the caption as given
    s, e = resolve_span(caption, typed, None, None)
    assert Mention(caption, s, e).text == "Zo\u00eb Saldana"
    assert unicodedata.normalize("NFC", caption[s:e]) == "Zo\u00eb Saldana"


def test_a_plain_zoe_never_matches_inside_a_decomposed_zoe():
    # "Zoe" is in the NFD caption's code points at 8 (the "Zoe" of "Zoe" + U+0308): linking that would be wrong
    assert locate_mention(NFD_CAPTION, "Zoe") == (NFD_CAPTION.index("Zoe Kravitz"), NFD_CAPTION.index(" Kravitz"))
    assert Mention.from_text(NFD_CAPTION, "Zoe").text == Mention.from_text(NFC_CAPTION, "Zoe").text == "Zoe"
    assert Mention.from_text(NFD_CAPTION, "zoe").start == NFC_CAPTION.index("Zoe Kravitz")
    assert Mention.from_text(NFD_CAPTION, "premi\u00e8re").text == "premi\u00e8re"


def test_offsets_refer_to_the_caption_as_given_and_never_cut_a_character():
    start = NFD_CAPTION.index("Saldana")
    m = Mention(NFD_CAPTION, start, start + len("Saldana"))
    assert m.caption == NFC_CAPTION and m.text == "Saldana" and m.start == NFC_CAPTION.index("Saldana")
    whole = Mention(NFD_CAPTION, 8, 12)  # "Zoe" + U+0308, 4 code points: one name
    assert (whole.start, whole.end, whole.text) == (8, 11, "Zo\u00eb")
    with pytest.raises(InputError, match=r"span \[8, 11\) cuts the character .* in two.*select whole characters"):
        Mention(NFD_CAPTION, 8, 11)  # "Zoe" without its diaeresis has no NFC equivalent
    assert Mention.from_dict(m.to_dict()) == m  # round trip through JSON keeps the span
    # a browser selection that cuts the diaeresis off is widened to the whole letter, like half an emoji
    assert span_from_selection(NFD_CAPTION, 8, 11, "Zoe") == (8, 12)
    # offsets and a typed mention that differ only in normalisation agree; a cut span falls back to the text
    assert resolve_span(NFD_CAPTION, "Zo\u00eb", 8, 12) == (8, 12)
    kravitz = NFD_CAPTION.index("Zoe Kravitz")
    assert resolve_span(NFD_CAPTION, "Zoe", 8, 11) == (kravitz, kravitz + 3)


def test_entities_examples_and_datasets_are_nfc(tmp_path):
    assert Entity("Q1", "Zoe\u0308 Saldana", ["Zoe\u0308"]).name == "Zo\u00eb Saldana"
    assert Entity("Q1", "x", ["Zoe\u0308"]).aliases == ["Zo\u00eb"]
    out = ExampleBuilder("test", "dev", tmp_path)
    out.add_record("1", NFD_CAPTION, [("Zo\u00eb Saldana", "Q1", "Zoe\u0308 Saldana")], None)
    split = out.build()
    assert split.report.n_located_exact == 1 and split.report.n_unlocated == 0, split.report.summary()
    ex = split.examples[0]
    assert ex.mention.text == ex.gold_name == "Zo\u00eb Saldana" and ex.mention.caption == NFC_CAPTION
    # a jsonl file whose offsets count the decomposed caption's code points
    start = NFD_CAPTION.index("Zoe")
    line = {"mention": {"caption": NFD_CAPTION, "start": start, "end": start + 12}, "gold_id": "Q1"}
    (tmp_path / "dev.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    (ex,) = load_dataset("jsonl", tmp_path, "dev").examples
    assert ex.mention.text == "Zo\u00eb Saldana"


# -- lone surrogates -------------------------------------------------------------------------------
LINK_JSON = {"linker": "bm25", "mention": {"caption": "Falcon lifts off", "start": 0, "end": 6},
             "prediction": {"id": "Q1", "name": "Falcon 9"},
             "candidates": [{"entity": {"id": "Q1", "name": "Falcon 9"}, "score": 1.0}]}


def _link_json_with(path: tuple, value: str) -> str:
    data = json.loads(json.dumps(LINK_JSON))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data)  # ensure_ascii: a lone surrogate becomes the escape "\ud800", as a client sends it


SURROGATE_CASES = {
    "caption": (lambda: Mention("Falcon \ud800 lifts off", 0, 6), "caption"),
    "mention": (lambda: Mention.from_text("Falcon lifts off", "Falcon\ud800"), "mention"),
    "mention id": (lambda: Mention("Falcon lifts off", 0, 6, id="m\ud800"), "mention id"),
    "entity id": (lambda: Entity("Q\ud800", "Falcon 9"), "entity id"),
    "entity name": (lambda: Entity("Q1", "Falcon \ud800"), "entity 'Q1' name"),
    "entity alias": (lambda: Entity("Q1", "Falcon 9", ["F9", "\ud800"]), "entity 'Q1' alias 1"),
    "gold id": (lambda: Example(Mention("Falcon lifts off", 0, 6), "Q\ud800"), "gold entity id"),
    "linker": (lambda: LinkResult("bm25\ud800", Mention("Falcon lifts off", 0, 6), None), "linker name"),
    "JSON caption": (lambda: LinkResult.from_json(_link_json_with(("mention", "caption"), "Falcon \ud800")),
                     "caption"),
    "JSON prediction id": (lambda: LinkResult.from_json(_link_json_with(("prediction", "id"), "Q\ud800")),
                           "entity id"),
    "JSON candidate name": (lambda: LinkResult.from_json(
        _link_json_with(("candidates", 0, "entity", "name"), "\ud800")), "entity 'Q1' name"),
    "JSON details": (lambda: LinkResult.from_json(_link_json_with(("details",), {"text": "\ud800"})),
                     r"details\['text'\]"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_lone_surrogates_are_refused_naming_the_field(case):
    make, field = SURROGATE_CASES[case]
    with pytest.raises(InputError, match=rf"the {field} contains a lone surrogate \(U\+D800\) at position \d+, "
                                         r"which is not valid Unicode text: .*again"):
        make()


def test_lone_surrogates_in_dataset_files_name_the_file_and_record(tmp_path):
    (tmp_path / "kb.jsonl").write_text('{"id": "Q1", "name": "Falcon 9"}\n{"id": "Q2", "name": "Eileen \\ud800"}\n')
    with pytest.raises(DatasetFormatError, match=r"kb\.jsonl, record 'line 2': the entity 'Q2' name contains a "
                                                 r"lone surrogate \(U\+D800\)"):
        list(read_kb_entities("jsonl", tmp_path))
    good = {"mention": {"caption": "Falcon lifts off", "start": 0, "end": 6}, "gold_id": "Q1"}
    bad = dict(good, gold_id="Q\ud800")
    (tmp_path / "dev.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    split = load_dataset("jsonl", tmp_path, "dev")
    assert len(split.examples) == 1 and split.report.n_invalid == 1
    assert "gold entity id contains a lone surrogate (U+D800)" in split.report.invalid[0][1]
    out = ExampleBuilder("test", "dev", tmp_path)  # the MELBench-style readers' path
    out.add_record("7", "Falcon lifts off", [("Falcon", "Q\ud800", "")], None)
    assert out.build().report.invalid == [("7#0", out.report.invalid[0][1])]
    assert "gold entity id contains a lone surrogate" in out.report.invalid[0][1]


def test_lone_surrogates_through_the_cli(bm25_kb, capsys):
    for caption in ("Falcon \ud800 lifts off.", "Falcon lifts off \udced\udca0\udc80"):  # as Python / as bash gives it
        code, _, err = run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption", caption,
                               "--mention", "Falcon")
        assert_clear_error(code, err, r"^error: the caption contains a lone surrogate \(U\+D800\) at position \d+, "
                                      r"which is not valid Unicode text: half of an emoji.*again")
    code, _, err = run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption", "Falcon lifts off.",
                           "--mention", "Falcon\ud800")
    assert_clear_error(code, err, r"the mention contains a lone surrogate \(U\+D800\)")


@pytest.mark.parametrize("arg, pattern", [
    (b"Falcon lifts off \xed\xa0\x80", r"the caption contains a lone surrogate \(U\+D800\) at position 17, "
                                       r"which is not valid Unicode text"),  # bash: --caption $'... \ud800'
    (b"Falcon lifts off Zo\xeb", r"the caption contains a lone surrogate \(U\+DCEB\) at position 19, which is not "
                                 r"valid Unicode text: it stands for the byte 0xEB, which is not UTF-8"),  # Latin-1
])
def test_the_cli_process_refuses_a_lone_surrogate_in_one_line(bm25_kb, arg, pattern):
    argv = [sys.executable.encode(), b"-m", b"mel", b"link", b"--kb", os.fsencode(bm25_kb), b"--linker", b"bm25",
            b"--caption", arg, b"--mention", b"Falcon"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    stderr = proc.stderr.decode("utf-8")
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def test_pil_images_given_to_the_encoders_and_the_cue_get_the_same_conversion():
    """A 16-bit or RGBA PIL image handed straight to an image encoder or the cue is converted by
    load_image too (Pillow's own convert("RGB") clips 16-bit to white and drops alpha on black)."""
    from mel.backends.cue import _CachedCueProvider
    from mel.backends.image import _as_pil_list
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    converted = _as_pil_list([grey16, transparent])
    assert converted[0].getpixel((0, 0)) == (128, 128, 128)
    assert converted[1].getpixel((0, 0)) == (255, 255, 255)
    seen = []

    class Recording(_CachedCueProvider):
        name, uses_question = "recording", False

        def _compute(self, image, question):
            seen.append(image.getpixel((0, 0)))
            return None

    Recording(use_disk_cache=False).cue(grey16)
    assert seen == [(128, 128, 128)]


def test_the_cli_takes_a_decomposed_mention_with_its_offsets(bm25_kb, capsys):
    caption = "Zoe\u0308 Saldana at the premiere"  # decomposed, as some keyboards and files give it
    code, out, err = run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption", caption,
                             "--start", "0", "--end", "12", "--mention", "Zoe\u0308 Saldana", "--json")
    assert code == 0, err
    assert json.loads(out)["mention"]["caption"].startswith("Zo\u00eb Saldana")


def test_kb_queries_are_nfc_like_the_kb():
    from mel.kb import fts_query
    assert fts_query("Beyonce\u0301s tour") == fts_query("Beyonc\u00e9s tour") == '"Beyonc\u00e9s" OR "tour"'
