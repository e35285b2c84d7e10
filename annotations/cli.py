"""`python -m mel annotations ...`: look at and export the correction store.

    python -m mel annotations stats  --db DATA_DIR/annotations.sqlite
    python -m mel annotations export --db DATA_DIR/annotations.sqlite --format jsonl --out exports/run1 \
        [--kb KB.sqlite] [--dev-fraction 0.1] [--project P [--min-agreement 0.5] [--reviewed-only]]
    python -m mel annotations agreement --db DATA_DIR --project P [--json agreement.json]
    python -m mel annotations backup --db DATA_DIR/annotations.sqlite --out backups/annotations-2025-01-01.sqlite
    python -m mel annotations restore --db DATA_DIR/annotations.sqlite --from backups/annotations-2025-01-01.sqlite

The database is opened read-only for stats and export, so they are safe while the app runs.
restore is safe while the app runs too: it checks the backup, copies the live database to
DATA_DIR/annotations-before-restore-<time>.sqlite, then copies the backup INTO the live file
(SQLite's online backup API), so the running app sees the restored content at once. Never
restore by copying a file over annotations.sqlite (or deleting it): the app notices, but
refuses to save until the file is back, or keeps going on the new file.
Having the database file is what the admin role means on the command line; the app's own
export button is shown to admins only (MEL_ADMINS).
"""
from __future__ import annotations

import json

from mel.cli_kit import check_output_file
from mel.errors import InputError

from .export import FORMATS, export_corrections
from .projects_cli import add_project_commands
from .store import AnnotationStore, restore_database


def add_parser(subparsers) -> None:
    ann = subparsers.add_parser("annotations", help="statistics and training-data export of the correction store")
    sub = ann.add_subparsers(dest="annotations_command", required=True)

    p = sub.add_parser("stats", help="counts of mentions, predictions and corrections, per annotator")
    p.add_argument("--db", required=True, help="annotations.sqlite (or the app's --data-dir)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="write final labels as training files: a project's tasks (--project), or "
                                      "the app's free-form corrections (latest correction per mention wins)")
    p.add_argument("--db", required=True, help="annotations.sqlite (or the app's --data-dir)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="jsonl (the library's format), wikimel (WikiMEL layout), gemel (GEMEL records) or parquet "
                        "(one table with annotators, times, agreement and review status; Hugging Face datasets)")
    p.add_argument("--project", default=None,
                   help="export this project's final labels (reviewed, or agreed by all its k annotators; NIL "
                        "included); without it: the app's free-form corrections")
    p.add_argument("--min-agreement", type=float, default=None, metavar="X",
                   help="with --project: only tasks where at least this share (0-1) of the annotators chose the "
                        "final label")
    p.add_argument("--reviewed-only", action="store_true", help="with --project: only tasks a reviewer labelled")
    p.add_argument("--out", required=True, help="directory to write: new (created), empty, or a previous export "
                                                "(replaced whole; other files you put there are kept)")
    p.add_argument("--kb", help="the KB the corrections link to; adds entity descriptions and aliases")
    p.add_argument("--dev-fraction", type=float, default=0.0,
                   help="share of mentions put in a dev split, chosen by hash (default 0: all train)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("backup", help="a consistent copy of the database, safe while the app writes")
    p.add_argument("--db", required=True)
    p.add_argument("--out", required=True, help="the copy to write")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="put a backup back into the live database, safe while the app runs "
                                       "(the live one is copied first)")
    p.add_argument("--db", required=True, help="annotations.sqlite (or the app's --data-dir); may be missing")
    p.add_argument("--from", dest="source", required=True, metavar="BACKUP",
                   help="the backup to restore (written by `annotations backup`, or a rescue copy)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("agreement", help="inter-annotator agreement of a project: Cohen's kappa per pair, "
                                         "Krippendorff's alpha, each annotator against the final labels")
    p.add_argument("--db", required=True, help="annotations.sqlite (or the app's --data-dir)")
    p.add_argument("--project", required=True)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    p.set_defaults(func=cmd_agreement)

    add_project_commands(sub)  # import, preannotate, projects, settings


def cmd_stats(args) -> None:
    with AnnotationStore.from_db(args.db, read_only=True) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return
    print(f"{stats['path']} (schema {stats['schema_version']}): {stats['mentions']} mentions, "
          f"{stats['images']} images, {stats['predictions']} predictions, {stats['corrections']} corrections "
          f"on {stats['corrected_mentions']} mentions ({stats['undone']} undone)")
    for annotator, c in sorted(stats["by_annotator"].items()):
        print(f"  {annotator}: {c['total']} ({c['linked']} linked, {c['nil']} NIL, {c['skip']} skipped, "
              f"{c['undone']} undone)")


def cmd_export(args) -> None:
    kb = None
    if args.kb:
        from mel.kb import KnowledgeBase
        kb = KnowledgeBase(args.kb)
    with AnnotationStore.from_db(args.db, read_only=True) as store:
        try:
            report = export_corrections(store, args.out, args.format, kb=kb, dev_fraction=args.dev_fraction,
                                        project=args.project, min_agreement=args.min_agreement,
                                        reviewed_only=args.reviewed_only)
        except OSError as exc:  # a disk error while writing
            raise InputError(_export_os_error(exc, args.out)) from exc
    print(report.summary())
    print(f"files: {', '.join(report.files)}")


def _export_os_error(exc: OSError, out: str) -> str:
    """The one-line error of an export that failed on the disk, advice chosen by the cause (errno)."""
    import errno

    from .export import PartialExportError
    where = f" ({exc.filename})" if exc.filename else ""
    if isinstance(exc, PartialExportError):  # failed while replacing the files of OUT in place
        state = (f"{out} was partly replaced and has no export_report.json, so it is not a finished export "
                 f"(the files someone added are kept); run the export again to complete it")
    else:
        state = f"nothing was changed in {out}"
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        advice = "free some space (or pick an --out on another disk) and run it again"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "permission denied: pick a writable --out (or make this one writable) and run it again"
    elif code == errno.EBUSY:
        advice = ("the folder is busy (a mount point, or in use by another program): pick another --out, "
                  "or export into a new folder inside it")
    else:
        advice = "pick another --out, or run it again"
    return f"could not write the export to {out}: {exc.strerror or exc}{where}; {state}. {advice[0].upper()}{advice[1:]}"


def cmd_agreement(args) -> None:
    from mel.paths import atomic_write

    from .agreement import compute_agreement
    if args.json:
        check_output_file(args.json)  # before the work: a bad path fails now, not after the table
    with AnnotationStore.from_db(args.db, read_only=True) as store:
        report = compute_agreement(store, args.project)
    print(report.table())
    if args.json:
        try:
            with atomic_write(args.json) as tmp:
                tmp.write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"could not write {args.json} ({exc.strerror or exc}); pick a writable path "
                             f"for --json") from exc
        print(f"written to {args.json}")


def cmd_backup(args) -> None:
    with AnnotationStore.from_db(args.db, read_only=True) as store:
        path = store.backup(args.out)
    print(f"backed up {args.db} to {path}")


def cmd_restore(args) -> None:
    report = restore_database(args.db, args.source)
    counts = report["counts"]
    print(f"restored {report['restored']} into {report['into']}: "
          + ", ".join(f"{n} {table}" for table, n in counts.items()))
    if report["safety_copy"]:
        print(f"the database as it was before the restore is saved in {report['safety_copy']}")
    else:
        print(f"there was no database at {report['into']} (deleted?), so there was nothing to keep; "
              f"it was written anew from the backup")
    if report["rescued"]:
        print(f"what the deleted database still held is saved in {report['rescued']}")
