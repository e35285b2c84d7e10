"""What a team lead watches: progress, speed, model acceptance and agreement of a project.

    data = dashboard_data(store, "wikimel-dev")        # DashboardData: typed, a handful of queries
    figs = figures(data)                               # {name: matplotlib Figure}, for gr.Plot
    data.annotators[0].median_seconds, data.acceptance.rate("gemel"), data.agreement.alpha

Figures are built on matplotlib's Agg backend (matplotlib.figure.Figure, no pyplot state), so UI
handlers can build them in any thread; a figure with nothing to show yet says so in words.

Definitions:
- progress: tasks by status (annotations.review: open, agreed, disagreed, reviewed, sent back);
  per annotator the tasks they decided (standing decisions, skips not counted) and, for a project
  with a fixed team, their share.
- decisions per hour: decision rows saved (a changed decision counts again; undone rows and skips
  do not), by UTC hour and annotator, every hour from the first to the last (at most `max_hours`,
  the latest ones).
- seconds per task: for each such decision, from the moment the task went on the annotator's screen
  (queue_cursors.since, kept in corrections.shown_at) to the save; for decisions saved before
  schema 3 (no shown_at), from the annotator's previous decision in the project when that was less
  than the project's lease earlier. The median, per annotator and over the project.
- model acceptance: for each standing decision, whether its label (an entity id, or NIL) is the
  answer of each model that was on the annotator's screen (the predictions it records; a model that
  failed shows no answer); "neither" when it is none of them. A direct field measure of the linkers'
  accuracy. Overall and per UTC day.
- agreement: annotations.agreement.compute_agreement.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mel.types import NIL

from .agreement import AgreementReport, compute_agreement
from .projects import Progress, Project, assigned_share, get_project, progress
from .review import STATUSES, task_labels
from .store import AnnotationStore, utc_now

MODELS = ("gemel", "dim")  # the app's two panels, in the order they are shown
MAX_HOURS = 14 * 24


@dataclass(frozen=True)
class AnnotatorStats:
    annotator: str
    decided: int                 # tasks with a standing decision
    share: int | None            # tasks assigned to them (a fixed team), else None
    skipped: int                 # tasks whose standing row is a skip
    nil: int                     # standing decisions that are NIL
    decisions_saved: int         # decision rows saved (changes count again; undone rows and skips do not)
    median_seconds: float | None
    n_timed: int                 # decisions with a known time on screen


@dataclass(frozen=True)
class Acceptance:
    """How often the decided label was each model's answer."""

    n: int                                   # decisions with at least one model answer on screen
    agreed: dict[str, int]                   # linker -> decisions whose label was its answer
    shown: dict[str, int]                    # linker -> decisions with its answer on screen
    neither: int                             # label was none of the answers on screen

    def rate(self, linker: str) -> float | None:
        """Share of the decisions that had `linker`'s answer on screen and took it."""
        return self.agreed.get(linker, 0) / self.shown[linker] if self.shown.get(linker) else None

    @property
    def neither_rate(self) -> float | None:
        return self.neither / self.n if self.n else None


@dataclass(frozen=True)
class AcceptanceBucket:
    day: str                                 # UTC day, YYYY-MM-DD
    acceptance: Acceptance


@dataclass(frozen=True)
class DashboardData:
    project: str
    generated: str
    progress: Progress                               # the project's (no annotator)
    status_counts: dict[str, int]                    # status -> tasks (STATUSES)
    annotators: tuple[AnnotatorStats, ...]
    hours: tuple[str, ...]                           # UTC hours, "YYYY-MM-DDTHH:00Z", consecutive
    decisions_per_hour: dict[str, tuple[int, ...]]   # annotator -> count per hour (aligned with hours)
    median_seconds: float | None                     # over the project
    acceptance: Acceptance
    acceptance_by_day: tuple[AcceptanceBucket, ...]
    agreement: AgreementReport
    models: tuple[str, ...] = MODELS                 # linkers found, the app's two first
    notes: tuple[str, ...] = field(default_factory=tuple)

    def annotator(self, name: str) -> AnnotatorStats:
        for a in self.annotators:
            if a.annotator == name:
                return a
        raise KeyError(f"{name} has not worked on {self.project}")


