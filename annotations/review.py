"""Review of a project's decisions, and the final label of every task.

    labels = task_labels(store, "wikimel-dev")            # {task_id: TaskLabel}: decisions, review, final label
    review = ReviewQueue(store, "wikimel-dev", reviewer="rita", is_reviewer=True, kb=kb)
    for item in review.items():                           # disagreements and flagged tasks, in queue order
        item.label.decisions                              # every annotator's choice
        item.predictions["gemel"], item.predictions["dim"]  # both models' latest answers
    ack = review.finalize(item.task.id, "Q42", token=click_id,
                          seen_decision_ids=item.decision_ids, seen_review_id=item.review_id)
    ack = review.send_back(item.task.id, comment="read the guidelines on bands", token=click_id)

The final label of a task (what export and training use):
- the reviewer's, when the task's latest review set one ('final');
- else the agreed label, when the task has (at least) its k = annotations_per_task standing
  decisions and they all name the same entity (or all NIL);
- else none: the task is undecided (open, or the annotators disagree and nobody reviewed it).

Labels are entity ids with NIL as a label of its own; a skip is no label. An annotator's decision on
a task is their latest standing row (a changed decision counts by its latest version; undone ones
and those a review sent back do not stand).

Every review is a new row of `reviews` (schema 3), never changed: a later review of the same task
`supersedes` the earlier one. Sending back marks the task's decisions `returned_by` (kept in the
audit trail): the task returns to the annotators' queues. Finalising or sending back resolves the
task's open flags in the reviewer's name.

Roles: the app decides who is a reviewer (MEL_REVIEWERS) and passes `is_reviewer`; without it the
ReviewQueue refuses (NotAllowedError). A reviewer never writes a decision in an annotator's name:
reviews are their own rows, and AnnotationQueue refuses calls `by` someone else.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from mel.errors import InputError
from mel.types import NIL, check_typed_text

from .projects import Project, Task, get_project, get_task
from .queue import MAX_COMMENT_CHARS, Flag, PredictionView, StaleTaskError, _check_token, latest_predictions
from .store import STANDING, AnnotationStore, NotAllowedError, _check_annotator, standing, utc_now

REVIEW_ACTIONS = ("final", "send_back")
# TaskLabel.status values
OPEN, AGREED, DISAGREED, REVIEWED, SENT_BACK = "open", "agreed", "disagreed", "reviewed", "sent_back"
STATUSES = (OPEN, AGREED, DISAGREED, REVIEWED, SENT_BACK)


@dataclass(frozen=True)
class AnnotatorLabel:
    """One annotator's standing decision on a task, as a label (an entity id or NIL)."""

    annotator: str
    decision_id: int
    label: str
    entity_name: str
    action: str              # accept_gemel | accept_dim | search | nil
    created: str
    shown_at: str | None     # when the task went on their screen (None for decisions older than schema 3)
    prediction_ids: tuple[int, ...] = ()   # the predictions that were on their screen


@dataclass(frozen=True)
class Review:
    """One row of `reviews`."""

    id: int
    task_id: str
    reviewer: str
    action: str              # final | send_back
    entity_id: str | None    # the final label (KB id or NIL); None for send_back
    entity_name: str
    comment: str
    seen_decision_ids: tuple[int, ...]
    supersedes: int | None
    created: str


@dataclass(frozen=True)
class TaskLabel:
    """Where a task stands: its decisions, its latest review and its final label."""

    task_id: str
    position: int
    required: int                              # k: decisions the project wants per task
    decisions: tuple[AnnotatorLabel, ...]      # standing ones, oldest first
    review: Review | None                      # the latest review (final or send_back)
    flagged: bool                              # has unresolved flags
    final_label: str | None
    final_name: str
    source: str | None                         # "review" | "agreement" | None (undecided)
    status: str                                # one of STATUSES

    @property
    def labels(self) -> dict[str, str]:
        """{annotator: label}."""
        return {d.annotator: d.label for d in self.decisions}

    @property
    def decision_ids(self) -> tuple[int, ...]:
        return tuple(sorted(d.decision_id for d in self.decisions))

    @property
    def reviewed(self) -> bool:
        return self.source == "review"

    @property
    def disagreement(self) -> bool:
        return len({d.label for d in self.decisions}) > 1

    @property
    def agreement(self) -> float | None:
        """Share of the task's decisions that name the final label (None without a final label or
        without decisions): 1.0 for an agreed task; for a reviewed one, how many annotators had it right."""
        if self.final_label is None or not self.decisions:
            return None
        return sum(d.label == self.final_label for d in self.decisions) / len(self.decisions)


