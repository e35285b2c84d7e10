"""Inter-annotator agreement of a project, from the annotation database.

    report = compute_agreement(store, "wikimel-dev")
    print(report.table())                 # what `python -m mel annotations agreement` prints
    report.alpha, report.pair("alice", "bob").kappa, report.annotator("alice").accuracy_final
    Path("agreement.json").write_text(report.to_json())

Labels are entity ids, with NIL a label of its own; skips are not labels; a changed decision counts
by its latest standing version (annotations.review.standing_decisions).

- Cohen's kappa (scikit-learn's cohen_kappa_score) for each pair of annotators, over the tasks
  both decided, with the observed agreement beside it.
- Krippendorff's alpha, nominal (the `krippendorff` package), over the whole project: every task
  decided by at least two annotators is a unit; missing decisions are allowed.
- For each annotator, the share of their decisions that match the final label (over the tasks that
  have one: reviewed, or agreed by all k annotators) and that match a reviewer's label (reviewed
  tasks only: the stricter figure, as an agreed label counts the annotator's own vote).

A figure that is undefined (no shared task, a single annotator, one label only) is None with a
`note` saying why: never NaN.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping

from .projects import Project, get_project
from .review import TaskLabel, task_labels
from .store import AnnotationStore


@dataclass(frozen=True)
class PairAgreement:
    annotator_a: str
    annotator_b: str
    n_shared: int                 # tasks both decided
    n_agree: int                  # ... with the same label
    observed: float | None        # n_agree / n_shared
    kappa: float | None           # Cohen's kappa; None when undefined (see note)
    note: str = ""


@dataclass(frozen=True)
class AnnotatorAgreement:
    annotator: str
    n_decided: int                # tasks with a standing decision of theirs
    n_final: int                  # ... of which have a final label
    n_agree_final: int
    accuracy_final: float | None
    n_reviewed: int               # ... of which a reviewer labelled
    n_agree_reviewed: int
    accuracy_reviewed: float | None


@dataclass(frozen=True)
class AgreementReport:
    project: str
    n_tasks: int
    n_decided: int                # tasks with at least one decision
    n_overlap: int                # tasks with decisions of at least two annotators (alpha's units)
    annotators: tuple[str, ...]
    labels: tuple[str, ...]       # distinct labels used, most used first
    alpha: float | None           # Krippendorff's alpha, nominal
    alpha_note: str
    pairs: tuple[PairAgreement, ...]
    per_annotator: tuple[AnnotatorAgreement, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def pair(self, a: str, b: str) -> PairAgreement:
        for p in self.pairs:
            if {p.annotator_a, p.annotator_b} == {a, b}:
                return p
        raise KeyError(f"no pair {a} / {b} in the agreement report (annotators: {', '.join(self.annotators)})")

    def annotator(self, name: str) -> AnnotatorAgreement:
        for a in self.per_annotator:
            if a.annotator == name:
                return a
        raise KeyError(f"{name} decided no task of {self.project} (annotators: {', '.join(self.annotators)})")

    @property
    def mean_kappa(self) -> float | None:
        """Mean of the defined pairwise kappas (None when there is none)."""
        values = [p.kappa for p in self.pairs if p.kappa is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_kappa": self.mean_kappa}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def table(self) -> str:
        """A readable summary: alpha, the pair table, the per-annotator table."""
        lines = [f"agreement in {self.project}: {self.n_decided} of {self.n_tasks} tasks decided, {self.n_overlap} by "
                 f"two or more annotators; {len(self.annotators)} annotators, {len(self.labels)} labels",
                 f"Krippendorff's alpha (nominal): {_fmt(self.alpha)}" + (f"  ({self.alpha_note})" if self.alpha_note
                                                                         else "")]
        if self.pairs:
            lines += [""] + _grid(("pair", "shared", "agree", "kappa", ""),
                                  [(f"{p.annotator_a} / {p.annotator_b}", str(p.n_shared), _pct(p.observed),
                                    _fmt(p.kappa), p.note) for p in self.pairs])
        if self.per_annotator:
            lines += [""] + _grid(("annotator", "decided", "agrees with final", "with reviewer"),
                                  [(a.annotator, str(a.n_decided),
                                    f"{_pct(a.accuracy_final)} ({a.n_agree_final}/{a.n_final})",
                                    f"{_pct(a.accuracy_reviewed)} ({a.n_agree_reviewed}/{a.n_reviewed})")
                                   for a in self.per_annotator])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def compute_agreement(store: AnnotationStore, project: Project | str,
                      labels: Mapping[str, TaskLabel] | None = None) -> AgreementReport:
    """The project's agreement report; `labels` (task_labels' result) when the caller has it already."""
    project = get_project(store, project)
    labels = task_labels(store, project) if labels is None else labels
    table = {t: dict(label.labels) for t, label in labels.items() if label.decisions}
    finals = {t: (label.final_label, label.reviewed) for t, label in labels.items() if label.final_label is not None}
    return agreement_from_table(project.name, table, finals, n_tasks=len(labels))


def agreement_from_table(project: str, table: Mapping[str, Mapping[str, str]],
                         finals: Mapping[str, tuple[str, bool]] | None = None, *,
                         n_tasks: int | None = None) -> AgreementReport:
    """The report for `table` = {task: {annotator: label}} and `finals` = {task: (final label, reviewed)}."""
    finals = finals or {}
    annotators = tuple(sorted({a for row in table.values() for a in row}))
    counts: dict[str, int] = {}
    for row in table.values():
        for label in row.values():
            counts[label] = counts.get(label, 0) + 1
    labels = tuple(sorted(counts, key=lambda x: (-counts[x], x)))
    notes = []
    if not table:
        notes.append("no task has a decision yet")
    elif len(annotators) == 1:
        notes.append(f"only {annotators[0]} has decided tasks: agreement needs two annotators on the same tasks "
                     f"(set annotations_per_task to 2 or more)")
    pairs = tuple(_pair(a, b, table) for a, b in itertools.combinations(annotators, 2))
    if pairs and all(p.n_shared == 0 for p in pairs):
        notes.append("no task was decided by two annotators (annotations_per_task is 1?): kappa and alpha need "
                     "overlap")
    alpha, alpha_note, n_overlap = _alpha(table, annotators)
    per_annotator = tuple(_annotator(a, table, finals) for a in annotators)
    return AgreementReport(project, len(table) if n_tasks is None else n_tasks, len(table), n_overlap, annotators,
                           labels, alpha, alpha_note, pairs, per_annotator, tuple(notes))


def _pair(a: str, b: str, table) -> PairAgreement:
    from sklearn.metrics import cohen_kappa_score
    shared = [(row[a], row[b]) for row in table.values() if a in row and b in row]
    if not shared:
        return PairAgreement(a, b, 0, 0, None, None, "no task decided by both")
    ya, yb = [x for x, _ in shared], [y for _, y in shared]
    n_agree = sum(x == y for x, y in shared)
    observed = n_agree / len(shared)
    if len(set(ya) | set(yb)) == 1:  # chance agreement is 1: kappa = 0/0
        return PairAgreement(a, b, len(shared), n_agree, observed, None,
                             f"kappa undefined: both gave {ya[0]} to all {len(shared)} shared tasks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(ya, yb))
    if math.isnan(kappa):
        return PairAgreement(a, b, len(shared), n_agree, observed, None, "kappa undefined for these labels")
    return PairAgreement(a, b, len(shared), n_agree, observed, kappa)


def _alpha(table, annotators) -> tuple[float | None, str, int]:
    """(alpha, note, units): Krippendorff's nominal alpha over the tasks with two decisions or more."""
    import krippendorff
    import numpy as np
    units = [row for row in table.values() if len(row) >= 2]
    if len(annotators) < 2:
        return None, "needs at least two annotators", len(units)
    if not units:
        return None, "no task was decided by two annotators", 0
    values = sorted({label for row in units for label in row.values()})
    if len(values) < 2:
        return None, (f"undefined: every decision on the {len(units)} shared tasks is {values[0]} (perfect "
                      f"agreement on a single label)"), len(units)
    code = {v: i for i, v in enumerate(values)}
    data = np.full((len(annotators), len(units)), np.nan)
    for j, row in enumerate(units):
        for i, a in enumerate(annotators):
            if a in row:
                data[i, j] = code[row[a]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
    if math.isnan(alpha):
        return None, "undefined for these decisions", len(units)
    return alpha, "", len(units)


def _annotator(a: str, table, finals) -> AnnotatorAgreement:
    mine = {t: row[a] for t, row in table.items() if a in row}
    final = [(label, finals[t]) for t, label in mine.items() if t in finals]
    reviewed = [(label, f) for label, f in final if f[1]]
    n_f = sum(label == f[0] for label, f in final)
    n_r = sum(label == f[0] for label, f in reviewed)
    return AnnotatorAgreement(a, len(mine), len(final), n_f, n_f / len(final) if final else None,
                              len(reviewed), n_r, n_r / len(reviewed) if reviewed else None)


def _grid(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned, a last
    empty-headed column (notes) left as it is."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    def line(r):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) if h else c
                                           for c, w, h in zip(r[1:], widths[1:], header[1:], strict=True)]
        return "  ".join(cells).rstrip()
    return [line(header)] + [line(r) for r in rows]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


__all__ = ["PairAgreement", "AnnotatorAgreement", "AgreementReport", "compute_agreement", "agreement_from_table"]
