"""Annotation teams (issue #12): overlap, blind annotation, agreement against hand-computed figures,
review (final labels, send back, audit trail, roles), dashboard numbers, and the project export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotations.agreement import agreement_from_table, compute_agreement
from annotations.dashboard import dashboard_data, figures
from annotations.export import export_corrections
from annotations.projects import ProjectSettings, create_project, import_tasks, list_tasks, progress, update_settings
from annotations.queue import AnnotationQueue, StaleTaskError
from annotations.review import ReviewQueue, task_labels
from annotations.store import AnnotationStore, NotAllowedError
from mel.datasets import load_dataset
from mel.errors import InputError
from mel.types import NIL


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "data") as s:
        yield s


def _project(store, tmp_path, n: int, name: str = "team", **settings) -> str:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"caption": f"Task {i} in a caption", "mention": f"Task {i}"}) + "\n"
                            for i in range(1, n + 1)))
    create_project(store, name, settings=ProjectSettings(**settings))
    import_tasks(store, name, "tasks-jsonl", data)
    return name


_tokens = iter(range(10**6))


def _decide(queue, annotator, label, *, shown=()):
    """Put the next task on `annotator`'s screen and decide it: an entity id, NIL, or "skip"."""
    view = queue.next_task(annotator)
    token = f"{annotator}-{next(_tokens)}"
    if label == "skip":
        queue.skip(annotator, view.task.id, token=token)
    elif label == NIL:
        queue.decide(annotator, view.task.id, "nil", token=token, shown_prediction_ids=list(shown))
    else:
        queue.decide(annotator, view.task.id, "search", label, token=token, entity_name=f"name of {label}",
                     shown_prediction_ids=list(shown))
    return view.task.id


# -- the hand table --------------------------------------------------------------------------------
# Three annotators, five tasks, k = 3 (labels: Q1, Q2, NIL; "-" = skipped, no label):
#
#         A     B     C
#   t1    Q1    Q1    Q1      (A first said Q2 and undid it)
#   t2    Q1    Q2    Q1
#   t3    NIL   NIL   -
#   t4    Q2    Q2    Q2      (A first said Q1, then changed it to Q2 from the history)
#   t5    Q2    -     NIL
#
# Cohen's kappa, kappa = (p_o - p_e) / (1 - p_e), p_e = sum over labels of the two raters' shares:
#   A/B on t1-t4: A = Q1 Q1 NIL Q2, B = Q1 Q2 NIL Q2: p_o = 3/4;
#        A: Q1 2, NIL 1, Q2 1; B: Q1 1, NIL 1, Q2 2: p_e = (2*1 + 1*1 + 1*2) / 16 = 5/16;
#        kappa = (12/16 - 5/16) / (11/16) = 7/11 = 0.63636...
#   A/C on t1 t2 t4 t5: A = Q1 Q1 Q2 Q2, C = Q1 Q1 Q2 NIL: p_o = 3/4;
#        A: Q1 2, Q2 2; C: Q1 2, Q2 1, NIL 1: p_e = (2*2 + 2*1 + 0*1) / 16 = 6/16;
#        kappa = (12/16 - 6/16) / (10/16) = 6/10 = 0.6
#   B/C on t1 t2 t4: B = Q1 Q2 Q2, C = Q1 Q1 Q2: p_o = 2/3;
#        B: Q1 1, Q2 2; C: Q1 2, Q2 1: p_e = (1*2 + 2*1) / 9 = 4/9;
#        kappa = (6/9 - 4/9) / (5/9) = 2/5 = 0.4
# Krippendorff's alpha (nominal), units = tasks with >= 2 labels (all five), n = 3+3+2+3+2 = 13 values.
#   Coincidences o(c,k): each ordered pair of values in a unit of m values adds 1/(m-1):
#   t1 (Q1 Q1 Q1): o(Q1,Q1) += 6/2 = 3;  t2 (Q1 Q2 Q1): o(Q1,Q1) += 2/2, o(Q1,Q2) += 2/2, o(Q2,Q1) += 2/2;
#   t3 (NIL NIL): o(NIL,NIL) += 2;  t4 (Q2 x3): o(Q2,Q2) += 3;  t5 (Q2 NIL): o(Q2,NIL) += 1, o(NIL,Q2) += 1.
#   n_Q1 = 4+1 = 5, n_Q2 = 1+3+1 = 5, n_NIL = 2+1 = 3 (sum 13).
#   D_o = off-diagonal / n = 4/13; D_e = (n^2 - sum n_c^2) / (n(n-1)) = (169 - 59) / 156 = 110/156.
#   alpha = 1 - D_o/D_e = 1 - (4*156)/(13*110) = 1 - 24/55 = 31/55 = 0.563636...
# Final labels: t1 Q1 and t4 Q2 (all three agree); t3 none (only 2 of k=3 decided); a reviewer sets
# t2 = Q1 and t5 = NIL.
#   vs final:    A: t1 t2 t4 right, t5 wrong = 3/4; B: t1 t4 right, t2 wrong = 2/3; C: t1 t2 t4 t5 = 4/4.
#   vs reviewer: A: t2 right, t5 wrong = 1/2;       B: t2 wrong = 0/1;             C: t2 t5 = 2/2.
TABLE = {"t1": {"A": "Q1", "B": "Q1", "C": "Q1"}, "t2": {"A": "Q1", "B": "Q2", "C": "Q1"},
         "t3": {"A": NIL, "B": NIL}, "t4": {"A": "Q2", "B": "Q2", "C": "Q2"}, "t5": {"A": "Q2", "C": NIL}}