# -- data -----------------------------------------------------------------------------------------
def dashboard_data(store: AnnotationStore, project: Project | str, *, max_hours: int = MAX_HOURS) -> DashboardData:
    project = get_project(store, project)
    labels = task_labels(store, project)
    status_counts = {s: 0 for s in STATUSES}
    for label in labels.values():
        status_counts[label.status] += 1

    rows = list(store.db.query(
        "SELECT c.id, c.annotator, c.action, c.created, c.shown_at, c.undone_at FROM corrections c "
        "JOIN tasks t ON t.id = c.task_id WHERE t.project_id = ? ORDER BY c.id", [project.id]))
    skips = dict(store.db.execute(
        "SELECT annotator, count(*) FROM corrections WHERE action = 'skip' AND id IN (SELECT max(c.id) FROM "
        "corrections c JOIN tasks t ON t.id = c.task_id WHERE t.project_id = ? AND c.undone_at IS NULL "
        "AND c.returned_by IS NULL GROUP BY c.task_id, c.annotator) GROUP BY annotator", (project.id,)).fetchall())

    durations: dict[str, list[float]] = {}
    saved: dict[str, list[datetime]] = {}
    previous: dict[str, datetime] = {}
    lease = timedelta(minutes=project.settings.lease_minutes)
    for r in rows:
        created = _parse(r["created"])
        if r["undone_at"] is None and r["action"] != "skip":
            saved.setdefault(r["annotator"], []).append(created)
            start = _parse(r["shown_at"]) if r["shown_at"] else None
            if start is None and r["annotator"] in previous and created - previous[r["annotator"]] < lease:
                start = previous[r["annotator"]]
            if start is not None and created >= start:
                durations.setdefault(r["annotator"], []).append((created - start).total_seconds())
        previous[r["annotator"]] = created

    decided: dict[str, list] = {}
    for label in labels.values():
        for d in label.decisions:
            decided.setdefault(d.annotator, []).append(d)
    names = sorted(set(decided) | set(saved) | set(skips) | set(project.settings.annotators))
    total = len(labels)
    annotators = tuple(AnnotatorStats(
        a, len(decided.get(a, [])), assigned_share(project, total, a), skips.get(a, 0),
        sum(d.label == NIL for d in decided.get(a, [])), len(saved.get(a, [])),
        statistics.median(durations[a]) if durations.get(a) else None, len(durations.get(a, [])))
        for a in names)
    everything = [s for v in durations.values() for s in v]

    hours, per_hour = _per_hour(saved, max_hours)
    acceptance, by_day, models = _acceptance(store, [d for ds in decided.values() for d in ds])
    notes = []
    if not rows:
        notes.append("no decision yet")
    return DashboardData(project.name, utc_now(), progress(store, project), status_counts, annotators, hours,
                         per_hour, statistics.median(everything) if everything else None, acceptance, by_day,
                         compute_agreement(store, project, labels), models, tuple(notes))


