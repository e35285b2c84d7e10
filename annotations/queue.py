"""The annotation queue of a project: each annotator gets the next task, decides it with one key,
goes back and forward through their own decisions, skips, undoes and flags.

    queue = AnnotationQueue(store, "wikimel-dev", kb=kb, linkers={"gemel": g, "dim": d})
    view = queue.next_task("alice")              # TaskView: the task, its predictions, progress
    ack = queue.decide("alice", view.task.id, "accept_dim", "Q42", token=key_press_id,
                       shown_prediction_ids=view.prediction_ids)
    view = queue.next_task("alice")

Every save is bound to the task on the annotator's screen (their cursor, in `queue_cursors`):

- a decision names its task id; one for a task that is not the one next_task/back/forward last
  gave this annotator is refused with StaleTaskError and nothing is written. So a key pressed
  while the next task loads, or in a second tab showing an older task, records nothing wrong.
- a decision carries a client token (one per key press); the same token again returns the first
  DecisionAck (with `replayed=True`) and writes nothing: a doubled key press saves once.
- it records the ids of the predictions that were on screen, and the one accepted.

Decisions are rows of the store's `corrections` table (so export and stats see them), with the
task id, the shown prediction ids, the token, and `supersedes` when a past decision is changed
from the history. Nothing is deleted: a change adds a row, undo marks one (`undone_at`). For each
annotator and task the latest row that was not undone stands. A skip is such a row too: the task
goes to the end of that annotator's queue (skipped tasks come back in the order they were skipped)
and stays open to the others.

Assignment: a task is given to an annotator who has not decided it, while fewer than the project's
`annotations_per_task` (k) annotators have decided it or hold it on screen (a hold lapses after
`lease_minutes`). So a team working at once gets different tasks; with k = 2 every task is decided
twice, by two people. A project with a fixed team (ProjectSettings.annotators, N people) gives the
task at position p to annotators[(p*k + j) % N] for j < k: everyone gets the same share (k*tasks/N,
give or take one) and someone off the team gets none (NotAllowedError).

Blind until review: what the queue shows an annotator (TaskView, history, flags on the task, acks)
holds only their own decisions and flags, never another annotator's; reviewers see them all
through annotations.review. Every method that acts for an annotator takes `by`, the logged-in user
making the call: when it is given and is someone else, the call is refused (NotAllowedError), so
nobody (a reviewer included) reads or saves as another annotator. The app passes its session user.

A review that sends a task back marks its decisions `returned_by` (they stay in the audit trail):
they no longer stand, and the task is again open to the annotators, first in the queue of those
whose decision went back, with the reviewer's comment (TaskView.review_note).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from mel.errors import InputError
from mel.types import NIL, check_typed_text

from .projects import Progress, Project, Task, get_project, get_task, progress
from .store import ACTIONS, STANDING, Ack, AnnotationStore, NotAllowedError, _check_annotator, standing, utc_now

MAX_COMMENT_CHARS = 2000
MAX_TOKEN_CHARS = 200


class StaleTaskError(NotAllowedError):
    """A save for a task that is not the one on the annotator's screen; nothing was written."""


@dataclass(frozen=True)
class PredictionView:
    """A stored prediction as the queue shows it (the latest per linker for the project's KB)."""

    id: int
    linker: str
    entity_id: str | None
    entity_name: str | None
    score: float | None
    candidates: list[dict]   # [{id, name, score}], best first
    details: dict
    error: str | None
    kb: str


@dataclass(frozen=True)
class Decision:
    """One row of the annotator's decisions (a correction bound to a task)."""

    id: int
    task_id: str
    annotator: str
    action: str
    entity_id: str | None
    entity_name: str
    prediction_id: int | None
    shown_prediction_ids: list[int]
    supersedes: int | None
    created: str
    undone_at: str | None


@dataclass(frozen=True)
class Flag:
    id: int
    task_id: str
    annotator: str
    comment: str
    created: str
    resolved_at: str | None = None
    resolved_by: str | None = None


