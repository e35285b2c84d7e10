"""Pre-annotation: batches through Linker.pipe, one transaction per batch, resumable after SIGKILL,
exactly one prediction per task and linker, on-demand linking for the queue."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from annotations.preannotate import ensure_predictions, preannotate, preannotation_status
from annotations.projects import create_project, get_project, import_tasks, list_tasks
from annotations.queue import AnnotationQueue
from annotations.store import AnnotationStore
from mel.datasets import load_dataset, read_kb_entities
from mel.errors import InputError
from mel.kb import build_kb
from mel.linkers import build_linker
from mel.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
N_TASKS = 12
LINKERS = ("bm25", "exact")


@pytest.fixture(scope="module")
def wikimel_kb(tmp_path_factory, shared_data):
    """A small real KB: the gold entities of the first dev mentions plus the first 300 WikiMEL entities."""
    from conftest import HashingTextEncoder
    golds = {e.gold_id for e in load_dataset("wikimel", shared_data / "wikimel", "dev").examples[:N_TASKS]}
    entities = [e for i, e in enumerate(read_kb_entities("wikimel", shared_data / "wikimel"))
                if i < 300 or e.id in golds]
    return build_kb(entities, tmp_path_factory.mktemp("kb") / "wikimel-small.sqlite",
                    text_encoder=HashingTextEncoder(), progress=False)


@pytest.fixture
def project(tmp_path, shared_data, wikimel_kb):
    with AnnotationStore(tmp_path / "data") as store:
        create_project(store, "wm", kb=wikimel_kb.path)
        import_tasks(store, "wm", "wikimel", shared_data / "wikimel", split="dev", limit=N_TASKS)
        yield store, get_project(store, "wm")


def _linkers(kb) -> dict:
    preset = get_preset("offline")
    return {name: build_linker(name, kb, preset) for name in LINKERS}


def _per_task_and_linker(store) -> dict[tuple[str, str], int]:
    rows = store.db.execute("SELECT t.id, p.linker, count(*) FROM tasks t JOIN predictions p "
                            "ON p.mention_id = t.mention_id GROUP BY t.id, p.linker").fetchall()
    return {(task, linker): n for task, linker, n in rows}


def test_every_task_gets_one_prediction_per_linker_and_a_rerun_adds_none(project, wikimel_kb):
    store, proj = project
    seen = []
    report = preannotate(store, proj, _linkers(wikimel_kb), batch_size=5, on_progress=seen.append)
    assert report.n_batches == 3 and report.linked == {"bm25": N_TASKS, "exact": N_TASKS}
    assert [s["bm25"].done for s in seen] == [5, 10, 12] and seen[-1]["exact"].total == N_TASKS
    counts = _per_task_and_linker(store)
    assert len(counts) == N_TASKS * 2 and set(counts.values()) == {1}
    row = store.predictions(list_tasks(store, proj)[0].mention_id)[0]
    assert row["kb"] == proj.kb_stamp and row["shown_to"] == "preannotate" and row["candidates"]

    again = preannotate(store, proj, _linkers(wikimel_kb), batch_size=5)
    assert again.linked == {"bm25": 0, "exact": 0} and again.already_present == {"bm25": N_TASKS, "exact": N_TASKS}
    assert again.n_batches == 0 and len(_per_task_and_linker(store)) == N_TASKS * 2
    assert str(preannotation_status(store, proj, list(LINKERS))["exact"]) == f"exact {N_TASKS} / {N_TASKS}"


def test_the_queue_links_a_task_on_demand_and_the_batch_run_does_not_repeat_it(project, wikimel_kb):
    store, proj = project
    queue = AnnotationQueue(store, proj, kb=wikimel_kb, linkers=_linkers(wikimel_kb))
    view = queue.next_task("alice")
    assert set(view.predictions) == set(LINKERS) and len(view.prediction_ids) == 2
    assert ensure_predictions(store, proj, view.task, _linkers(wikimel_kb)) == []
    gold = view.task.gold_id
    ack = queue.decide("alice", view.task.id, "accept_dim", gold, token="k", shown_prediction_ids=view.prediction_ids,
                       prediction_id=view.predictions["bm25"].id)
    assert ack.entity_name == wikimel_kb.get(gold).name, "the name comes from the KB"
    with pytest.raises(InputError, match="not in the knowledge base"):
        queue.decide("alice", queue.next_task("alice").task.id, "search", "Q-not-there", token="k2")
    report = preannotate(store, proj, _linkers(wikimel_kb), batch_size=4)
    assert report.linked == {"bm25": N_TASKS - 2, "exact": N_TASKS - 2}, "the two shown tasks were linked already"
    assert set(_per_task_and_linker(store).values()) == {1}


class _FailsOn:
    """A linker that fails on one mention (in batches and alone), to check a failure costs one task."""

    name = "flaky"

    def __init__(self, inner, bad_text):
        self.inner, self.bad_text, self.kb = inner, bad_text, inner.kb

    def pipe(self, mentions, k=20, batch_size=32):
        if any(m.text == self.bad_text for m in mentions):
            raise RuntimeError("model fell over")
        return self.inner.pipe(mentions, k=k, batch_size=batch_size)

    def link(self, mention, k=20):
        return next(iter(self.pipe([mention], k=k)))


def test_a_linker_failing_on_one_task_costs_only_that_task(project, wikimel_kb):
    store, proj = project
    bad = list_tasks(store, proj)[3]
    linkers = {"bm25": _FailsOn(_linkers(wikimel_kb)["bm25"], bad.mention.text)}
    report = preannotate(store, proj, linkers, batch_size=5)
    assert report.linked == {"bm25": N_TASKS - 1} and report.failed == {"bm25": 1}
    assert report.failures[0].task_id == bad.id and "model fell over" in report.summary()
    report = preannotate(store, proj, {"bm25": _linkers(wikimel_kb)["bm25"]}, batch_size=5)
    assert report.linked == {"bm25": 1}, "a rerun links the task that failed"


def test_linkers_on_another_kb_or_a_project_without_kb_are_refused(project, tmp_path, wikimel_kb, hashing_encoder):
    store, proj = project
    from mel.types import Entity
    other = build_kb([Entity("Q1", "Someone")], tmp_path / "other.sqlite", text_encoder=hashing_encoder,
                     progress=False)
    with pytest.raises(InputError, match="links against other.sqlite"):
        preannotate(store, proj, _linkers(other))
    bare = create_project(store, "bare")
    with pytest.raises(InputError, match="has no KB yet"):
        preannotate(store, bare, _linkers(wikimel_kb))


KILLABLE_RUN = textwrap.dedent("""
    import sys, time
    from annotations.preannotate import preannotate
    from annotations.store import AnnotationStore
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    from mel.presets import get_preset

    class SlowAfterFirstBatch:
        # the second batch stays in flight (linking) until the test kills the process
        def __init__(self, inner):
            self.inner, self.kb, self.calls = inner, inner.kb, 0
        def pipe(self, mentions, k=20, batch_size=32):
            self.calls += 1
            if self.calls > 1:
                time.sleep(60)
            return self.inner.pipe(mentions, k=k, batch_size=batch_size)

    store = AnnotationStore(sys.argv[1])
    kb = KnowledgeBase(sys.argv[2])
    preset = get_preset("offline")
    linkers = {"bm25": build_linker("bm25", kb, preset),
               "exact": SlowAfterFirstBatch(build_linker("exact", kb, preset))}
    def said(status):
        print("batch done", status["bm25"].done, flush=True)
    preannotate(store, "wm", linkers, batch_size=4, on_progress=said)
""")


def test_a_killed_run_resumes_and_every_task_ends_with_one_prediction_per_linker(project, wikimel_kb, tmp_path):
    store, proj = project
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(store.data_dir), str(wikimel_kb.path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = child.stdout.readline()
        assert line.strip() == "batch done 4", (line, child.stderr.read() if child.poll() is not None else "")
        child.send_signal(signal.SIGKILL)  # while the second batch is being linked
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    counts = _per_task_and_linker(store)
    assert len(counts) == 4 * 2 and set(counts.values()) == {1}, "the first batch only, whole"

    result = subprocess.run([sys.executable, "-m", "mel", "annotations", "preannotate", "--db",
                             str(store.data_dir), "--project", "wm", "--linkers", ",".join(LINKERS),
                             "--preset", "offline", "--batch-size", "4"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"bm25: {N_TASKS - 4} linked, 4 already had one" in result.stdout
    assert "pre-annotating wm" in result.stderr, "a progress bar on the command line"
    counts = _per_task_and_linker(store)
    assert len(counts) == N_TASKS * 2 and set(counts.values()) == {1}