def _hand_table_project(store, tmp_path):
    """The table above, made through the queue and the review, as a team would."""
    name = _project(store, tmp_path, 5, annotations_per_task=3)
    q = AnnotationQueue(store, name)
    t = [task.id for task in list_tasks(store, name)]
    first = _decide(q, "A", "Q2")                          # t1, then undone
    q.undo("A")
    assert _decide(q, "A", "Q1") == first == t[0]
    for label in ("Q1", NIL, "Q1", "Q2"):                  # t2..t5 (t4 = Q1 for now)
        _decide(q, "A", label)
    q.reopen("A", t[3])
    q.decide("A", t[3], "search", "Q2", token="A-change-t4", entity_name="name of Q2")
    for label in ("Q1", "Q2", NIL, "Q2", "skip"):          # B: t1..t5, skipping t5
        _decide(q, "B", label)
    for label in ("Q1", "Q1", "skip", "Q2", NIL):          # C: t1, t2, skips t3, then t4, t5
        _decide(q, "C", label)
    review = ReviewQueue(store, name, reviewer="R", is_reviewer=True)
    review.finalize(t[1], "Q1", token="r1")
    review.finalize(t[4], "nil", token="r2")
    return name, t


def test_agreement_of_the_hand_table_from_the_database(store, tmp_path):
    name, t = _hand_table_project(store, tmp_path)
    report = compute_agreement(store, name)
    assert report.annotators == ("A", "B", "C") and (report.n_tasks, report.n_decided, report.n_overlap) == (5, 5, 5)
    assert report.pair("A", "B").kappa == pytest.approx(7 / 11)
    assert report.pair("A", "C").kappa == pytest.approx(6 / 10)
    assert report.pair("B", "C").kappa == pytest.approx(2 / 5)
    assert (report.pair("A", "B").n_shared, report.pair("A", "B").observed) == (4, 0.75)
    assert (report.pair("B", "C").n_shared, report.pair("B", "C").n_agree) == (3, 2)
    assert report.alpha == pytest.approx(31 / 55)
    a, b, c = (report.annotator(x) for x in "ABC")
    assert (a.n_agree_final, a.n_final, a.accuracy_final) == (3, 4, 0.75)
    assert (b.n_agree_final, b.n_final) == (2, 3) and b.accuracy_final == pytest.approx(2 / 3)
    assert (c.accuracy_final, c.accuracy_reviewed) == (1.0, 1.0)
    assert (a.accuracy_reviewed, b.accuracy_reviewed, b.n_reviewed) == (0.5, 0.0, 1)
    assert json.loads(report.to_json())["alpha"] == pytest.approx(31 / 55)
    text = report.table()
    assert "Krippendorff's alpha (nominal): 0.564" in text and "A / B" in text and "0.636" in text

    # the same figures from the table alone (no database)
    finals = {"t1": ("Q1", False), "t2": ("Q1", True), "t4": ("Q2", False), "t5": (NIL, True)}
    again = agreement_from_table("hand", TABLE, finals)
    assert again.pairs == report.pairs and again.alpha == report.alpha and again.per_annotator == report.per_annotator


