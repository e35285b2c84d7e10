"""Batch linking on Ray Data (mel.batch), and the pieces for 10M-entity KBs (IVF-PQ, streaming build).

One module-scoped local cluster (a head and one `ray start --address` worker, 1 CPU each) serves
every Ray test: `ray start` is slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mel.errors import ModelUnavailableError

REPO = Path(__file__).resolve().parents[1]
# Ray reads its token when it is imported: the token of this module's cluster is set before that
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())
pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "ray[data]"')
pq = pytest.importorskip("pyarrow.parquet")

CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo"]
PEOPLE = ["Bianca Ryan", "Tom Hanks", "Barack Obama", "Angela Merkel", "Marie Curie", "Isaac Newton",
          "Albert Einstein", "Ada Lovelace", "Alan Turing", "Grace Hopper"]
NAMES = CITIES + PEOPLE


def _entities():
    out = []
    for i, name in enumerate(NAMES):
        kind = "capital city in Europe" if name in CITIES else "person known for their work"
        out.append({"id": f"Q{i}", "name": name, "description": f"{name}, a {kind}", "aliases": [name.split()[-1]]})
    out.append({"id": "Q100", "name": "Paris Hilton", "description": "American media personality"})
    out.append({"id": "Q101", "name": "Newton", "description": "unit of force"})
    return out


def _examples(n):
    rows = []
    for r in range(n):
        name = NAMES[r % len(NAMES)]
        mention = name.split()[-1] if r % 3 == 0 else name
        caption = f"Picture {r}: {name} seen at the festival." if r % 2 else f"{name} in {r}."
        start = caption.index(mention)
        rows.append({"mention": {"caption": caption, "start": start, "end": start + len(mention), "id": f"m{r}"},
                     "gold_id": f"Q{r % len(NAMES)}" if r % 17 else "NIL", "sample_id": f"s{r}"})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env():
    """Environment of the CLI runs and of this process (the Ray token, one thread a process)."""
    extra = {"MEL_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    yield dict(os.environ)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(env):
    from mel.batch.cluster import LocalCluster
    with LocalCluster(nodes=2, cpus_per_node=1) as c:
        yield c
    import ray
    connected = ray.is_initialized()
    ray.shutdown()  # in any case: a driver left on a dead cluster ends pytest 60 s later with exit 1
    assert not connected, "LocalCluster did not disconnect this driver before its nodes went"


@pytest.fixture(scope="module")
def data(tmp_path_factory, env):
    """A jsonl dataset (kb.jsonl, dev.jsonl) and its KB with a dense index (the offline preset's MiniLM)."""
    from mel.kb import build_dataset_kb
    from mel.presets import get_preset
    root = tmp_path_factory.mktemp("batch")
    ds = root / "ds"
    ds.mkdir()
    _write_jsonl(ds / "kb.jsonl", _entities())
    _write_jsonl(ds / "dev.jsonl", _examples(60))
    kb = build_dataset_kb("jsonl", ds, root / "kb.sqlite", preset=get_preset("offline"), images=False, progress=False)
    return {"root": root, "ds": ds, "kb": kb.path, "preset": get_preset("offline")}


def _cli(env, *args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "mel", "batch", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _read_parts(out: Path):
    files = sorted((out / "parts").glob("part-*.parquet"))
    return pq.read_table(files).sort_by("row") if files else None


# -- Ray Data -------------------------------------------------------------------------------------
def test_two_workers_give_the_single_process_predictions(data, cluster, env, tmp_path):
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    from mel.types import Mention
    mentions = [{"caption": ex["mention"]["caption"], "start": ex["mention"]["start"], "end": ex["mention"]["end"],
                 "id": ex["mention"]["id"]} for ex in _examples(60)]
    src = _write_jsonl(tmp_path / "mentions.jsonl", mentions)
    out = tmp_path / "out"
    proc = _cli(env, "link", "--kb", data["kb"], "--linker", "dense", "--input", src, "--output", out,
                "--preset", "offline", "--address", cluster.address, "--num-workers", "2", "--part-size", "10",
                "--quiet")
    assert "Ray: 2 node(s)" in proc.stderr and "2 link worker(s)" in proc.stderr, proc.stderr
    table = _read_parts(out)
    assert table.num_rows == 60 and table["row"].to_pylist() == list(range(60))
    linker = build_linker("dense", KnowledgeBase(data["kb"]), data["preset"])
    expected = list(linker.pipe([Mention(m["caption"], m["start"], m["end"], id=m["id"]) for m in mentions], k=20))
    assert table["prediction"].to_pylist() == [r.prediction.id for r in expected]
    assert table["candidate_ids"].to_pylist() == [[c.entity.id for c in r.candidates] for r in expected]
    assert np.allclose(table["score"].to_numpy(), [r.score for r in expected], atol=1e-5)
    assert table["mention_id"].to_pylist() == [m["id"] for m in mentions]
    assert set(table["linker"].to_pylist()) == {"dense"} and set(table["preset"].to_pylist()) == {"offline"}
    assert "minilm" in table["models"][0].as_py()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["parts"]) == 6


def test_resume_after_the_driver_is_killed(data, cluster, env, tmp_path):
    rows = [{"caption": f"{NAMES[r % 20]} at event {r}.", "mention": NAMES[r % 20], "id": f"r{r}"} for r in range(600)]
    src = _write_jsonl(tmp_path / "many.jsonl", rows)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mel", "batch", "link", "--kb", data["kb"], "--linker", "bm25", "--input", src,
            "--output", out, "--preset", "offline", "--address", cluster.address, "--part-size", "20",
            "--batch-size", "8", "--num-workers", "1", "--worker-cpus", "0.3", "--quiet"]
    # small actors: the rerun must not wait for the CPUs the killed job's actors hold until Ray reaps them
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("part-*.parquet")))
    assert 3 <= done < 30, f"the kill came at {done} of 30 parts: the test could not check a resume"
    second = _cli(env, *args[4:], timeout=300)
    assert f"{done} parts already done" in second.stderr or f"{done + 1} parts already done" in second.stderr, \
        second.stderr
    table = _read_parts(out)
    assert table.num_rows == 600
    assert table["row"].to_pylist() == list(range(600))  # every row, each once
    assert len(set(table["mention_id"].to_pylist())) == 600
    assert not list(out.rglob(".*.tmp-*"))  # nothing half-written left
    summary = json.loads(second.stdout)
    assert summary["total_linked"] == 600 and summary["rows_done_before"] >= done * 20