@dataclass(frozen=True)
class ReviewItem:
    """What the review screen shows for one task."""

    task: Task
    reasons: tuple[str, ...]                   # "disagreement", "flagged"
    label: TaskLabel
    predictions: dict[str, PredictionView]     # linker -> latest prediction (GEMEL's and DIM's answers)
    flags: list[Flag] = field(default_factory=list)        # every flag of the task, open and resolved
    reviews: list[Review] = field(default_factory=list)    # the task's review history, oldest first

    @property
    def decision_ids(self) -> tuple[int, ...]:
        """Send back with finalize/send_back (`seen_decision_ids`): a change since is then refused."""
        return self.label.decision_ids

    @property
    def review_id(self) -> int | None:
        return self.label.review.id if self.label.review else None


@dataclass(frozen=True)
class ReviewAck:
    """Returned once a review is committed. `replayed`: the token was saved before; nothing new written."""

    review: Review
    label: TaskLabel
    returned_decisions: int = 0     # decisions sent back to the annotators (send_back)
    resolved_flags: int = 0
    replayed: bool = False

    def describe(self) -> str:
        r = self.review
        if r.action == "send_back":
            what = f"sent back to the annotators ({self.returned_decisions} decisions returned)"
        else:
            what = "final label NIL (not in the KB)" if r.entity_id == NIL else \
                f"final label {r.entity_name or r.entity_id} ({r.entity_id})"
        return f"saved{' (already saved)' if self.replayed else ''}: task {r.task_id} -> {what}"


# -- final labels -------------------------------------------------------------------------------------
_DECISIONS_SQL = f"""
SELECT c.id, c.task_id, c.annotator, c.action, c.entity_id, c.entity_name, c.created, c.shown_at,
       c.shown_predictions
FROM corrections c JOIN tasks t ON t.id = c.task_id
WHERE t.project_id = :p AND c.action != 'skip' AND c.id IN (
    SELECT max(c2.id) FROM corrections c2 JOIN tasks t2 ON t2.id = c2.task_id
    WHERE t2.project_id = :p AND {standing('c2')}
    GROUP BY c2.task_id, c2.annotator)
ORDER BY c.id
"""

_LATEST_REVIEW_SQL = """
SELECT r.* FROM reviews r JOIN tasks t ON t.id = r.task_id
WHERE t.project_id = :p AND r.id IN (SELECT max(id) FROM reviews GROUP BY task_id)
"""


def standing_decisions(store: AnnotationStore, project: Project | str) -> dict[str, list[AnnotatorLabel]]:
    """{task_id: its standing decisions (skips excluded), oldest first}, for tasks that have any."""
    project = get_project(store, project)
    out: dict[str, list[AnnotatorLabel]] = {}
    for r in store.db.query(_DECISIONS_SQL, {"p": project.id}):
        out.setdefault(r["task_id"], []).append(_annotator_label(r))
    return out


def task_labels(store: AnnotationStore, project: Project | str) -> dict[str, TaskLabel]:
    """{task_id: TaskLabel} for every task of the project, in queue order. Four queries whatever the
    project's size, so cheap enough for a UI refresh."""
    project = get_project(store, project)
    decisions = standing_decisions(store, project)
    reviews = {r["task_id"]: _review(r) for r in store.db.query(_LATEST_REVIEW_SQL, {"p": project.id})}
    flagged = {r[0] for r in store.db.execute(
        "SELECT DISTINCT f.task_id FROM flags f JOIN tasks t ON t.id = f.task_id "
        "WHERE t.project_id = ? AND f.resolved_at IS NULL", (project.id,))}
    k = project.settings.annotations_per_task
    return {task_id: _task_label(task_id, position, k, decisions.get(task_id, []), reviews.get(task_id),
                                 task_id in flagged)
            for task_id, position in store.db.execute(
                "SELECT id, position FROM tasks WHERE project_id = ? ORDER BY position", (project.id,))}


def _task_label(task_id: str, position: int, k: int, decisions: list[AnnotatorLabel], review: Review | None,
                flagged: bool) -> TaskLabel:
    labels = {d.label for d in decisions}
    final, name, source = None, "", None
    if review is not None and review.action == "final":
        final, name, source, status = review.entity_id, review.entity_name, "review", REVIEWED
    elif len(labels) > 1:
        status = DISAGREED
    elif decisions and len(decisions) >= k:
        final, source, status = decisions[-1].label, "agreement", AGREED
        name = next((d.entity_name for d in reversed(decisions) if d.entity_name), "")
    else:
        status = SENT_BACK if review is not None and review.action == "send_back" else OPEN
    return TaskLabel(task_id, position, k, tuple(decisions), review, flagged, final, name, source, status)


def _annotator_label(r: dict) -> AnnotatorLabel:
    return AnnotatorLabel(r["annotator"], r["id"], r["entity_id"], r["entity_name"] or "", r["action"], r["created"],
                          r["shown_at"], tuple(json.loads(r["shown_predictions"] or "[]")))