def test_agreement_degenerate_cases_say_why_instead_of_nan():
    one_label = agreement_from_table("p", {"t1": {"A": "Q1", "B": "Q1"}, "t2": {"A": "Q1", "B": "Q1"}})
    pair = one_label.pair("A", "B")
    assert (pair.kappa, pair.observed) == (None, 1.0) and "both gave Q1 to all 2 shared tasks" in pair.note
    assert one_label.alpha is None and "single label" in one_label.alpha_note
    assert one_label.mean_kappa is None and "NaN" not in one_label.to_json() and "n/a" in one_label.table()

    no_overlap = agreement_from_table("p", {"t1": {"A": "Q1"}, "t2": {"B": "Q2"}})
    assert no_overlap.pair("A", "B").n_shared == 0 and no_overlap.pair("A", "B").kappa is None
    assert no_overlap.alpha is None and "no task was decided by two annotators" in no_overlap.alpha_note
    assert any("annotations_per_task" in n for n in no_overlap.notes)

    single = agreement_from_table("p", {"t1": {"A": "Q1"}, "t2": {"A": NIL}}, {"t1": ("Q1", False)})
    assert single.pairs == () and single.alpha is None and "two annotators" in single.alpha_note
    assert single.annotator("A").accuracy_final == 1.0 and single.annotator("A").accuracy_reviewed is None
    assert any("only A has decided" in n for n in single.notes)

    empty = agreement_from_table("p", {})
    assert empty.annotators == () and "no task has a decision yet" in empty.notes
    # one disagreement on one shared task: p_o = 0, p_e = (1*0 + 0*1)/1 = 0, so kappa = 0 (defined)
    assert agreement_from_table("p", {"t": {"A": "Q1", "B": NIL}}).pair("A", "B").kappa == 0.0