@dataclass(frozen=True)
class TaskView:
    """What the screen shows for one task. `decision` is the annotator's standing decision when the
    task comes from their history (back/forward); `history_index` is its place there (0-based)."""

    task: Task
    predictions: dict[str, PredictionView]   # linker -> latest prediction
    progress: Progress
    decision: Decision | None = None
    history_index: int | None = None
    history_length: int = 0
    flags: list[Flag] = field(default_factory=list)   # this annotator's own flags on the task
    review_note: str | None = None  # the reviewer's comment when the task came back to this annotator

    @property
    def prediction_ids(self) -> list[int]:
        """The ids to send back with a decision (`shown_prediction_ids`)."""
        return [p.id for p in self.predictions.values()]


@dataclass(frozen=True)
class DecisionAck(Ack):
    """The store's Ack plus the task, the token and the progress after this decision.
    `replayed` is True when the token had been saved before (nothing new was written)."""

    task_id: str = ""
    project: str = ""
    token: str = ""
    shown_prediction_ids: tuple[int, ...] = ()
    prediction_id: int | None = None
    supersedes: int | None = None
    progress: Progress | None = field(default=None, compare=False)
    replayed: bool = field(default=False, compare=False)

    def describe(self) -> str:
        """What was saved, for which item: the line the UI shows."""
        what = {"skip": "skipped", "nil": "NIL (not in the KB)"}.get(
            self.action, f"{self.entity_name or self.entity_id} ({self.entity_id})")
        again = " (already saved)" if self.replayed else ""
        return f"saved{again}: task {self.task_id} -> {what}" + (f"; {self.progress}" if self.progress else "")


@dataclass(frozen=True)
class UndoResult:
    undone: Decision
    view: TaskView   # the task of the undone decision, on screen again