def test_bad_rows_are_counted_and_written_to_the_errors_file(data, cluster, env, tmp_path):
    from mel.batch import batch_link
    good = {"caption": "Tom Hanks in Paris.", "mention": "Tom Hanks", "id": "good"}
    lines = [json.dumps(good), "{not json", json.dumps({"mention": "Paris"}),
             json.dumps({"caption": "Rome at night.", "mention": "Berlin"}),
             json.dumps({"caption": "Rome at night.", "mention": "Rome", "colour": "red"}),
             json.dumps({"caption": "Rome at night.", "mention": "Rome", "image": "no/such/image.jpg"}),
             json.dumps(["a", "list"]), json.dumps({**good, "id": "good2"})]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"caption": "caf\xe9", "mention": "caf"}\n')
    out = tmp_path / "out"
    summary = batch_link(kb=str(data["kb"]), linker="bm25", input=str(src), output=str(out), preset="offline",
                         address=cluster.address, part_size=4, progress=False, log=lambda m: None)
    assert summary["linked"] == 2 and summary["errors"] == 7 and summary["total_errors"] == 7
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [1, 2, 3, 4, 5, 6, 8]
    reasons = " | ".join(e["error"] for e in errors)
    for expected in ("not valid JSON", "missing 'caption'", "does not occur in the caption", "unknown field",
                     "image 'no/such/image.jpg' not found", "must be a JSON object", "not UTF-8"):
        assert expected in reasons, reasons
    table = _read_parts(out)
    assert table["mention_id"].to_pylist() == ["good", "good2"] and table["prediction"].to_pylist() == ["Q11"] * 2


@pytest.mark.parametrize("linker", ["bm25", "dense"])
def test_batch_eval_equals_eval(data, cluster, env, tmp_path, linker):
    from mel.batch import batch_eval
    from mel.datasets import load_dataset
    from mel.evaluate import HITS_AT, evaluate
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    examples = load_dataset("jsonl", data["ds"], "dev").examples[:50]
    expected = evaluate(build_linker(linker, KnowledgeBase(data["kb"]), data["preset"]), examples, progress=False)
    got = batch_eval(kb=str(data["kb"]), linker=linker, format="jsonl", data=str(data["ds"]), split="dev", limit=50,
                     output=str(tmp_path / "out"), preset="offline", address=cluster.address, part_size=16,
                     progress=False, log=lambda m: None)
    keys = [f"hits@{h}" for h in HITS_AT] + ["mrr", "n", "n_gold_not_in_kb"]
    assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}
    assert 0 < expected["hits@1"] < 1  # a split where the numbers can differ