def test_cli_agreement_prints_a_table_and_writes_json(store, tmp_path, capsys):
    from mel.cli import main
    name, _ = _hand_table_project(store, tmp_path)
    out = tmp_path / "reports" / "agreement.json"
    assert main(["annotations", "agreement", "--db", str(store.path), "--project", name, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Krippendorff's alpha (nominal): 0.564" in text and "B / C" in text
    assert json.loads(out.read_text())["pairs"][0]["kappa"] == pytest.approx(7 / 11)
    assert main(["annotations", "agreement", "--db", str(store.path), "--project", "nope"]) == 2
    assert "no project 'nope'" in capsys.readouterr().err


# -- overlap and blindness -------------------------------------------------------------------------
def test_a_fixed_team_gets_balanced_shares_of_k_distinct_annotators(store, tmp_path):
    name = _project(store, tmp_path, 7, annotations_per_task=2, annotators=["ann", "bo", "cy"])
    q = AnnotationQueue(store, name)
    done: dict[str, list[str]] = {"ann": [], "bo": [], "cy": []}
    for person in done:  # each works through everything the queue gives them
        while (view := q.next_task(person)) is not None:
            q.decide(person, view.task.id, "nil", token=f"{person}-{view.task.id}")
            done[person].append(view.task.id)
    # 7 tasks x 2 = 14 decisions over 3 people: shares 5, 5, 4 (max - min <= 1)
    assert sorted(len(v) for v in done.values()) == [4, 5, 5]
    per_task = {t.id: [p for p, ids in done.items() if t.id in ids] for t in list_tasks(store, name)}
    assert all(len(people) == 2 for people in per_task.values()), "every task twice, by two distinct people"
    assert progress(store, name).project_done == 7
    assert str(progress(store, name, "cy")).startswith(f"cy {len(done['cy'])} / {len(done['cy'])}"), \
        "an annotator's progress counts against their share"
    with pytest.raises(NotAllowedError, match="not on the team"):
        q.next_task("mallory")
    with pytest.raises(InputError, match="needs 3 distinct annotators but the team has only 2"):
        ProjectSettings(annotations_per_task=3, annotators=["a", "b"])


def test_annotators_never_see_each_others_decisions_or_flags(store, tmp_path):
    name = _project(store, tmp_path, 2, annotations_per_task=2)
    q = AnnotationQueue(store, name)
    view_a = q.next_task("alice")
    q.flag("alice", view_a.task.id, "I think it is Eileen Collins")
    q.decide("alice", view_a.task.id, "search", "Q1", token="a1", entity_name="Eileen Collins")
    view_b = q.next_task("bob")
    assert view_b.task.id == view_a.task.id, "k = 2: bob gets the same task"
    shown = repr(view_b)
    assert view_b.decision is None and view_b.flags == [] and "Eileen" not in shown and "Q1" not in shown
    assert q.history("bob") == [] and q.current("bob").flags == []
    # nobody reads or saves as someone else: a reviewer included
    for call in (lambda: q.history("alice", by="bob"), lambda: q.back("alice", by="rita"),
                 lambda: q.next_task("alice", by="rita"), lambda: q.current("alice", by="bob"),
                 lambda: q.reopen("alice", view_a.task.id, by="rita"),
                 lambda: q.decide("bob", view_b.task.id, "search", "Q2", token="r1", by="rita"),
                 lambda: q.skip("bob", view_b.task.id, token="r2", by="rita"),
                 lambda: q.undo("alice", by="rita"), lambda: q.flag("bob", view_b.task.id, "x", by="rita")):
        with pytest.raises(NotAllowedError, match="cannot act as"):
            call()
    assert store.db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 1, "nothing was written"
    ack = q.decide("bob", view_b.task.id, "search", "Q2", token="b1", entity_name="Phil Collins", by="bob")
    assert ack.annotator == "bob" and "Eileen" not in repr(ack)


# -- review ----------------------------------------------------------------------------------------
def test_review_lists_disagreements_and_flags_and_sets_the_final_label(store, tmp_path):
    name = _project(store, tmp_path, 3, annotations_per_task=2)
    q = AnnotationQueue(store, name)
    t = [task.id for task in list_tasks(store, name)]
    (g1,) = store.record_predictions(list_tasks(store, name)[0].mention_id, [
        {"linker": "gemel", "error": "timeout"}])
    _decide(q, "alice", "Q1")          # t1: Eileen / Phil: disagreement
    _decide(q, "alice", "Q3")          # t2: both Q3: agreed
    _decide(q, "bob", "Q2")
    _decide(q, "bob", "Q3")
    view = q.next_task("alice")        # t3: one decision, flagged
    q.flag("alice", view.task.id, "caption cut off")
    q.decide("alice", view.task.id, "nil", token="t3a")

    with pytest.raises(NotAllowedError, match="not a reviewer"):
        ReviewQueue(store, name, reviewer="bob", is_reviewer=False)
    review = ReviewQueue(store, name, reviewer="rita", is_reviewer=True)
    items = review.items()
    assert [(i.task.id, i.reasons) for i in items] == [(t[0], ("disagreement",)), (t[2], ("flagged",))]
    first = items[0]
    assert first.label.labels == {"alice": "Q1", "bob": "Q2"} and first.predictions["gemel"].id == g1
    assert review.counts() == {"open": 1, "agreed": 1, "disagreed": 1, "reviewed": 0, "sent_back": 0,
                               "to_review": 2}
    labels = task_labels(store, name)
    assert (labels[t[1]].final_label, labels[t[1]].source) == ("Q3", "agreement")
    assert labels[t[0]].final_label is None and labels[t[2]].final_label is None  # t3: 1 of k=2 decisions

    # an annotator changes their decision after the screen was drawn: the review is refused
    q.reopen("bob", t[0])
    q.decide("bob", t[0], "search", "Q2", token="b-again", entity_name="Phil Collins")
    with pytest.raises(StaleTaskError, match="an annotator changed their decision"):
        review.finalize(t[0], "Q1", token="x", seen_decision_ids=first.decision_ids, seen_review_id=first.review_id)
    fresh = review.item(t[0])
    ack = review.finalize(t[0], "Q1", token="r-1", entity_name="Eileen Collins",
                          seen_decision_ids=fresh.decision_ids, seen_review_id=fresh.review_id)
    assert "final label Eileen Collins (Q1)" in ack.describe() and ack.label.status == "reviewed"
    again = review.finalize(t[0], "Q1", token="r-1")
    assert again.replayed and again.review.id == ack.review.id, "a doubled click saves once"
    flagged = review.finalize(t[2], "NIL", token="r-2", comment="not in the KB")
    assert flagged.resolved_flags == 1 and q.flags() == []
    assert [i.task.id for i in review.items()] == [], "nothing left to review"
    assert [i.task.id for i in review.items(include_reviewed=True)] == [t[0], t[2]]
    labels = task_labels(store, name)
    assert (labels[t[0]].final_label, labels[t[0]].reviewed, labels[t[0]].agreement) == ("Q1", True, 0.5)
    assert (labels[t[2]].final_label, labels[t[2]].final_name) == (NIL, "")
    # a second review supersedes the first; both stay
    second = review.finalize(t[0], "Q2", token="r-3", entity_name="Phil Collins")
    assert second.review.supersedes == ack.review.id
    assert [r.entity_id for r in review.history(t[0])] == ["Q1", "Q2"]
    with pytest.raises(InputError, match="no task 'zzz'"):
        review.finalize("zzz", "Q1", token="r-4")


def test_send_back_returns_the_task_to_its_annotators_keeping_the_audit_trail(store, tmp_path):
    name = _project(store, tmp_path, 2, annotations_per_task=2)
    q = AnnotationQueue(store, name)
    t0 = _decide(q, "alice", "Q1")
    _decide(q, "bob", "Q2")
    _decide(q, "alice", "Q5")       # t1, so alice's next task after the send-back is t0 again
    review = ReviewQueue(store, name, reviewer="rita", is_reviewer=True)
    with pytest.raises(InputError, match="needs a comment"):
        review.send_back(t0, comment=" ", token="s0")
    ack = review.send_back(t0, comment="Read the rule on astronauts", token="s1")
    assert ack.returned_decisions == 2 and ack.label.status == "sent_back" and ack.label.decisions == ()
    assert [d.task_id for d in q.history("alice")] != [t0] and t0 not in [d.task_id for d in q.history("bob")]
    view = q.next_task("alice")
    assert view.task.id == t0 and view.review_note == "Read the rule on astronauts" and view.decision is None
    q.decide("alice", t0, "search", "Q1", token="a-again", entity_name="Eileen Collins")
    assert q.next_task("bob").task.id == t0
    q.decide("bob", t0, "search", "Q1", token="b-again", entity_name="Eileen Collins")
    label = task_labels(store, name)[t0]
    assert (label.final_label, label.source) == ("Q1", "agreement")
    rows = store.db.execute("SELECT annotator, entity_id, returned_by IS NOT NULL FROM corrections "
                            "WHERE task_id = ? ORDER BY id", (t0,)).fetchall()
    assert rows == [("alice", "Q1", 1), ("bob", "Q2", 1), ("alice", "Q1", 0), ("bob", "Q1", 0)], \
        "the returned decisions stay in the audit trail"
    with pytest.raises(NotAllowedError, match="sent back by a review"):
        q.undo("bob", store.db.execute("SELECT min(id) FROM corrections WHERE annotator = 'bob'").fetchone()[0])


# -- dashboard -------------------------------------------------------------------------------------
class _Clock:
    """utc_now for the queue: a fixed start plus the seconds the test advances it."""

    def __init__(self):
        self.t = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def __call__(self):
        import time
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.t)) + f".{int(self.t * 1000) % 1000:03d}Z"