class AnnotationQueue:
    """The queue of one project. Thread-safe as the store is (a connection per thread).

    `kb` (a mel KnowledgeBase): link decisions are checked against it and take the entity name
    from it. `linkers` ({name: Linker}): tasks without predictions yet are linked on demand when
    shown (annotations.preannotate.ensure_predictions), so annotators can start before the
    pre-annotation run has finished.
    """

    def __init__(self, store: AnnotationStore, project: Project | str, *, kb=None, linkers: dict | None = None,
                 k: int = 20):
        self.store = store
        self.project = get_project(store, project)
        self.kb = kb
        self.linkers = dict(linkers or {})
        self.k = k

    # -- showing tasks -------------------------------------------------------------------------
    def next_task(self, annotator: str, *, by: str | None = None) -> TaskView | None:
        """The task on the annotator's screen if it is still open to them, else the next one assigned
        to them (None when they have nothing left). It becomes the task their saves are bound to."""
        annotator = _acting(annotator, by)
        project = self.project = get_project(self.store, self.project)
        fresh_since = _iso(time.time() - project.settings.lease_minutes * 60)
        _require_member(project, annotator)
        team = project.settings.annotators

        def assign(conn):
            row = conn.execute("SELECT task_id FROM queue_cursors WHERE project_id = ? AND annotator = ?",
                               (project.id, annotator)).fetchone()
            if row and row[0] is not None and _standing_action(conn, row[0], annotator) in (None, "skip"):
                return row[0]  # still open to them (a reload shows the same task)
            found = conn.execute(_NEXT_SQL, {"p": project.id, "a": annotator, "fresh": fresh_since,
                                             "n": project.settings.annotations_per_task, "team": len(team),
                                             "i": team.index(annotator) if team else -1}).fetchone()
            task_id = found[0] if found else None
            _set_cursor(conn, project.id, annotator, task_id)
            return task_id

        task_id = self.store._write("assign the next task", assign)
        return None if task_id is None else self._view(annotator, task_id)

    def current(self, annotator: str, *, by: str | None = None) -> TaskView | None:
        """The task on the annotator's screen (None between tasks); assigns nothing."""
        annotator = _acting(annotator, by)
        row = self.store.db.execute("SELECT task_id FROM queue_cursors WHERE project_id = ? AND annotator = ?",
                                    (self.project.id, annotator)).fetchone()
        return self._view(annotator, row[0]) if row and row[0] else None

    def history(self, annotator: str, *, by: str | None = None) -> list[Decision]:
        """The annotator's standing decisions in this project, one per task, in the order the tasks
        were first decided (changing a decision keeps its place). Skips are not listed."""
        annotator = _acting(annotator, by)
        rows = self.store.db.execute(_HISTORY_SQL, {"p": self.project.id, "a": annotator}).fetchall()
        return [self._decision(r[0]) for r in rows]

    def back(self, annotator: str, *, by: str | None = None) -> TaskView | None:
        """The previous task of the annotator's history (from a new task: their latest decision).
        None when there is no history; at the first entry it stays there."""
        annotator = _acting(annotator, by)
        history = [d.task_id for d in self.history(annotator)]
        if not history:
            return None
        current = self._cursor(annotator)
        i = history.index(current) - 1 if current in history else len(history) - 1
        return self.reopen(annotator, history[max(i, 0)])

    def forward(self, annotator: str, *, by: str | None = None) -> TaskView | None:
        """The next task of the annotator's history; past its end, the next task of the queue."""
        annotator = _acting(annotator, by)
        history = [d.task_id for d in self.history(annotator)]
        current = self._cursor(annotator)
        if current in history and history.index(current) + 1 < len(history):
            return self.reopen(annotator, history[history.index(current) + 1])
        if current in history:
            self.store._write("leave the history", lambda conn: _set_cursor(conn, self.project.id, annotator, None))
        return self.next_task(annotator)

    def reopen(self, annotator: str, task_id: str, *, by: str | None = None) -> TaskView:
        """Put a task the annotator decided back on their screen, to look at or change the decision."""
        annotator = _acting(annotator, by)

        def move(conn):
            self._task_in_project(conn, task_id)
            if _standing_action(conn, task_id, annotator) in (None, "skip"):
                raise NotAllowedError(f"task {task_id} is not in {annotator}'s history; only tasks you decided "
                                      f"can be reopened (use next_task for new ones)")
            _set_cursor(conn, self.project.id, annotator, task_id)
        self.store._write("reopen the task", move)
        return self._view(annotator, task_id)

    # -- saving --------------------------------------------------------------------------------
    def decide(self, annotator: str, task_id: str, action: str, entity_id: str | None = None, *, token: str,
               shown_prediction_ids: list[int] | tuple[int, ...] = (), prediction_id: int | None = None,
               entity_name: str | None = None, by: str | None = None) -> DecisionAck:
        """Save a decision for the task on the annotator's screen; returns once it is committed.

        action: accept_gemel | accept_dim | search (entity_id = a KB id), nil, skip.
        token: unique per key press; a repeat returns the first ack and writes nothing.
        shown_prediction_ids: the predictions on screen (TaskView.prediction_ids);
        prediction_id: the one accepted (must be among them).
        Refused (StaleTaskError, nothing written) when task_id is not the task on screen, and
        (NotAllowedError) when `by`, the logged-in user, is not `annotator`.
        """
        annotator = _acting(annotator, by)
        token = _check_token(token)
        shown = _check_ids(shown_prediction_ids, prediction_id)
        action, entity_id, entity_name = self._check_decision(action, entity_id, entity_name, shown)
        # the team may have changed since the task was shown: someone taken off it saves nothing
        project = self.project = get_project(self.store, self.project)
        _require_member(project, annotator)

        def save(conn):
            replay = conn.execute("SELECT id, annotator, task_id FROM corrections WHERE client_token = ?",
                                  (token,)).fetchone()
            if replay is not None:
                if (replay[1], replay[2]) != (annotator, task_id):
                    raise InputError(f"the save token {token!r} was already used by another save; nothing was "
                                     f"saved. Give every key press its own token")
                return replay[0], True
            mention_id = self._task_in_project(conn, task_id)
            cursor = conn.execute("SELECT task_id, since FROM queue_cursors WHERE project_id = ? AND annotator = ?",
                                  (project.id, annotator)).fetchone()
            on_screen = cursor[0] if cursor else None
            if on_screen != task_id:
                raise StaleTaskError(
                    f"task {task_id} is not the task on {annotator}'s screen "
                    f"({'task ' + on_screen + ' is' if on_screen else 'no task is'}); nothing was saved. "
                    f"The screen changed since this key was pressed: decide on the task shown now")
            if shown:
                marks = ",".join("?" * len(shown))
                known = {r[0] for r in conn.execute(
                    f"SELECT id FROM predictions WHERE mention_id = ? AND id IN ({marks})", (mention_id, *shown))}
                if known != set(shown):
                    raise InputError(f"prediction(s) {sorted(set(shown) - known)} do not belong to task {task_id}; "
                                     f"nothing was saved")
            previous = conn.execute(
                f"SELECT id FROM corrections WHERE task_id = ? AND annotator = ? AND {STANDING} "
                "AND action != 'skip' ORDER BY id DESC LIMIT 1", (task_id, annotator)).fetchone()
            cur = conn.execute(
                "INSERT INTO corrections (mention_id, annotator, action, entity_id, entity_name, prediction_id, kb, "
                "created, task_id, shown_predictions, client_token, supersedes, shown_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (mention_id, annotator, action, entity_id, entity_name, prediction_id, project.kb_stamp, utc_now(),
                 task_id, json.dumps(shown), token, previous[0] if previous else None, cursor[1]))
            _set_cursor(conn, project.id, annotator, None)
            return cur.lastrowid, False

        correction_id, replayed = self.store._write("save the decision", save)
        return self._ack(correction_id, replayed)

    def skip(self, annotator: str, task_id: str, *, token: str,
             shown_prediction_ids: list[int] | tuple[int, ...] = (), by: str | None = None) -> DecisionAck:
        """Put the task on screen at the end of the annotator's queue (recorded as a 'skip' decision)."""
        return self.decide(annotator, task_id, "skip", token=token, shown_prediction_ids=shown_prediction_ids, by=by)

    def undo(self, annotator: str, decision_id: int | None = None, *, by: str | None = None) -> UndoResult | None:
        """Undo one of the annotator's decisions in this project: `decision_id` (what the UI's last ack
        said; undoing it again changes nothing, so a doubled key press undoes once), else their latest.
        The task goes back on their screen. None when there is nothing to undo. A decision a review
        sent back cannot be undone (it no longer stands; the task is open again)."""
        annotator = _acting(annotator, by)
        project = self.project

        def undo(conn):
            if decision_id is None:
                row = conn.execute(
                    "SELECT c.id, c.task_id FROM corrections c JOIN tasks t ON t.id = c.task_id "
                    f"WHERE t.project_id = ? AND c.annotator = ? AND {standing('c')} ORDER BY c.id DESC LIMIT 1",
                    (project.id, annotator)).fetchone()
                if row is None:
                    return None
            else:
                row = conn.execute("SELECT c.id, c.task_id, c.annotator, c.returned_by FROM corrections c JOIN tasks t "
                                   "ON t.id = c.task_id WHERE c.id = ? AND t.project_id = ?",
                                   (decision_id, project.id)).fetchone()
                if row is None:
                    raise InputError(f"no decision {decision_id} in project {project.name!r}")
                if row[2] != annotator:
                    raise NotAllowedError(f"decision {decision_id} belongs to another annotator; only its author "
                                          f"can undo it")
                if row[3] is not None:
                    raise NotAllowedError(f"decision {decision_id} was sent back by a review; it no longer stands, "
                                          f"so there is nothing to undo: decide task {row[1]} again from the queue")
            conn.execute("UPDATE corrections SET undone_at = ? WHERE id = ? AND undone_at IS NULL",
                         (utc_now(), row[0]))
            _set_cursor(conn, project.id, annotator, row[1])
            return row[0], row[1]

        undone = self.store._write("undo the decision", undo)
        if undone is None:
            return None
        return UndoResult(self._decision(undone[0]), self._view(annotator, undone[1]))

    def flag(self, annotator: str, task_id: str, comment: str, *, by: str | None = None) -> Flag:
        """Flag a task for review. The task must be on the annotator's screen or in their history."""
        annotator = _acting(annotator, by)
        if not isinstance(comment, str) or not comment.strip():
            raise InputError("a flag needs a comment: say what a reviewer should look at")
        if len(comment) > MAX_COMMENT_CHARS:
            raise InputError(f"the comment is longer than {MAX_COMMENT_CHARS} characters")
        check_typed_text(comment, "comment")

        def insert(conn):
            self._task_in_project(conn, task_id)
            cursor = conn.execute("SELECT task_id FROM queue_cursors WHERE project_id = ? AND annotator = ?",
                                  (self.project.id, annotator)).fetchone()
            seen = (cursor and cursor[0] == task_id) or _standing_action(conn, task_id, annotator) is not None
            if not seen:
                raise StaleTaskError(f"task {task_id} is neither on {annotator}'s screen nor in their history; "
                                     f"nothing was flagged")
            return conn.execute("INSERT INTO flags (task_id, annotator, comment, created) VALUES (?,?,?,?)",
                                (task_id, annotator, comment.strip(), utc_now())).lastrowid

        flag_id = self.store._write("flag the task", insert)
        return self._flags("f.id = ?", [flag_id])[0]

    def flags(self, *, unresolved_only: bool = True) -> list[Flag]:
        """The project's flags of every annotator, oldest first: for reviewers only (the app checks the
        role); an annotator's own flags come with their TaskView."""
        return self._flags("t.project_id = ?" + (" AND f.resolved_at IS NULL" if unresolved_only else ""),
                           [self.project.id])

    def resolve_flag(self, flag_id: int, reviewer: str) -> Flag:
        reviewer = _check_annotator(reviewer)
        self.store._write("resolve the flag", lambda conn: conn.execute(
            "UPDATE flags SET resolved_at = ?, resolved_by = ? WHERE id = ? AND resolved_at IS NULL",
            (utc_now(), reviewer, flag_id)))
        found = self._flags("f.id = ?", [flag_id])
        if not found:
            raise InputError(f"no flag {flag_id}")
        return found[0]

    def progress(self, annotator: str | None = None) -> Progress:
        return progress(self.store, get_project(self.store, self.project), annotator)

    # -- helpers -------------------------------------------------------------------------------
    def _check_decision(self, action: str, entity_id: str | None, entity_name: str | None,
                        shown: list[int]) -> tuple[str, str | None, str]:
        """The same rules as AnnotationStore.record_correction (and the table's CHECKs)."""
        if action not in ACTIONS:
            raise InputError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        if action == "skip":
            return action, None, ""
        if action == "nil":
            if entity_id not in (None, NIL):
                raise InputError(f"action 'nil' takes no entity (got {entity_id!r})")
            return action, NIL, ""
        if not entity_id or entity_id == NIL:
            raise InputError(f"action {action!r} needs the id of the chosen KB entity; use action 'nil' for "
                             f"'not in the KB'")
        if self.kb is not None:
            return action, entity_id, self.kb.get(entity_id).name  # InputError when the id is not in the KB
        if entity_name is None:
            entity_name = next((c.get("name", "") for p in self._predictions_by_id(shown) for c in p.candidates
                                if c.get("id") == entity_id), "")
        return action, entity_id, entity_name or ""

    def _task_in_project(self, conn, task_id: str) -> str:
        row = conn.execute("SELECT mention_id, project_id FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None or row[1] != self.project.id:
            raise InputError(f"no task {task_id!r} in project {self.project.name!r}; nothing was saved")
        return row[0]

    def _cursor(self, annotator: str) -> str | None:
        row = self.store.db.execute("SELECT task_id FROM queue_cursors WHERE project_id = ? AND annotator = ?",
                                    (self.project.id, annotator)).fetchone()
        return row[0] if row else None

    def _view(self, annotator: str, task_id: str) -> TaskView:
        task = get_task(self.store, task_id)
        if self.linkers:
            from .preannotate import ensure_predictions
            ensure_predictions(self.store, self.project, task, self.linkers, k=self.k)
        history = [d.task_id for d in self.history(annotator)]
        row = self.store.db.execute(
            f"SELECT id FROM corrections WHERE task_id = ? AND annotator = ? AND {STANDING} "
            "ORDER BY id DESC LIMIT 1", (task_id, annotator)).fetchone()
        decision = self._decision(row[0]) if row else None
        if decision is not None and decision.action == "skip":
            decision = None
        note = None
        if decision is None:  # came back from a review that returned this annotator's decision: say why
            back = self.store.db.execute(
                "SELECT r.comment FROM reviews r JOIN corrections c ON c.returned_by = r.id "
                "WHERE c.task_id = ? AND c.annotator = ? ORDER BY r.id DESC LIMIT 1", (task_id, annotator)).fetchone()
            note = back[0] if back else None
        return TaskView(task, self.latest_predictions(task), self.progress(annotator), decision,
                        history.index(task_id) if task_id in history else None, len(history),
                        self._flags("f.task_id = ? AND f.annotator = ?", [task_id, annotator]), note)

    def latest_predictions(self, task: Task) -> dict[str, PredictionView]:
        """The latest prediction of each of the queue's linkers (else the project's) for the task."""
        return latest_predictions(self.store, self.project, task.mention_id, list(self.linkers))

    def _predictions_by_id(self, ids: list[int]) -> list[PredictionView]:
        if not ids:
            return []
        rows = self.store.db.query(f"SELECT * FROM predictions WHERE id IN ({','.join('?' * len(ids))})", ids)
        return [_prediction_view(r) for r in rows]

    def _decision(self, correction_id: int) -> Decision:
        r = self.store.correction(correction_id)
        return Decision(r["id"], r["task_id"], r["annotator"], r["action"], r["entity_id"], r["entity_name"],
                        r["prediction_id"], json.loads(r["shown_predictions"] or "[]"), r["supersedes"],
                        r["created"], r["undone_at"])

    def _ack(self, correction_id: int, replayed: bool) -> DecisionAck:
        r = self.store.correction(correction_id)
        total = self.store.db.execute(f"SELECT count(*) FROM corrections WHERE annotator = ? AND {STANDING}",
                                      (r["annotator"],)).fetchone()[0]
        return DecisionAck(r["id"], r["mention_id"], r["annotator"], r["action"], r["entity_id"], r["entity_name"],
                           r["created"], total, task_id=r["task_id"], project=self.project.name,
                           token=r["client_token"], shown_prediction_ids=tuple(json.loads(r["shown_predictions"])),
                           prediction_id=r["prediction_id"], supersedes=r["supersedes"],
                           progress=self.progress(r["annotator"]), replayed=replayed)

    def _flags(self, where: str, params: list) -> list[Flag]:
        rows = self.store.db.query(f"SELECT f.* FROM flags f JOIN tasks t ON t.id = f.task_id WHERE {where} "
                                   f"ORDER BY f.id", params)
        return [Flag(r["id"], r["task_id"], r["annotator"], r["comment"], r["created"], r["resolved_at"],
                     r["resolved_by"]) for r in rows]


# -- SQL and small helpers --------------------------------------------------------------------------
# The next task for :a in project :p: not decided by :a (their standing row is absent or a skip),
# fewer than :n others decided it or hold it (a fresh cursor), and, with a fixed team of :team people
# (:a being number :i), one of the :n assigned to :a by position. Tasks a review sent back to :a
# first, then never-skipped tasks in queue order, then :a's skipped ones in the order they were skipped.
_NEXT_SQL = f"""
WITH standing AS (
    SELECT c.task_id, c.annotator, c.action, c.id FROM corrections c JOIN tasks t ON t.id = c.task_id
    WHERE t.project_id = :p AND c.id IN (
        SELECT max(id) FROM corrections WHERE task_id IS NOT NULL AND {STANDING} GROUP BY task_id, annotator)),
mine AS (SELECT task_id, action, id FROM standing WHERE annotator = :a),
others AS (SELECT task_id, count(*) AS n FROM standing WHERE annotator != :a AND action != 'skip' GROUP BY task_id),
held AS (SELECT task_id, count(*) AS n FROM queue_cursors
         WHERE project_id = :p AND annotator != :a AND task_id IS NOT NULL AND since > :fresh GROUP BY task_id),
returned AS (SELECT DISTINCT c.task_id FROM corrections c JOIN tasks t ON t.id = c.task_id
             WHERE t.project_id = :p AND c.annotator = :a AND c.returned_by IS NOT NULL)
SELECT t.id FROM tasks t
LEFT JOIN mine m ON m.task_id = t.id
LEFT JOIN others o ON o.task_id = t.id
LEFT JOIN held h ON h.task_id = t.id
LEFT JOIN returned r ON r.task_id = t.id
WHERE t.project_id = :p AND (m.action IS NULL OR m.action = 'skip')
  AND coalesce(o.n, 0) + coalesce(h.n, 0) < :n
  AND (:team = 0 OR (:i >= 0 AND ((:i - (t.position * :n) % :team) % :team + :team) % :team < :n))
ORDER BY r.task_id IS NULL, m.id IS NOT NULL, m.id, t.position
LIMIT 1
"""

# One row per task the annotator decided (standing, not a skip), ordered by their first decision on it.
_HISTORY_SQL = f"""
SELECT s.id FROM corrections s JOIN tasks t ON t.id = s.task_id
WHERE t.project_id = :p AND s.annotator = :a AND s.action != 'skip' AND s.id IN (
    SELECT max(id) FROM corrections WHERE annotator = :a AND task_id IS NOT NULL AND {STANDING} GROUP BY task_id)
ORDER BY (SELECT min(f.id) FROM corrections f WHERE f.task_id = s.task_id AND f.annotator = :a
          AND f.action != 'skip' AND {standing('f')})
"""


def _standing_action(conn, task_id: str, annotator: str) -> str | None:
    row = conn.execute(f"SELECT action FROM corrections WHERE task_id = ? AND annotator = ? AND {STANDING} "
                       "ORDER BY id DESC LIMIT 1", (task_id, annotator)).fetchone()
    return row[0] if row else None


def _require_member(project, annotator: str) -> None:
    """Refuse an annotator who is not on the project's fixed team (a project without one takes anyone)."""
    team = project.settings.annotators
    if team and annotator not in team:
        raise NotAllowedError(f"{annotator} is not on the team of project {project.name!r} "
                              f"({', '.join(team)}), so no task is assigned to them and nothing is saved; an admin "
                              f"adds annotators with `python -m mel annotations settings --annotators ...`")


def _acting(annotator: str, by: str | None) -> str:
    """`annotator`, checked; NotAllowedError when `by` (the logged-in user) is someone else."""
    annotator = _check_annotator(annotator)
    if by is not None and _check_annotator(by) != annotator:
        raise NotAllowedError(f"{by.strip()} cannot act as {annotator}: each annotator sees and decides only their "
                              f"own tasks (reviewers set final labels in the review, annotations.review); "
                              f"nothing was read or saved")
    return annotator


def _set_cursor(conn, project_id: int, annotator: str, task_id: str | None) -> None:
    conn.execute("INSERT INTO queue_cursors (project_id, annotator, task_id, since) VALUES (?,?,?,?) "
                 "ON CONFLICT (project_id, annotator) DO UPDATE SET task_id = excluded.task_id, since = excluded.since",
                 (project_id, annotator, task_id, utc_now()))


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".000Z"


def _check_token(token) -> str:
    if not isinstance(token, str) or not token.strip():
        raise InputError("a save needs a client token (one per key press, e.g. a UUID) so that a repeated "
                         "key press saves once")
    if len(token) > MAX_TOKEN_CHARS:
        raise InputError(f"the client token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def _check_ids(shown, prediction_id) -> list[int]:
    if isinstance(shown, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in shown):
        raise InputError(f"shown_prediction_ids must be a list of prediction ids, got {shown!r}")
    shown = list(dict.fromkeys(shown))
    if prediction_id is not None and prediction_id not in shown:
        raise InputError(f"prediction {prediction_id} was not among the predictions on screen {shown}; "
                         f"nothing was saved")
    return shown


def latest_predictions(store: AnnotationStore, project: Project, mention_id: str,
                       linkers: list[str] | None = None) -> dict[str, PredictionView]:
    """The latest prediction of each linker that links the project's tasks (`linkers`, else its
    settings.linkers) for a mention, made against the project's KB (any KB when it has none attached).
    Other linkers' predictions of the same mention (the Link tab's gemel+bm25, say) are neither shown
    with the task nor counted in the Dashboard."""
    where, params = "mention_id = ?", [mention_id]
    if project.kb_stamp:
        where, params = where + " AND kb = ?", params + [project.kb_stamp]
    linkers = list(linkers or project.settings.linkers)
    if linkers:
        where += f" AND linker IN ({','.join('?' * len(linkers))})"
        params += linkers
    rows = store.db.query(f"SELECT * FROM predictions WHERE id IN (SELECT max(id) FROM predictions WHERE {where} "
                          f"GROUP BY linker) ORDER BY id", params)
    return {r["linker"]: _prediction_view(r) for r in rows}


def _prediction_view(r: dict) -> PredictionView:
    return PredictionView(r["id"], r["linker"], r["entity_id"], r["entity_name"], r["score"],
                          json.loads(r["candidates"]), json.loads(r["details"]), r["error"], r["kb"])


__all__ = ["AnnotationQueue", "TaskView", "PredictionView", "Decision", "DecisionAck", "Flag", "UndoResult",
           "StaleTaskError"]
