"""`python -m mel annotations import | preannotate | projects`: annotation projects from the command line.

    python -m mel annotations import --db DATA_DIR --project wikimel-dev --format wikimel \
        --data ../data/wikimel --split dev --limit 500 --kb wikimel.sqlite
    python -m mel annotations import --db DATA_DIR --project team --format csv --data tasks.csv --images pics/
    python -m mel annotations preannotate --db DATA_DIR --project wikimel-dev --linkers dim,gemel --preset offline
    python -m mel annotations projects --db DATA_DIR
    python -m mel annotations settings --db DATA_DIR --project team --annotations-per-task 2 \
        --annotators alice,bob,carol

--db is the app's data directory or its annotations.sqlite; it is created by `import` when missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from mel.errors import InputError

from .projects import (
    TASK_FIELDS,
    TASK_FORMATS,
    _not_utf8,
    discard_empty_project,
    get_project,
    import_tasks,
    list_projects,
    open_or_create_project,
    progress,
    update_settings,
)
from .store import DB_NAME, AnnotationStore


def add_project_commands(sub) -> None:
    """Add import, preannotate and projects to the `annotations` subcommands."""
    from mel.cli_kit import add_preset_args
    from mel.datasets import FORMATS

    p = sub.add_parser("import", help="add tasks to a project (created when new) from a dataset or a CSV/JSONL file",
                       description="Each mention becomes a task; re-importing adds nothing twice. Task files "
                                   f"({', '.join(TASK_FORMATS)}) have the columns/keys {', '.join(TASK_FIELDS)} "
                                   "(caption and a mention or start/end required; image = a file name in --images).")
    p.add_argument("--db", required=True, help="the app's data directory or its annotations.sqlite (created if new)")
    p.add_argument("--project", required=True, help="project name (created when it does not exist)")
    p.add_argument("--format", required=True, choices=FORMATS + TASK_FORMATS)
    p.add_argument("--data", required=True, help="dataset directory, or the CSV/JSONL task file (or its folder)")
    p.add_argument("--split", default=None, help="dataset split (default dev); not used by csv/tasks-jsonl")
    p.add_argument("--limit", type=int, default=None, help="import at most N records")
    p.add_argument("--kb", default=None, help="the KB the project links against (mel kb build); needed once")
    p.add_argument("--images", default=None, help="image folder for csv/tasks-jsonl (default DATA/images)")
    p.add_argument("--guidelines", default=None, help="a Markdown file of annotation guidelines for the project")
    p.add_argument("--json", action="store_true", help="print the import report as JSON")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("preannotate", help="store every task's predictions from each linker (resumable)")
    p.add_argument("--db", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--kb", default=None, help="the project's KB (default: the one given at import)")
    p.add_argument("--linkers", default=None, help="comma-separated linker names (default: the project's, gemel,dim)")
    p.add_argument("--opt", action="append", metavar="LINKER:KEY=VALUE",
                   help="a linker option, e.g. dense:query=mention+caption (repeatable)")
    p.add_argument("--batch-size", type=int, default=32, help="tasks linked and stored per transaction")
    p.add_argument("--k", type=int, default=20, help="candidates stored per prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_preset_args(p)
    p.set_defaults(func=cmd_preannotate)

    p = sub.add_parser("settings", help="show or change a project's overlap (annotations per task) and team",
                       description="Each task is decided by --annotations-per-task distinct annotators. With "
                                   "--annotators (a fixed team) every task goes to that many of them in turn, so "
                                   "each gets the same share; without it, whoever asks first.")
    p.add_argument("--db", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--annotations-per-task", type=int, default=None, metavar="K",
                   help="distinct annotators who decide each task (1: no overlap)")
    p.add_argument("--annotators", default=None,
                   help="the team, comma-separated (tasks are shared out among them); '' for an open team")
    p.add_argument("--lease-minutes", type=int, default=None,
                   help="how long a task on someone's screen is kept from the others")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("projects", help="list the projects with their progress")
    p.add_argument("--db", required=True)
    p.add_argument("--annotator", default=None, help="also show this annotator's progress")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_projects)


def _open_store(db: str, *, create: bool = False, read_only: bool = False) -> AnnotationStore:
    path = Path(db)
    if create and not path.exists():  # a new database: --db names its directory or its file
        if path.name != DB_NAME and path.suffix in (".sqlite", ".db"):
            raise InputError(f"--db {db}: the annotation database file is called {DB_NAME}; give "
                             f"DIR/{DB_NAME} or the directory DIR")
        return AnnotationStore(path.parent if path.name == DB_NAME else path)
    return AnnotationStore.from_db(path, read_only=read_only)


def cmd_import(args) -> None:
    guidelines = None
    if args.guidelines:
        try:
            guidelines = Path(args.guidelines).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"the guidelines {_not_utf8(Path(args.guidelines), exc)}") from None
        except OSError as exc:
            raise InputError(f"cannot read the guidelines {args.guidelines} ({exc.strerror or exc}); give the "
                             f"Markdown file with --guidelines") from exc
    with _open_store(args.db, create=True) as store:
        project, created = open_or_create_project(store, args.project, kb=args.kb)
        settings = None
        if guidelines is not None:  # set with the tasks, in one transaction: a refused import changes nothing
            settings = project.settings
            settings.guidelines = guidelines
        try:
            report = import_tasks(store, project, args.format, args.data, split=args.split, limit=args.limit,
                                  images=args.images, settings=settings)
        except Exception:
            if created:  # nothing imported (whatever failed): leave no empty project behind
                discard_empty_project(store, project)
            raise
        if created and not report.n_imported and discard_empty_project(store, project):
            raise InputError(_nothing_imported(report, args.data))
        done = progress(store, project)
    if args.json:
        print(json.dumps({**report.__dict__, "malformed": [m.__dict__ for m in report.malformed]},
                         indent=2, ensure_ascii=False))
        return
    print(("created project " if created else "project ") + f"{project.name!r} in {store.path}"
          + (f", KB {project.kb_stamp}" if project.kb_stamp else ", no KB yet (give --kb)"))
    if report.reader_summary:
        print(f"reader (the whole split): {report.reader_summary}")
    print(report.summary())
    print(f"progress: {done}")


def _nothing_imported(report, data) -> str:
    """Why an import into a new project gave it no task (so it was not created), in one line."""
    if not report.n_read:
        why = f"{data} holds no record"
    elif not report.malformed:
        why = f"none of the {report.n_read} records read from {data} gave a task"
    else:
        shown = "; ".join(" ".join(str(m).split()) for m in report.malformed[:3])
        more = f"; ... and {len(report.malformed) - 3} more" if len(report.malformed) > 3 else ""
        why = f"none of the {report.n_read} records read from {data} could be imported: {shown}{more}"
    fields = f" (each record with {', '.join(TASK_FIELDS)})" if report.format in TASK_FORMATS else ""
    return f"{why}; project {report.project!r} was not created. Fix the data{fields} and import again"


def cmd_preannotate(args) -> None:
    from mel.cli_kit import resolve_preset
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker, parse_options

    from .preannotate import preannotate
    from .projects import attach_kb

    with _open_store(args.db) as store:
        project = get_project(store, args.project)
        if args.kb:
            project = attach_kb(store, project, args.kb)
        if not project.kb:
            raise InputError(f"project {project.name!r} has no KB: give --kb KB.sqlite")
        names = [n.strip() for n in args.linkers.split(",") if n.strip()] if args.linkers else project.settings.linkers
        options: dict[str, list[str]] = {}
        for item in args.opt or []:
            linker, sep, option = item.partition(":")
            if not sep or linker not in names or "=" not in option:
                raise InputError(f"--opt {item!r}: write LINKER:KEY=VALUE with LINKER one of {', '.join(names)}")
            options.setdefault(linker, []).append(option)
        kb = KnowledgeBase(project.kb)
        preset = resolve_preset(args)
        linkers = {name: build_linker(name, kb, preset, **parse_options(options.get(name, []))) for name in names}
        for warning in zero_shot_warnings(linkers):
            print(warning, file=sys.stderr)
        report = preannotate(store, project, linkers, batch_size=args.batch_size, k=args.k,
                             show_progress=not args.quiet)
    print(report.summary())


def zero_shot_warnings(linkers: dict) -> list[str]:
    """A warning per GEMEL linker built without a demonstration pool (the app passes its own pool;
    on the command line it must be given, else GEMEL answers zero-shot, and worse)."""
    return [f"warning: {name} runs zero-shot (no demonstration pool), so its answers are weaker; give it one: "
            f"--opt {name}:pool_data=DIR --opt {name}:pool_format=FORMAT (a dataset's train split) or "
            f"--opt {name}:pool=EXAMPLES.jsonl"
            for name, linker in linkers.items() if hasattr(linker, "pool") and linker.pool is None]


def cmd_settings(args) -> None:
    import dataclasses
    with _open_store(args.db) as store:
        project = get_project(store, args.project)
        changes = {}
        if args.annotations_per_task is not None:
            changes["annotations_per_task"] = args.annotations_per_task
        if args.annotators is not None:
            changes["annotators"] = [a.strip() for a in args.annotators.split(",") if a.strip()]
        if args.lease_minutes is not None:
            changes["lease_minutes"] = args.lease_minutes
        if changes:  # checked as a whole (ProjectSettings refuses a team smaller than k)
            project = update_settings(store, project, dataclasses.replace(project.settings, **changes))
        s = project.settings
    team = ", ".join(s.annotators) if s.annotators else "open (whoever asks first)"
    print(f"{project.name}: {s.annotations_per_task} annotator(s) per task; team {team}; "
          f"lease {s.lease_minutes} min" + ("" if changes else " (unchanged)"))


def cmd_projects(args) -> None:
    from .preannotate import preannotation_status
    with _open_store(args.db, read_only=True) as store:
        rows = []
        for project in list_projects(store):
            rows.append((project, progress(store, project, args.annotator),
                         preannotation_status(store, project) if project.kb_stamp else {}))
    if args.json:
        print(json.dumps([{"name": p.name, "kb": p.kb, "kb_stamp": p.kb_stamp, "created": p.created,
                           "settings": json.loads(p.settings.to_json()), "progress": prog.__dict__,
                           "preannotated": {k: v.__dict__ for k, v in status.items()}}
                          for p, prog, status in rows], indent=2, ensure_ascii=False))
        return
    if not rows:
        print(f"no projects in {store.path}; create one with `python -m mel annotations import`", file=sys.stderr)
        return
    for project, prog, status in rows:
        team = f", team {', '.join(project.settings.annotators)}" if project.settings.annotators else ""
        print(f"{project.name}: {prog}; KB {project.kb_stamp or 'none'}; created {project.created}; "
              f"{project.settings.annotations_per_task} annotator(s) per task{team}")
        if status:
            print("  pre-annotated: " + ", ".join(str(s) for s in status.values()))