def test_dashboard_numbers_of_a_hand_built_project(store, tmp_path, monkeypatch):
    import annotations.queue as queue_module
    clock = _Clock()
    monkeypatch.setattr(queue_module, "utc_now", clock)
    name = _project(store, tmp_path, 4, annotations_per_task=2)
    tasks = list_tasks(store, name)
    preds = {}
    for task, (gemel, dim) in zip(tasks, [("Q1", "Q1"), ("Q2", "Q9"), (None, "Q3"), ("Q4", "Q4")], strict=True):
        preds[task.id] = store.record_predictions(task.mention_id, [_prediction("gemel", gemel, task.mention),
                                                                    _prediction("dim", dim, task.mention)])
    q = AnnotationQueue(store, name)

    def work(who, label, seconds):
        view = q.next_task(who)            # shown now
        clock.t += seconds                 # ... decided `seconds` later
        _decide_on(q, who, view, label, preds[view.task.id])
        return view.task.id

    # alice: 10 s, 20 s, 30 s at 00:00; an hour later 40 s.  bob: 5 s, 7 s.
    work("alice", "Q1", 10)     # t1: gemel Q1 and dim Q1 -> both right
    work("alice", "Q2", 20)     # t2: gemel Q2 right, dim Q9 wrong
    work("alice", NIL, 30)      # t3: gemel said NIL (no entity) -> right; dim Q3 wrong
    clock.t += 3600
    work("alice", "Q7", 40)     # t4: neither
    work("bob", "Q1", 5)        # t1: both right
    work("bob", "Q9", 7)        # t2: dim right
    data = dashboard_data(store, name)
    a, b = data.annotator("alice"), data.annotator("bob")
    assert (a.decided, a.nil, a.median_seconds, a.n_timed) == (4, 1, 25.0, 4)   # median of 10 20 30 40
    assert (b.decided, b.median_seconds) == (2, 6.0)                             # median of 5 7
    assert data.median_seconds == 15.0                                           # median of 5 7 10 20 30 40
    assert data.hours == ("2026-01-01T00:00Z", "2026-01-01T01:00Z")
    assert data.decisions_per_hour == {"alice": (3, 1), "bob": (0, 2)}
    # acceptance over the 6 standing decisions: gemel right on t1(a) t2(a) t3(a) t1(b) = 4/6;
    # dim right on t1(a) t1(b) t2(b) = 3/6; neither: t4(a) = 1/6
    acc = data.acceptance
    assert (acc.n, acc.agreed, acc.neither) == (6, {"gemel": 4, "dim": 3}, 1)
    assert acc.rate("gemel") == pytest.approx(4 / 6) and acc.neither_rate == pytest.approx(1 / 6)
    assert [bucket.day for bucket in data.acceptance_by_day] == ["2026-01-01"]
    # status: t1 both Q1 (agreed), t2 Q2/Q9 (disagreed), t3 and t4 one decision of two (open)
    assert data.status_counts == {"open": 2, "agreed": 1, "disagreed": 1, "reviewed": 0, "sent_back": 0}
    assert data.progress.project_done == 2 and data.agreement.pair("alice", "bob").n_shared == 2
    figs = figures(data)
    assert set(figs) == {"progress", "throughput", "speed", "acceptance", "agreement"}
    for fig in figs.values():
        assert fig.axes and all(ax.get_title() or not ax.get_xticks().size for ax in fig.axes[:1])
        fig.savefig(tmp_path / "fig.png")  # renders with Agg
    assert figs["speed"].axes[0].get_ylabel().startswith("seconds")
    assert "Decisions per hour (6 in all)" == figs["throughput"].axes[0].get_title()