def _per_hour(saved: dict[str, list[datetime]], max_hours: int) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    stamps = [t for ts in saved.values() for t in ts]
    if not stamps:
        return (), {}
    last = max(stamps).replace(minute=0, second=0, microsecond=0)
    first = max(min(stamps).replace(minute=0, second=0, microsecond=0), last - timedelta(hours=max_hours - 1))
    n = int((last - first).total_seconds() // 3600) + 1
    hours = tuple((first + timedelta(hours=i)).strftime("%Y-%m-%dT%H:00Z") for i in range(n))
    counts = {}
    for a, ts in sorted(saved.items()):
        row = [0] * n
        for t in ts:
            i = int((t.replace(minute=0, second=0, microsecond=0) - first).total_seconds() // 3600)
            if 0 <= i < n:
                row[i] += 1
        counts[a] = tuple(row)
    return hours, counts


def _acceptance(store: AnnotationStore, decisions) -> tuple[Acceptance, tuple[AcceptanceBucket, ...], tuple[str, ...]]:
    ids = sorted({i for d in decisions for i in d.prediction_ids})
    answers: dict[int, tuple[str, str | None, bool]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for pid, linker, entity_id, error in store.db.execute(
                f"SELECT id, linker, entity_id, error FROM predictions WHERE id IN ({','.join('?' * len(chunk))})",
                chunk):
            answers[pid] = (linker, entity_id if entity_id is not None else NIL, error is None)
    found = sorted({a[0] for a in answers.values()})
    models = tuple(m for m in MODELS if m in found) + tuple(m for m in found if m not in MODELS)
    overall: list[tuple[str, dict[str, bool]]] = []
    for d in decisions:
        on_screen = {answers[i][0]: answers[i][1] == d.label for i in d.prediction_ids
                     if i in answers and answers[i][2]}
        if on_screen:
            overall.append((d.created[:10], on_screen))
    days = sorted({day for day, _ in overall})
    by_day = tuple(AcceptanceBucket(day, _tally([o for dd, o in overall if dd == day], models)) for day in days)
    return _tally([o for _, o in overall], models), by_day, models or MODELS


def _tally(outcomes: list[dict[str, bool]], models) -> Acceptance:
    return Acceptance(len(outcomes), {m: sum(o.get(m, False) for o in outcomes) for m in models},
                      {m: sum(m in o for o in outcomes) for m in models},
                      sum(not any(o.values()) for o in outcomes))


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# -- figures ----------------------------------------------------------------------------------------
_STATUS_COLOURS = {"open": "#c7c7c7", "agreed": "#2ca02c", "disagreed": "#d62728", "reviewed": "#1f77b4",
                   "sent_back": "#ff7f0e"}
_MODEL_COLOURS = {"gemel": "#9467bd", "dim": "#17becf", "neither": "#7f7f7f"}


def _figure(width: float = 8.0, height: float = 3.6, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # drawn by Agg, without pyplot's global state: safe in any UI thread
    axes = fig.subplots(1, ncols)
    return fig, axes


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555555", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def progress_figure(data: DashboardData):
    """Left: the project's tasks by status (one stacked bar). Right: tasks decided per annotator (and
    their share, for a fixed team)."""
    fig, (left, right) = _figure(10, 3.6, 2)
    total = data.progress.total
    fig.suptitle(f"{data.project}: {data.progress.project_done} of {total} tasks done", fontsize=13)
    if total == 0:
        _empty(left, "no tasks yet")
    else:
        x = 0
        for status in STATUSES:
            n = data.status_counts.get(status, 0)
            if n:
                left.barh([0], [n], left=[x], color=_STATUS_COLOURS[status])
                if n / total >= 0.05:  # the segment says what it is when there is room, else just how many
                    text = f"{status.replace('_', ' ')}\n{n}" if n / total >= 0.25 else str(n)
                    left.text(x + n / 2, 0, text, ha="center", va="center",
                              fontsize=9, color="white" if status in ("agreed", "disagreed", "reviewed") else "black")
                x += n
        left.set_xlim(0, total)
        left.set_yticks([])
        left.set_xlabel("tasks")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_title("Tasks by status", fontsize=10)
        left.legend(handles=[Patch(color=_STATUS_COLOURS[s], label=f"{s.replace('_', ' ')} {n}")
                             for s, n in data.status_counts.items() if n],
                    frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28),
                    ncol=min(3, sum(1 for n in data.status_counts.values() if n)))
    people = [a for a in data.annotators if a.decided or a.share]
    if not people:
        _empty(right, "nobody has decided a task yet")
    else:
        names = [a.annotator for a in people]
        y = range(len(names))
        shares = any(a.share is not None for a in people)
        if shares:
            right.barh(list(y), [a.share or 0 for a in people], height=0.6, color="#dddddd", label="their share")
        bars = right.barh(list(y), [a.decided for a in people], height=0.6, color="#1f77b4", label="decided")
        # each bar says how far: "9 of 14" (a fixed team's share) or "9"
        right.bar_label(bars, [f"{a.decided}" + (f" of {a.share}" if a.share is not None else "") for a in people],
                        padding=3, fontsize=9)
        right.set_yticks(list(y), names)
        right.invert_yaxis()
        right.set_xlabel("tasks")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.margins(x=0.18)  # room for the labels
        right.set_title("Tasks decided per annotator")
        if shares:  # below the panel (as the status panel's): beside the bars it covered the first label
            right.legend(frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)
        for side in ("top", "right"):  # the labels past the longest bar cross no frame line
            right.spines[side].set_visible(False)
    return fig


def throughput_figure(data: DashboardData):
    """Decisions per hour, stacked by annotator."""
    fig, ax = _figure(10, 3.6)
    if not data.hours:
        _empty(ax, "no decisions yet")
        ax.set_title("Decisions per hour")
        return fig
    x = list(range(len(data.hours)))
    bottom = [0] * len(x)
    for a, counts in data.decisions_per_hour.items():
        ax.bar(x, counts, bottom=bottom, label=a, width=0.85)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    step = max(1, len(x) // 12)
    ax.set_xticks(x[::step], [h[5:13].replace("T", " ") + "h" for h in data.hours[::step]], rotation=30, ha="right")
    ax.set_xlabel("hour (UTC)")
    ax.set_ylabel("decisions")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.2)  # room for the legend above the bars
    ax.set_title(f"Decisions per hour ({sum(bottom)} in all)")
    ax.legend(frameon=False, fontsize=9, ncol=min(4, len(data.decisions_per_hour)))
    return fig


def speed_figure(data: DashboardData):
    """Median seconds per task, per annotator, with the project's median as a line."""
    fig, ax = _figure(8, 3.6)
    timed = [a for a in data.annotators if a.median_seconds is not None]
    ax.set_title("Median seconds per task")
    if not timed:
        _empty(ax, "no timed decisions yet")
        return fig
    names = [a.annotator for a in timed]
    bars = ax.bar(names, [a.median_seconds for a in timed], color="#1f77b4")
    ax.bar_label(bars, [f"{a.median_seconds:.1f} s\n({a.n_timed})" for a in timed], fontsize=9)
    if data.median_seconds is not None:
        ax.axhline(data.median_seconds, color="#d62728", linestyle="--",
                   label=f"project median {data.median_seconds:.1f} s")
        ax.legend(frameon=False, fontsize=9)
    ax.set_ylabel("seconds (task shown -> decision)")
    ax.set_xlabel("annotator")
    ax.margins(y=0.25)
    return fig


def acceptance_figure(data: DashboardData):
    """Left: how often the decided label was GEMEL's answer, DIM's, or neither. Right: the same per day."""
    fig, (left, right) = _figure(10, 3.6, 2)
    acc = data.acceptance
    fig.suptitle("Model acceptance: the annotators' label was the model's answer", fontsize=13)
    if not acc.n:
        _empty(left, "no decision with a model answer yet")
        _empty(right, "")
        return fig
    names = [m.upper() for m in data.models] + ["neither"]
    rates = [100 * (acc.rate(m) or 0) for m in data.models] + [100 * (acc.neither_rate or 0)]
    bars = left.bar(names, rates, color=[_MODEL_COLOURS.get(m, "#bcbd22") for m in data.models] + ["#7f7f7f"])
    left.bar_label(bars, [f"{r:.0f}%" for r in rates], fontsize=9)
    left.set_ylim(0, 110)
    left.set_ylabel("% of decisions")
    left.set_title(f"Overall ({acc.n} decisions)")
    days = [b.day for b in data.acceptance_by_day]
    for m in data.models:
        values = [100 * r if (r := b.acceptance.rate(m)) is not None else float("nan") for b in data.acceptance_by_day]
        right.plot(days, values, marker="o", label=m.upper(), color=_MODEL_COLOURS.get(m))
    right.plot(days, [100 * (b.acceptance.neither_rate or 0) for b in data.acceptance_by_day], marker="o",
               label="neither", color="#7f7f7f", linestyle="--")
    right.set_ylim(0, 105)
    right.set_ylabel("% of decisions")
    right.set_xlabel("day (UTC)")
    right.set_title("Per day")
    right.tick_params(axis="x", rotation=30)
    right.legend(frameon=False, fontsize=9)
    return fig


def agreement_figure(data: DashboardData):
    """Cohen's kappa of every pair of annotators as a grid; alpha in the title."""
    fig, ax = _figure(6, 5)
    report = data.agreement
    alpha = "n/a" if report.alpha is None else f"{report.alpha:.2f}"
    ax.set_title(f"Agreement: Cohen's kappa per pair (Krippendorff's alpha {alpha})", fontsize=11)
    people = list(report.annotators)
    if len(people) < 2 or all(p.n_shared == 0 for p in report.pairs):
        _empty(ax, report.alpha_note or "no task decided by two annotators yet")
        return fig
    import numpy as np
    grid = np.full((len(people), len(people)), np.nan)
    text = {}
    for p in report.pairs:
        i, j = people.index(p.annotator_a), people.index(p.annotator_b)
        for a, b in ((i, j), (j, i)):
            if p.kappa is not None:
                grid[a, b] = p.kappa
            text[a, b] = (f"{p.kappa:.2f}" if p.kappa is not None else "n/a") + \
                f"\n{p.n_shared} task{'s' if p.n_shared != 1 else ''}"
    image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdYlGn")
    for (a, b), t in text.items():
        ax.text(b, a, t, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(people)), people, rotation=30, ha="right")
    ax.set_yticks(range(len(people)), people)
    fig.colorbar(image, ax=ax, label="kappa (1 = perfect, 0 = chance)")
    return fig


FIGURES = {"progress": progress_figure, "throughput": throughput_figure, "speed": speed_figure,
           "acceptance": acceptance_figure, "agreement": agreement_figure}


def figures(data: DashboardData) -> dict:
    """{name: matplotlib Figure} for every panel of the dashboard."""
    return {name: build(data) for name, build in FIGURES.items()}


def to_json(data: DashboardData) -> str:
    """The dashboard's numbers as JSON (for an API or a file)."""
    from dataclasses import asdict
    body = asdict(data)
    body["agreement"] = data.agreement.to_dict()
    return json.dumps(body, indent=2, ensure_ascii=False)


__all__ = ["AnnotatorStats", "Acceptance", "AcceptanceBucket", "DashboardData", "dashboard_data", "figures",
           "progress_figure", "throughput_figure", "speed_figure", "acceptance_figure", "agreement_figure",
           "FIGURES", "MODELS", "to_json"]