def test_another_job_in_the_same_output_folder_is_refused(data, cluster, tmp_path):
    from mel.batch import batch_link
    from mel.errors import InputError
    src = _write_jsonl(tmp_path / "m.jsonl", [{"caption": "Rome.", "mention": "Rome"}])
    kwargs = dict(kb=str(data["kb"]), input=str(src), output=str(tmp_path / "out"), preset="offline",
                  address=cluster.address, progress=False, log=lambda m: None)
    batch_link(linker="bm25", **kwargs)
    with pytest.raises(InputError, match="another job.*linker"):
        batch_link(linker="exact", **kwargs)


def test_ray_missing_is_a_clear_error(monkeypatch):
    from mel.batch import require_ray
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ModelUnavailableError, match=r'pip install "ray\[data\]"'):
        require_ray()


# -- KBs at scale ---------------------------------------------------------------------------------
def _clustered(n, d, seed, r=16, k=200):
    """Unit vectors near a low-dimensional subspace (as text embeddings are), in k clusters."""
    basis = np.random.default_rng(42).standard_normal((r, d)).astype(np.float32)
    centres = np.random.default_rng(43).standard_normal((k, r)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, r)).astype(np.float32)) @ basis
    x += 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivfpq_recall_and_memory(tmp_path):
    from mel.index import DenseIndex
    n, d = 20_000, 64
    vectors, queries = _clustered(n, d, 0), _clustered(100, d, 1)
    exact = DenseIndex(vectors, engine="numpy")
    _, truth = exact.search(queries, 20)
    exact.save(tmp_path / "v.safetensors", {"encoder": "synthetic"})
    index, meta = DenseIndex.load(tmp_path / "v.safetensors", engine="faiss-ivfpq")
    assert meta == {"encoder": "synthetic"} and isinstance(index.vectors, np.memmap)  # floats stay on disk
    scores, got = index.search(queries, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, truth, strict=True)])
    assert recall >= 0.95, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert index.memory_bytes() < 0.4 * vectors.nbytes  # codes + ids, not the float vectors
    tiny = DenseIndex(vectors[:50], engine="faiss-ivfpq")  # too few rows to train: exact search
    assert np.array_equal(tiny.search(queries, 5)[1], DenseIndex(vectors[:50], engine="numpy").search(queries, 5)[1])
    without_rerank = DenseIndex(vectors, engine="faiss-ivfpq", rerank=20)  # the shortlist matters
    _, short = without_rerank.search(queries, 20)
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(short, truth, strict=True)]) < recall


def test_streaming_kb_build_writes_the_same_kb(tmp_path, hashing_encoder):
    from safetensors.numpy import load_file

    from mel.kb import BUILD_CHUNK, KnowledgeBase, build_kb
    from mel.types import Entity
    n = BUILD_CHUNK * 2 + 17  # several chunks and a partial one
    ents = (Entity(f"Q{i}", f"entity {i} name{i % 97}", aliases=[f"alias{i}"], description=f"thing number {i}")
            for i in range(n))
    kb = build_kb(ents, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    assert len(kb) == n and kb.get(f"Q{n - 1}").name == f"entity {n - 1} name{(n - 1) % 97}"
    assert kb.lookup_name(f"alias{BUILD_CHUNK + 3}") == [(BUILD_CHUNK + 3, "alias")]
    tensors = load_file(str(tmp_path / "kb.text.safetensors"))
    assert tensors["vectors"].shape == (n, hashing_encoder.dim)
    assert np.array_equal(tensors["ids"], np.arange(n))
    from mel.kb import entity_text
    row = n - 5
    assert np.allclose(tensors["vectors"][row], hashing_encoder.encode([entity_text(kb.entity_at(row))])[0])
    assert kb.search_bm25("name5", k=3)
    dup = [Entity("Q1", "first"), Entity("Q2", "two"), Entity("Q1", "again")]
    assert KnowledgeBase(build_kb(dup, tmp_path / "dup.sqlite", progress=False).path).get("Q1").name == "first"