def test_dashboard_of_an_empty_project_draws_and_says_so(store, tmp_path):
    name = _project(store, tmp_path, 2)
    data = dashboard_data(store, name)
    assert data.hours == () and data.acceptance.n == 0 and data.median_seconds is None
    texts = [t.get_text() for fig in figures(data).values() for ax in fig.axes for t in ax.texts]
    assert "no decisions yet" in texts


def _prediction(linker, entity_id, mention):
    from mel.types import Candidate, Entity, LinkResult
    if entity_id is None:  # the model's answer is NIL
        return LinkResult(linker, mention, None)
    e = Entity(entity_id, f"name of {entity_id}")
    return LinkResult(linker, mention, e, [Candidate(e, 0.9)], 0.9)


def _decide_on(q, who, view, label, shown):
    token = f"{who}-{next(_tokens)}"
    if label == NIL:
        q.decide(who, view.task.id, "nil", token=token, shown_prediction_ids=shown)
    else:
        q.decide(who, view.task.id, "search", label, token=token, entity_name=f"name of {label}",
                 shown_prediction_ids=shown)


# -- export ----------------------------------------------------------------------------------------
def test_project_export_has_final_labels_nil_provenance_and_filters(store, tmp_path):
    name, t = _hand_table_project(store, tmp_path)
    out = tmp_path / "out"
    report = export_corrections(store, out, "jsonl", project=name)
    # final: t1 Q1 (agreed), t2 Q1 (reviewed), t4 Q2 (agreed), t5 NIL (reviewed); t3 undecided
    assert (report.n_tasks, report.n_final, report.n_reviewed, report.n_undecided) == (5, 4, 2, 1)
    assert (report.n_examples, report.n_nil) == (4, 1)
    examples = {e.sample_id: e for e in load_dataset("jsonl", out, "train").examples}
    assert {sid: e.gold_id for sid, e in examples.items()} == {t[0]: "Q1", t[1]: "Q1", t[3]: "Q2", t[4]: NIL}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov[t[1]]["label_source"] == "review" and prov[t[1]]["reviewer"] == "R"
    assert prov[t[1]]["agreement"] == pytest.approx(2 / 3)
    assert [(a["annotator"], a["entity_id"]) for a in prov[t[1]]["annotations"]] == [("A", "Q1"), ("B", "Q2"),
                                                                                   ("C", "Q1")]
    assert all(a["decided_at"].endswith("Z") for a in prov[t[3]]["annotations"])
    assert prov[t[3]]["label_source"] == "agreement" and prov[t[3]]["agreement"] == 1.0

    reviewed = export_corrections(store, tmp_path / "rev", "jsonl", project=name, reviewed_only=True)
    assert (reviewed.n_examples, reviewed.n_filtered) == (2, 2)
    # agreement per task: t1 1.0, t2 2/3, t4 1.0, t5 1/2 (A said Q2, C said NIL)
    strict = export_corrections(store, tmp_path / "strict", "gemel", project=name, min_agreement=0.6)
    assert (strict.n_examples, strict.n_filtered) == (3, 1)
    assert {e.gold_id for e in load_dataset("gemel", tmp_path / "strict", "train").examples} == {"Q1", "Q2"}
    wikimel = export_corrections(store, tmp_path / "wm", "wikimel", project=name)
    assert sorted(e.gold_id for e in load_dataset("wikimel", tmp_path / "wm", "train").examples) == [
        NIL, "Q1", "Q1", "Q2"]
    assert wikimel.n_nil == 1
    with pytest.raises(InputError, match="give --project too"):
        export_corrections(store, tmp_path / "x", "jsonl", reviewed_only=True)
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        export_corrections(store, tmp_path / "x", "jsonl", project=name, min_agreement=2)
    free = export_corrections(store, tmp_path / "free", "jsonl")
    assert free.n_examples == 0 and free.projects_not_exported == [name] and "--project" in free.summary()


