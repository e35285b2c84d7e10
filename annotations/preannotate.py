"""Pre-annotation: every task of a project gets each linker's prediction, in batches, resumably.

    report = preannotate(store, project, {"gemel": gemel, "dim": dim}, batch_size=32, show_progress=True)
    preannotation_status(store, project)        # {"gemel": LinkerProgress(done=120, total=500), ...}
    ensure_predictions(store, project, task, linkers)   # one task, on demand, same code path

Each batch of tasks is linked with `Linker.pipe` and its predictions (stamped with the project's
KB) are written in one transaction, so a killed run loses at most the batch in flight; a rerun
links only the tasks that have no prediction from a linker yet (for the project's KB), so every
task ends with exactly one prediction per linker. The same check runs inside each transaction,
so a task linked on demand while the batch run works on it is not stored twice.

A linker that fails on a batch is retried one task at a time; the tasks it still fails on are
listed in the report and left without a prediction (a rerun, or the queue on demand, tries again).
Predictions are stored under the name the linker has in `linkers` (its key).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from mel.errors import InputError, require_whole

from .projects import Project, Task, get_project, kb_stamp, list_tasks
from .store import AnnotationStore, _prediction_row

log = logging.getLogger(__name__)
SHOWN_TO = "preannotate"  # predictions.shown_to of pre-annotations (the app writes the annotator's name)
MAX_LISTED_FAILURES = 50


@dataclass(frozen=True)
class LinkerProgress:
    linker: str
    done: int    # tasks with a prediction of this linker for the project's KB
    total: int   # tasks in the project

    def __str__(self) -> str:
        return f"{self.linker} {self.done} / {self.total}"


@dataclass(frozen=True)
class LinkFailure:
    task_id: str
    linker: str
    reason: str


@dataclass
class PreannotateReport:
    project: str
    linkers: list[str]
    n_tasks: int = 0                                     # tasks in the project
    n_batches: int = 0                                   # transactions committed
    linked: dict[str, int] = field(default_factory=dict)          # new predictions per linker
    already_present: dict[str, int] = field(default_factory=dict)  # tasks that had one before this run
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[LinkFailure] = field(default_factory=list)     # the first MAX_LISTED_FAILURES
    stopped: bool = False                                # should_stop() asked to stop between batches
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{name}: {self.linked.get(name, 0):,} linked, {self.already_present.get(name, 0):,} already had one"
                 + (f", {self.failed[name]:,} failed" if self.failed.get(name) else "") for name in self.linkers]
        text = (f"{self.project}: pre-annotated {self.n_tasks:,} tasks in {self.n_batches:,} batches, "
                f"{self.seconds:.1f} s ({'; '.join(parts)})")
        if self.stopped:
            text += "; stopped before the end: run again to continue"
        for f in self.failures[:5]:
            text += f"\n  {f.linker} failed on task {f.task_id}: {f.reason}"
        return text


def preannotation_status(store: AnnotationStore, project: Project | str,
                         linker_names: list[str] | None = None) -> dict[str, LinkerProgress]:
    """How many of the project's tasks each linker has a prediction for (default: the project's
    settings.linkers and every linker with predictions for it). Read from the database, so it also
    shows a run in another process."""
    project = get_project(store, project)
    names = list(linker_names or project.settings.linkers)
    if linker_names is None:
        names += [r[0] for r in store.db.execute(
            "SELECT DISTINCT p.linker FROM predictions p JOIN tasks t ON t.mention_id = p.mention_id "
            "WHERE t.project_id = ? AND p.kb = ? ORDER BY p.linker", (project.id, project.kb_stamp))
            if r[0] not in names]
    total = store.db.execute("SELECT count(*) FROM tasks WHERE project_id = ?", (project.id,)).fetchone()[0]
    out = {}
    for name in names:
        done = store.db.execute(
            "SELECT count(*) FROM tasks t WHERE t.project_id = ? AND EXISTS (SELECT 1 FROM predictions p "
            "WHERE p.mention_id = t.mention_id AND p.linker = ? AND p.kb = ? AND p.error IS NULL)",
            (project.id, name, project.kb_stamp)).fetchone()[0]
        out[name] = LinkerProgress(name, done, total)
    return out


def ensure_predictions(store: AnnotationStore, project: Project | str, task: Task, linkers: dict,
                       k: int = 20) -> list[LinkFailure]:
    """Link one task with each linker that has no prediction for it yet (the queue calls this for a
    task shown before the pre-annotation reached it). Returns the failures (usually none)."""
    project = _checked_project(store, project, linkers)
    linked = _linked_mentions(store, project, linkers, mention_id=task.mention_id)
    todo = {name: [task] for name in linkers if task.mention_id not in linked[name]}
    if not any(todo.values()):
        return []
    _, failures = _link_and_store(store, project, todo, linkers, k, batch_size=1)
    return failures


def preannotate(store: AnnotationStore, project: Project | str, linkers: dict, batch_size: int = 32, *,
                k: int = 20, on_progress: Callable[[dict[str, LinkerProgress]], None] | None = None,
                show_progress: bool = False, should_stop: Callable[[], bool] | None = None) -> PreannotateReport:
    """Link every task that has no prediction from a linker yet; one transaction per batch.

    on_progress(status) is called after each committed batch with preannotation_status();
    show_progress draws a tqdm bar; should_stop() is asked between batches (a stop from the app).
    """
    require_whole("batch_size", batch_size, 1)
    started = time.perf_counter()
    project = _checked_project(store, project, linkers)
    tasks = list_tasks(store, project)
    linked = _linked_mentions(store, project, linkers)
    report = PreannotateReport(project.name, list(linkers), n_tasks=len(tasks))
    for name in linkers:
        report.already_present[name] = len(linked[name])
        report.linked[name] = report.failed[name] = 0
    pending = [t for t in tasks if any(t.mention_id not in linked[name] for name in linkers)]

    from tqdm.auto import tqdm
    with tqdm(total=len(pending), desc=f"pre-annotating {project.name}", unit="task",
              disable=not show_progress) as bar:
        for start in range(0, len(pending), batch_size):
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            batch = pending[start:start + batch_size]
            todo = {name: [t for t in batch if t.mention_id not in linked[name]] for name in linkers}
            stored, failures = _link_and_store(store, project, todo, linkers, k, batch_size)
            for name, n in stored.items():
                report.linked[name] += n
            for f in failures:
                report.failed[f.linker] += 1
                if len(report.failures) < MAX_LISTED_FAILURES:
                    report.failures.append(f)
            report.n_batches += 1
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(preannotation_status(store, project, list(linkers)))
    report.seconds = time.perf_counter() - started
    return report


# -- the one code path that links and stores -----------------------------------------------------
def _checked_project(store: AnnotationStore, project: Project | str, linkers: dict) -> Project:
    project = get_project(store, project)
    if not linkers:
        raise InputError("no linkers to pre-annotate with; give at least one (e.g. --linkers gemel,dim)")
    if not project.kb_stamp:
        raise InputError(f"project {project.name!r} has no KB yet; attach one (--kb KB.sqlite) before "
                         f"pre-annotating, so that predictions say which KB they link to")
    for name, linker in linkers.items():
        kb = getattr(linker, "kb", None)
        if kb is not None and hasattr(kb, "meta") and kb_stamp(kb) != project.kb_stamp:
            raise InputError(f"linker {name!r} links against {kb_stamp(kb)}, but project {project.name!r} uses "
                             f"{project.kb_stamp}; build the linkers on the project's KB ({project.kb})")
    return project


def _linked_mentions(store: AnnotationStore, project: Project, linkers: dict,
             mention_id: str | None = None) -> dict[str, set[str]]:
    """linker -> mention ids of the project's tasks (or of the one mention) that already have its
    prediction; a task is to do for a linker when its mention id is not in that set."""
    out = {}
    only = " AND p.mention_id = ?" if mention_id else ""
    for name in linkers:
        out[name] = {r[0] for r in store.db.execute(
            "SELECT DISTINCT p.mention_id FROM predictions p JOIN tasks t ON t.mention_id = p.mention_id "
            "WHERE t.project_id = ? AND p.linker = ? AND p.kb = ? AND p.error IS NULL" + only,
            (project.id, name, project.kb_stamp) + ((mention_id,) if mention_id else ()))}
    return out


def _link_and_store(store: AnnotationStore, project: Project, todo: dict[str, list[Task]], linkers: dict,
                    k: int, batch_size: int) -> tuple[dict[str, int], list[LinkFailure]]:
    """Link each linker's tasks, then store every prediction of the batch in one transaction."""
    rows, failures = [], []
    for name, tasks in todo.items():
        if not tasks:
            continue
        for task, result in _link(name, linkers[name], tasks, k, batch_size, failures):
            if result.linker != name:
                result = dataclasses.replace(result, linker=name)
            rows.append((name, _prediction_row(task.mention_id, result, project.kb_stamp, SHOWN_TO)))

    def insert(conn):
        stored = {name: 0 for name in todo}
        for name, row in rows:
            if conn.execute("SELECT 1 FROM predictions WHERE mention_id = ? AND linker = ? AND kb = ? "
                            "AND error IS NULL", (row["mention_id"], name, row["kb"])).fetchone():
                continue  # linked meanwhile (on demand, or by another run)
            conn.execute(f"INSERT INTO predictions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                         list(row.values()))
            stored[name] += 1
        return stored

    return store._write("store the predictions", insert), failures


def _link(name: str, linker, tasks: list[Task], k: int, batch_size: int, failures: list[LinkFailure]):
    """(task, LinkResult) pairs: the batch through `pipe`, or one by one when the batch fails."""
    mentions = [t.mention for t in tasks]
    try:
        results = list(linker.pipe(mentions, k=k, batch_size=max(1, min(batch_size, len(mentions)))))
        if len(results) != len(tasks):
            raise RuntimeError(f"pipe returned {len(results)} results for {len(tasks)} mentions")
        return list(zip(tasks, results, strict=True))
    except Exception as exc:  # one bad mention must not cost the batch: retry each
        log.warning("%s failed on a batch of %d (%s); linking them one by one", name, len(tasks), exc)
    pairs = []
    for task in tasks:
        try:
            pairs.append((task, linker.link(task.mention, k=k)))
        except Exception as exc:
            failures.append(LinkFailure(task.id, name, f"{type(exc).__name__}: {exc}"))
    return pairs


__all__ = ["preannotate", "ensure_predictions", "preannotation_status", "PreannotateReport", "LinkerProgress",
           "LinkFailure"]
