"""`python -m mel bench`: the runs write JSON + Markdown + PNG with provenance, on real data (small)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mel.bench import PeakRSS, parse_linker, search_engines, sha256_paths, synthetic_vectors
from mel.cli import main
from mel.errors import InputError
from mel.evaluate import rank_metrics
from mel.index import DenseIndex


def test_parse_linker_and_rank_metrics():
    assert parse_linker("gemel:n_demos=16,constrained=false") == ("gemel", {"n_demos": 16, "constrained": False})
    assert parse_linker("bm25") == ("bm25", {})
    m = rank_metrics([1, 3, None, 25])
    assert m["hits@1"] == 0.25 and m["hits@5"] == 0.5 and m["hits@20"] == 0.5
    assert m["mrr"] == pytest.approx(round((1 + 1 / 3 + 1 / 25) / 4, 4))


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as rss:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block.sum()
    assert rss.peak_mb >= PeakRSS.current() / 2**20 - 1 and rss.peak_mb > 64


def test_checksums_change_with_content(tmp_path):
    (tmp_path / "a.json").write_text("[1]")
    first = sha256_paths([tmp_path])
    (tmp_path / "a.json").write_text("[2]")
    assert sha256_paths([tmp_path])["sha256"] != first["sha256"] and first["files"] == 1


def test_search_engines_report_recall_and_memory():
    vectors = synthetic_vectors(3000, 32)
    engines = ["numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw"]
    rows = search_engines(vectors, vectors[:5] + 0.01, engines)
    assert [r["engine"] for r in rows] == engines
    assert rows[0]["recall@20_vs_exact"] == 1.0 and rows[1]["recall@20_vs_exact"] == 1.0
    assert rows[0]["index_bytes_per_entity"] == 32 * 4 + 8  # float32 vectors + int64 ids
    # FAISS holds the only copy of the vectors (flat: a small header; IVF: list ids + direct map)
    assert rows[1]["index_bytes_per_entity"] < 1.05 * rows[0]["index_bytes_per_entity"]
    assert rows[2]["index_bytes_per_entity"] < 1.3 * rows[0]["index_bytes_per_entity"]
    assert rows[3]["index_bytes_per_entity"] > rows[0]["index_bytes_per_entity"]  # HNSW adds its graph


@pytest.mark.parametrize("engine", ["faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_faiss_engines_give_back_the_vectors_and_save_like_numpy(tmp_path, engine):
    vectors = synthetic_vectors(500, 16)
    index = DenseIndex(vectors, np.arange(500) + 7, engine=engine)
    assert np.allclose(index.vectors, vectors) and len(index) == 500 and index.dim == 16
    index.save(tmp_path / "v.safetensors", {"engine": engine})
    back, meta = DenseIndex.load(tmp_path / "v.safetensors", engine="numpy")
    assert meta == {"engine": engine} and np.allclose(back.vectors, vectors)
    assert back.search(vectors[:3], k=1)[1][:, 0].tolist() == [7, 8, 9]


def test_scale_run_writes_json_markdown_and_plot(tmp_path, capsys):
    assert main(["bench", "scale", "--sizes", "300,1200", "--engines", "numpy,faiss-flat", "--dim", "16",
                 "--queries", "5", "--encoder-names", "0", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_scale.json").read_text())
    assert [r["entities"] for r in res["rows"]] == [300, 1200]
    assert all(r["kb_build_s"] > 0 and r["bm25_ms_p50"] > 0 for r in res["rows"])
    assert res["command"].startswith("python -m mel bench") and res["seed"] == 0
    md = (tmp_path / "bench_scale.md").read_text()
    assert "| 1,200 |" in md and "faiss-flat" in md
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_run_on_real_data_compares_linkers_on_the_same_mentions(tmp_path, shared_data):
    from mel.kb import build_dataset_kb
    SHARED = shared_data
    kb_dir = tmp_path / "kbs"
    build_dataset_kb("wikidiverse", SHARED / "wikidiverse", kb_dir / "wikidiverse.sqlite", preset=None, progress=False)
    out = tmp_path / "results"
    assert main(["bench", "quality", "--datasets", "wikidiverse", "--linkers", "exact,bm25", "--limit", "40",
                 "--generative-limit", "10", "--data-root", str(SHARED), "--kb-dir", str(kb_dir),
                 "--out", str(out)]) == 0
    res = json.loads((out / "bench_quality.json").read_text())
    d = res["datasets"]["wikidiverse"]
    assert d["kb_size"] > 1000 and len(d["kb_checksum"]["sha256"]) == 64 and d["data_checksum"]["files"] >= 2
    rows = {r["linker"]: r for r in res["rows"]}
    assert rows["exact"]["n"] == rows["bm25"]["n"] == 40
    assert 0 < rows["exact"]["hits@1"] <= rows["exact"]["hits@20"] <= 1
    assert rows["bm25"]["hits@20"] > rows["exact"]["hits@20"]  # BM25 ranks many candidates, exact only names
    assert all(r["n"] == 10 for r in res["subset_rows"])
    assert rows["bm25"]["peak_rss_mb"] > 0 and rows["bm25"]["latency_ms_p50"] > 0
    md = (out / "bench_quality.md").read_text()
    assert "| wikidiverse | bm25 | 40 |" in md
    for png in ("quality.png", "latency_stages.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the report command re-renders from the JSON alone
    (out / "bench_quality.md").unlink()
    assert main(["bench", "report", "--out", str(out)]) == 0
    assert (out / "bench_quality.md").read_text() == md


def test_report_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "report", "--out", str(tmp_path)]) == 2
    assert "run `python -m mel bench" in capsys.readouterr().err


def test_reported_paths_are_relative_to_the_repository(tmp_path):
    from mel.paths import REPO_ROOT, display_path
    assert display_path(REPO_ROOT / "models" / "dim-offline") == "models/dim-offline"
    assert display_path(tmp_path / "head") == str(tmp_path / "head")  # outside the repository: as given


def test_an_approximate_engine_that_finds_fewer_rows_pads_with_minus_one():
    vectors = synthetic_vectors(3000, 16)
    index = DenseIndex(vectors, np.arange(3000) + 100, engine="faiss-ivf", nprobe=1)  # one list of ~55 rows
    scores, ids = index.search(vectors[:4], k=200)
    missing = ids < 0
    assert missing.any() and (ids == -1)[missing].all() and np.isneginf(scores[missing]).all()
    assert (ids[~missing] >= 100).all() and np.isfinite(scores[~missing]).all()
    assert ids[:, 0].tolist() == [100, 101, 102, 103]  # each row finds itself first


@pytest.mark.slow
def test_photo_ablations_ask_each_question_on_every_photo_of_a_set(tmp_path, shared_data):
    """The demo set (the bundled photos) with DIM's variants: same n in every row, the rows that turn the
    photo off really see no image, and the Markdown lists them; an unknown set is a clear error."""
    import argparse

    from mel.bench.report import markdown_ablations
    from mel.bench.runs import photo_ablations
    from mel.errors import InputError
    from mel.presets import get_preset
    args = argparse.Namespace(photos="demo", no_photo_gemel=True, data_root=str(shared_data), kb_dir=str(tmp_path),
                              progress=False)
    res = photo_ablations(args, get_preset("offline"))
    (demo,) = res["sets"]
    rows = {r["linker"]: r for r in demo["rows"]}
    assert demo["n"] == 4 and all(r["n"] == 4 for r in demo["rows"])  # every bundled example with a KB gold
    assert rows["dim"]["n_with_image"] == 4 and rows["dim"]["gold_rank_changed"] == 0
    assert {"dim:use_image=false", "dim:use_cue=false", "dim:use_image=false,use_cue=false"} <= set(rows)
    md = markdown_ablations({"dataset": "wikimel", "preset": "offline", "command": "x", "seed": 0, "kb": "k",
                             "kb_size": 1, "n_dev_examples": 0, "n_with_image": 0, "generative_subset": 0,
                             "n_with_image_in_subset": 0, "rows": [], "photos": res})
    assert "## Photos: demo (n = 4" in md and "DIM, text only" in md
    with pytest.raises(InputError, match="unknown photo set"):
        photo_ablations(argparse.Namespace(**{**vars(args), "photos": "flickr"}), get_preset("offline"))


def test_error_breakdown_groups_errors_by_mention_words_and_caption_context(tmp_path):
    from bench.error_breakdown import breakdown, context_words, read_predictions
    from mel.types import Example, Mention

    assert context_words("Jones in 1972", "Jones") == []
    assert context_words("Jones at the Cannes premiere", "Jones") == ["Cannes", "premiere"]

    def ex(sid, caption, text):
        start = caption.index(text)
        return Example(Mention(caption, start, start + len(text)), "Q1", sample_id=sid)

    class Split:
        examples = [ex("a", "Jones in 1972", "Jones"), ex("b", "Jones at the Cannes premiere", "Jones"),
                    ex("c", "Tom Jones at the Cannes premiere", "Tom Jones"), ex("d", "Smith in 2001", "Smith")]

    lines = [{"sample_id": "a", "rank": 2}, {"sample_id": "b", "rank": 1}, {"sample_id": "c", "rank": 1},
             {"sample_id": "d", "rank": None}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in lines) + "\n", encoding="utf-8")
    report = breakdown(Split, read_predictions(path))
    assert (report["n"], report["errors"], report["hits@1"]) == (4, 2, 0.5)
    bare = report["groups"]["one-word mention, bare caption"]
    assert (bare["n"], bare["errors"], bare["share_of_errors"], bare["hits@1_if_all_fixed"]) == (2, 2, 1.0, 1.0)
    assert report["groups"]["multi-word mention, with context caption"]["hits@1"] == 1.0

    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(InputError, match="p.jsonl:1"):
        read_predictions(path)


def test_gemel_image_runs_are_added_to_their_json_whole_or_not_at_all(tmp_path, monkeypatch):
    """bench_gemel_images rewrote the JSON that accumulates every run in place: a process killed while
    writing lost the earlier runs too. The file is now published by a rename (mel.paths.atomic_write)."""
    import mel.paths
    from bench.bench_gemel_images import store_run
    path = tmp_path / "runs.json"
    store_run(path, "about", "first", {"n": 1})
    before = path.read_bytes()

    def killed_before_the_rename(tmp, dest):
        raise OSError("simulated: killed while writing")

    monkeypatch.setattr(mel.paths, "publish", killed_before_the_rename)
    with pytest.raises(OSError, match="simulated"):
        store_run(path, "about", "second", {"n": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["runs.json"]
    monkeypatch.undo()
    store_run(path, "about", "second", {"n": 2})
    assert json.loads(path.read_text())["runs"] == {"first": {"n": 1}, "second": {"n": 2}}


def test_calibration_noise_tells_a_sample_size_effect_from_miscalibration():
    from bench.calibration_noise import noise
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.3, 0.9, 300)
    calibrated = noise(conf, rng.random(300) < conf, draws=300, seed=0)
    overconfident = noise(conf, rng.random(300) < conf - 0.25, draws=300, seed=0)
    assert calibrated["ece"] < calibrated["perfectly_calibrated_p95"]        # within what n = 300 shows
    assert overconfident["ece"] > overconfident["perfectly_calibrated_p95"]  # beyond it
    low, high = overconfident["bootstrap_95"]
    assert low <= overconfident["ece"] <= high