def test_parquet_export_is_read_by_hugging_face_datasets(store, tmp_path):
    name, t = _hand_table_project(store, tmp_path)
    out = tmp_path / "pq"
    report = export_corrections(store, out, "parquet", project=name)
    assert report.files[0] == "train.parquet" and not (out / "provenance.json").exists()
    import pyarrow.parquet as pq
    table = pq.read_table(out / "train.parquet")
    assert table.num_rows == 4 and table.schema.field("reviewed_at").type.tz == "UTC"
    import datasets  # requirements-dev.txt: the export is read as Hugging Face users read it
    ds = datasets.load_dataset("parquet", data_files={"train": str(out / "train.parquet")},
                               cache_dir=str(tmp_path / "hf-cache"))["train"]
    rows = {r["sample_id"]: r for r in ds}
    assert rows[t[4]]["entity_id"] == NIL and rows[t[4]]["is_nil"] and rows[t[4]]["reviewer"] == "R"
    assert [a["annotator"] for a in rows[t[1]]["annotations"]] == ["A", "B", "C"]
    assert rows[t[0]]["label_source"] == "agreement" and rows[t[0]]["agreement"] == 1.0
    assert rows[t[0]]["caption"][rows[t[0]]["start"]:rows[t[0]]["end"]] == rows[t[0]]["mention"] == "Task 1"


def test_an_export_killed_midway_leaves_the_previous_files_whole(store, tmp_path, monkeypatch):
    import mel.paths
    name, _ = _hand_table_project(store, tmp_path)
    out = tmp_path / "out"
    export_corrections(store, out, "jsonl", project=name)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    written = []

    def crash(tmp, target):  # the new train.jsonl is written in full beside, then the power goes
        written.append(Path(tmp).read_bytes())
        raise OSError("power cut")
    monkeypatch.setattr(mel.paths, "publish", crash)
    update_settings(store, name, ProjectSettings(annotations_per_task=2))  # t3 becomes agreed: a new export
    with pytest.raises(OSError, match="power cut"):
        export_corrections(store, out, "jsonl", project=name)
    assert written and written[0] != before["train.jsonl"], "the new content was on its way"
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before, "the previous files are whole, and no temp file is left"
    monkeypatch.undo()
    assert export_corrections(store, out, "jsonl", project=name).n_examples == 5


def test_someone_taken_off_the_team_cannot_save_the_task_left_on_screen(store, tmp_path):
    from annotations.projects import update_settings
    name = _project(store, tmp_path, 3, annotators=["ann", "bo"])
    q = AnnotationQueue(store, name)
    view = q.next_task("bo")
    update_settings(store, name, ProjectSettings(annotators=["ann"]))  # an admin takes bo off the team meanwhile
    before = store.db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0]
    with pytest.raises(NotAllowedError, match="not on the team.*nothing is saved"):
        q.decide("bo", view.task.id, "nil", token="bo-late")
    assert store.db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0] == before