def _review(r: dict) -> Review:
    return Review(r["id"], r["task_id"], r["reviewer"], r["action"], r["entity_id"], r["entity_name"], r["comment"],
                  tuple(json.loads(r["seen_decisions"] or "[]")), r["supersedes"], r["created"])


# -- the reviewer's queue -------------------------------------------------------------------------------
class ReviewQueue:
    """The review of one project by one reviewer.

    `is_reviewer`: whether the logged-in user has the reviewer role (the app's MEL_REVIEWERS); the
    queue refuses to open without it. `kb` (a mel KnowledgeBase): final labels are checked against
    it and take their entity name from it.
    """

    def __init__(self, store: AnnotationStore, project: Project | str, *, reviewer: str, is_reviewer: bool,
                 kb=None):
        self.reviewer = _check_annotator(reviewer)
        if is_reviewer is not True:
            raise NotAllowedError(f"{self.reviewer} is not a reviewer: only reviewers (MEL_REVIEWERS) see the "
                                  f"annotators' decisions and set final labels; nothing was shown")
        self.store = store
        self.project = get_project(store, project)
        self.kb = kb

    def items(self, *, include_reviewed: bool = False, limit: int | None = None) -> list[ReviewItem]:
        """Tasks to review, in queue order: those whose annotators disagree and those with open flags.
        A reviewed task comes back only with a new flag (or with include_reviewed=True)."""
        labels = task_labels(self.store, self.project)
        wanted = [t for t in labels.values() if _reasons(t, include_reviewed)]
        if limit is not None:
            wanted = wanted[:limit]
        return [self._item(t) for t in wanted]

    def counts(self) -> dict[str, int]:
        """{status: tasks} over the project, plus "to_review" (what items() lists)."""
        labels = task_labels(self.store, self.project).values()
        counts = Counter(t.status for t in labels)
        return {**{s: counts.get(s, 0) for s in STATUSES}, "to_review": sum(1 for t in labels if _reasons(t, False))}

    def item(self, task_id: str) -> ReviewItem:
        """Any task of the project as the review screen shows it (to look at or override it)."""
        task = self._task(task_id)
        return self._item(task_labels(self.store, self.project)[task.id])

    def history(self, task_id: str) -> list[Review]:
        """Every review of the task, oldest first."""
        self._task(task_id)
        return [_review(r) for r in self.store.db.query("SELECT * FROM reviews WHERE task_id = ? ORDER BY id",
                                                        [task_id])]

    def finalize(self, task_id: str, entity_id: str, *, token: str, comment: str = "",
                 seen_decision_ids: list[int] | tuple[int, ...] | None = None, seen_review_id: int | None = None,
                 entity_name: str | None = None) -> ReviewAck:
        """Set the task's final label: a KB entity id, or NIL. `seen_decision_ids` / `seen_review_id`
        (ReviewItem.decision_ids / .review_id): when given, a change since the screen was drawn (an
        annotator changed their decision, another reviewer reviewed) is refused with StaleTaskError."""
        if not isinstance(entity_id, str) or not entity_id.strip():
            raise InputError("a final label needs an entity id, or NIL for 'not in the KB'")
        entity_id = NIL if entity_id.strip().upper() == NIL else entity_id.strip()
        name = "" if entity_id == NIL else self._entity_name(task_id, entity_id, entity_name)
        return self._save(task_id, "final", entity_id, name, comment, token, seen_decision_ids, seen_review_id)

    def send_back(self, task_id: str, *, comment: str, token: str,
                  seen_decision_ids: list[int] | tuple[int, ...] | None = None,
                  seen_review_id: int | None = None) -> ReviewAck:
        """Return the task to the annotators' queues: their decisions stop standing (they stay in the
        audit trail) and each of them gets the task again first, with `comment` (say what to look at)."""
        if not isinstance(comment, str) or not comment.strip():
            raise InputError("sending a task back needs a comment: tell the annotators what to look at")
        return self._save(task_id, "send_back", None, "", comment, token, seen_decision_ids, seen_review_id)

    # -- helpers -------------------------------------------------------------------------------------
    def _save(self, task_id, action, entity_id, entity_name, comment, token, seen_decisions, seen_review) -> ReviewAck:
        token = _check_token(token)
        comment = _check_comment(comment)
        task = self._task(task_id)
        seen = None if seen_decisions is None else tuple(sorted(dict.fromkeys(seen_decisions)))

        def save(conn):
            replay = conn.execute("SELECT id, task_id, reviewer FROM reviews WHERE client_token = ?",
                                  (token,)).fetchone()
            if replay is not None:
                if (replay[1], replay[2]) != (task.id, self.reviewer):
                    raise InputError(f"the save token {token!r} was already used by another review; nothing was "
                                     f"saved. Give every click its own token")
                return replay[0], 0, 0, True
            current = tuple(r[0] for r in conn.execute(
                "SELECT id FROM corrections WHERE action != 'skip' AND id IN (SELECT max(id) FROM corrections "
                f"WHERE task_id = ? AND {STANDING} GROUP BY annotator) ORDER BY id", (task.id,)))
            latest = conn.execute("SELECT max(id) FROM reviews WHERE task_id = ?", (task.id,)).fetchone()[0]
            if seen is not None and (seen != current or seen_review != latest):
                raise StaleTaskError(
                    f"task {task.id} changed since the review screen was drawn ("
                    + ("an annotator changed their decision" if seen != current else "another review was saved")
                    + "); nothing was saved. Look at the task again")
            review_id = conn.execute(
                "INSERT INTO reviews (task_id, reviewer, action, entity_id, entity_name, comment, seen_decisions, "
                "supersedes, client_token, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (task.id, self.reviewer, action, entity_id, entity_name, comment,
                 json.dumps(list(seen if seen is not None else current)), latest, token, utc_now())).lastrowid
            returned = 0
            if action == "send_back":  # every row of this round (older versions, skips too): none of it stands
                conn.execute("UPDATE corrections SET returned_by = ? WHERE task_id = ? AND returned_by IS NULL",
                             (review_id, task.id))
                returned = len(current)
            resolved = conn.execute("UPDATE flags SET resolved_at = ?, resolved_by = ? WHERE task_id = ? AND "
                                    "resolved_at IS NULL", (utc_now(), self.reviewer, task.id)).rowcount
            return review_id, returned, resolved, False

        review_id, returned, resolved, replayed = self.store._write(
            "save the review" if action == "final" else "send the task back", save)
        review = _review(next(iter(self.store.db.query("SELECT * FROM reviews WHERE id = ?", [review_id]))))
        return ReviewAck(review, task_labels(self.store, self.project)[review.task_id], returned, resolved, replayed)

    def _task(self, task_id: str) -> Task:
        task = get_task(self.store, task_id) if isinstance(task_id, str) else None
        if task is None or task.project_id != self.project.id:
            raise InputError(f"no task {task_id!r} in project {self.project.name!r}; nothing was saved")
        return task

    def _entity_name(self, task_id: str, entity_id: str, given: str | None) -> str:
        if self.kb is not None:
            return self.kb.get(entity_id).name  # InputError when the id is not in the KB
        if given:
            return given
        item = self.item(task_id)  # a name someone already gave it: an annotator or a model
        names = [d.entity_name for d in item.label.decisions if d.label == entity_id and d.entity_name]
        names += [c.get("name", "") for p in item.predictions.values() for c in p.candidates
                  if c.get("id") == entity_id]
        return next((n for n in names if n), "")

    def _item(self, label: TaskLabel) -> ReviewItem:
        task = get_task(self.store, label.task_id)
        predictions = latest_predictions(self.store, self.project, task.mention_id)
        flags = [Flag(r["id"], r["task_id"], r["annotator"], r["comment"], r["created"], r["resolved_at"],
                      r["resolved_by"]) for r in self.store.db.query("SELECT * FROM flags WHERE task_id = ? ORDER BY id",
                                                                     [task.id])]
        reviews = [_review(r) for r in self.store.db.query("SELECT * FROM reviews WHERE task_id = ? ORDER BY id",
                                                           [task.id])]
        return ReviewItem(task, _reasons(label, True), label, predictions, flags, reviews)


def _reasons(label: TaskLabel, include_reviewed: bool) -> tuple[str, ...]:
    """Why a task needs review ("disagreement", "flagged"); () when it does not."""
    if label.reviewed and not include_reviewed and not label.flagged:
        return ()
    reasons = []
    if label.disagreement:
        reasons.append("disagreement")
    if label.flagged:
        reasons.append("flagged")
    if label.reviewed and include_reviewed and not reasons:
        reasons.append("reviewed")
    return tuple(reasons)


def _check_comment(comment: str) -> str:
    if not isinstance(comment, str):
        raise InputError("the review comment must be text")
    if len(comment) > MAX_COMMENT_CHARS:
        raise InputError(f"the comment is longer than {MAX_COMMENT_CHARS} characters")
    check_typed_text(comment, "comment")
    return comment.strip()


__all__ = ["REVIEW_ACTIONS", "STATUSES", "OPEN", "AGREED", "DISAGREED", "REVIEWED", "SENT_BACK", "AnnotatorLabel",
           "Review", "TaskLabel", "ReviewItem", "ReviewAck", "ReviewQueue", "standing_decisions", "task_labels"]
