"""The annotation database deleted, replaced or restored while the store has it open.

Every acknowledged save must be in the file at the path; `annotations restore` puts a backup
back without swapping the file (SQLite's online backup API into the live database).
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from annotations import AnnotationStore, AnnotationStoreError
from annotations.store import SCHEMA_VERSION
from mel.types import Mention

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "data")
    yield s
    s.close()


def _mention(store: AnnotationStore) -> str:
    return store.record_mention(Mention.from_text("Collins waves from the hatch.", "Collins"), source="test")


def _save(store: AnnotationStore, mention_id: str, entity_id: str):
    return store.record_correction("alice", mention_id, entity_id, "search", entity_name=entity_id)


def _at_path(path: Path) -> list[str]:
    """The corrections in the file at `path`, read by a connection of its own (not the store's)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in conn.execute("SELECT entity_id FROM corrections ORDER BY id")]
    finally:
        conn.close()


def _copy_over(source: Path, path: Path) -> None:
    """Put a copy of `source` at `path` the usual hand-made way: copy beside it, rename over it."""
    tmp = path.with_name("incoming.sqlite")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def _rescue_named_in(message: str) -> Path:
    match = re.search(r"copied to (\S+annotations-rescued-\S+\.sqlite)", message)
    assert match, message
    return Path(match.group(1))


def _restore_cli(db: Path, backup: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEL_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mel", "annotations", "restore", "--db", str(db),
                           "--from", str(backup)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# -- deleted while open ------------------------------------------------------------------------------
def test_deleted_database_refuses_saves_and_keeps_what_it_held(store):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    _save(store, mention_id, "Q2")
    os.remove(store.path)  # the -wal/-shm stay, as after `rm annotations.sqlite`

    with pytest.raises(AnnotationStoreError, match="deleted while it was open; nothing was saved") as err:
        _save(store, mention_id, "Q3")
    message = str(err.value)
    assert "python -m mel annotations restore" in message
    rescued = _rescue_named_in(message)
    assert _at_path(rescued) == ["Q1", "Q2"]  # every acknowledged save, copied from the open file

    # a new thread must not put an empty database where the file was
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_catch(lambda: store.stats())))
    worker.start()
    worker.join()
    assert isinstance(errors[0], AnnotationStoreError) and "deleted" in str(errors[0])
    assert not store.path.exists()
    with pytest.raises(AnnotationStoreError, match="deleted"):  # still refused, same advice
        _save(store, mention_id, "Q3")


def test_deleted_database_restored_by_the_command_is_picked_up(store):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    os.remove(store.path)
    with pytest.raises(AnnotationStoreError) as err:
        _save(store, mention_id, "Q2")
    rescued = _rescue_named_in(str(err.value))

    done = _restore_cli(store.path, rescued)
    assert done.returncode == 0, done.stderr
    assert f"restored {rescued} into {store.path}" in done.stdout and "nothing to keep" in done.stdout

    ack = _save(store, mention_id, "Q2")  # the same open store: follows the restored file
    assert ack.annotator_total == 2
    assert _at_path(store.path) == ["Q1", "Q2"]
    assert store.stats()["corrections"] == 2


# -- replaced while open -------------------------------------------------------------------------------
def test_replaced_database_is_followed_and_saves_land_in_the_new_file(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = store.backup(tmp_path / "backup.sqlite")
    _save(store, mention_id, "Q2")
    other = {}
    opened = threading.Thread(target=lambda: other.setdefault("n", store.stats()["corrections"]))
    opened.start()
    opened.join()  # a second thread has its own connection to the file, too
    assert other["n"] == 2

    _copy_over(backup, store.path)  # the old -wal/-shm (holding Q2) stay beside it

    ack = _save(store, mention_id, "Q3")
    assert ack.annotator_total == 2  # counted in the file now at the path: Q1 + Q3
    later = threading.Thread(target=lambda: other.update(ack=_save(store, mention_id, "Q4")))
    later.start()
    later.join()
    assert other["ack"].annotator_total == 3
    assert _at_path(store.path) == ["Q1", "Q3", "Q4"]  # the stale WAL (Q2) was not read into it
    assert store.stats()["corrections"] == 3
    rescued = sorted(store.data_dir.glob("annotations-rescued-*.sqlite"))
    assert len(rescued) == 1 and _at_path(rescued[0]) == ["Q1", "Q2"]  # nothing acknowledged is lost


def test_replacement_that_is_not_an_annotation_database_is_refused(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    foreign = tmp_path / "kb.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE entities (id TEXT)")
    conn.commit()
    conn.close()
    _copy_over(foreign, store.path)
    with pytest.raises(AnnotationStoreError, match="not an annotation database"):
        _save(store, mention_id, "Q2")
    conn = sqlite3.connect(store.path)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["entities"]  # left untouched
    conn.close()


def _swap_when(store: AnnotationStore, statement: str, backup: Path) -> list:
    """Put `backup` at the path as this thread's connection starts running `statement` (once).
    SQLite's trace callback runs when a statement starts, so the swap lands inside the transaction."""
    swaps = []

    def trace(sql: str) -> None:
        if sql.startswith(statement) and not swaps:
            swaps.append(sql)
            _copy_over(backup, store.path)
    store.db.conn.set_trace_callback(trace)
    return swaps


def test_swap_between_begin_and_commit_is_written_to_the_new_file(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = store.backup(tmp_path / "backup.sqlite")
    _save(store, mention_id, "Q2")
    swaps = _swap_when(store, "INSERT INTO corrections", backup)

    ack = _save(store, mention_id, "Q3")
    assert swaps and ack.annotator_total == 2  # rolled back, then written again in the file now at the path
    assert _at_path(store.path) == ["Q1", "Q3"]


def test_swap_during_commit_is_not_acknowledged(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = store.backup(tmp_path / "backup.sqlite")
    swaps = _swap_when(store, "COMMIT", backup)

    with pytest.raises(AnnotationStoreError, match="nothing was saved in the file at that path") as err:
        _save(store, mention_id, "Q2")
    assert swaps
    assert _at_path(store.path) == ["Q1"]
    assert _at_path(_rescue_named_in(str(err.value))) == ["Q1", "Q2"]  # the refused save is not lost either
    assert _save(store, mention_id, "Q2").annotator_total == 2  # saving again works, in the file at the path
    assert _at_path(store.path) == ["Q1", "Q2"]


def test_backup_copies_the_file_at_the_path_not_a_replaced_one(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    first = store.backup(tmp_path / "first.sqlite")
    _save(store, mention_id, "Q2")
    _copy_over(first, store.path)
    second = store.backup(tmp_path / "second.sqlite")
    assert _at_path(second) == ["Q1"]


def test_deleted_images_directory_is_recreated_and_the_image_stored(store, tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "red.png")
    shutil.rmtree(store.images_dir)
    sha = store.save_image(tmp_path / "red.png")
    assert store.image_path(sha) is not None and store.image_path(sha).read_bytes() == (tmp_path / "red.png").read_bytes()


# -- restore ---------------------------------------------------------------------------------------------
def test_restore_command_while_another_connection_writes(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = store.backup(tmp_path / "backups" / "b1.sqlite")
    _save(store, mention_id, "Q2")
    _save(store, mention_id, "Q3")
    identity = os.stat(store.path).st_ino

    done = _restore_cli(store.path, backup)
    assert done.returncode == 0, done.stderr
    assert f"restored {backup} into {store.path}" in done.stdout and "1 corrections" in done.stdout
    safety = Path(re.search(r"saved in (\S+)", done.stdout).group(1))
    assert safety.parent == store.data_dir and safety.name.startswith("annotations-before-restore-")
    assert _at_path(safety) == ["Q1", "Q2", "Q3"]  # the live database as it was

    assert os.stat(store.path).st_ino == identity  # restored into the live file, not swapped
    assert store.stats()["corrections"] == 1  # the open store sees the restored content at once
    ack = _save(store, mention_id, "Q4")
    assert ack.annotator_total == 2
    assert _at_path(store.path) == ["Q1", "Q4"]
    assert not list(store.data_dir.glob("annotations-rescued-*"))  # no swap happened


def test_restore_method_keeps_a_safety_copy_and_never_overwrites(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = store.backup(tmp_path / "b.sqlite")
    _save(store, mention_id, "Q2")
    first = store.restore(backup)
    _save(store, mention_id, "Q3")
    second = store.restore(backup)  # twice in the same second: a second safety copy, the first kept
    assert first["safety_copy"] != second["safety_copy"]
    assert _at_path(Path(first["safety_copy"])) == ["Q1", "Q2"]
    assert _at_path(Path(second["safety_copy"])) == ["Q1", "Q3"]
    assert first["counts"]["corrections"] == 1 and _at_path(store.path) == ["Q1"]
    assert sorted(os.listdir(tmp_path)) == ["b.sqlite", "data"]  # the backup left as it was, no -wal/-shm


def _not_sqlite(path: Path) -> Path:
    path.write_text("id,name\nQ1,Collins\n")
    return path


def _foreign(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE entities (id TEXT)")
    conn.commit()
    conn.close()
    return path


def _newer(path: Path, store: AnnotationStore) -> Path:
    store.backup(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (?, 'later')", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "no backup file at"),
    ("text", "not an annotation database backup"),
    ("foreign", "not an annotation database backup .it holds entities"),
    ("newer", "newer than this code"),
    ("live", "is the live database itself"),
    ("directory", "no backup file at"),
])
def test_restore_refuses_what_is_not_a_usable_backup(store, tmp_path, case, expected):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    backup = {"missing": lambda: tmp_path / "nope.sqlite", "text": lambda: _not_sqlite(tmp_path / "b.sqlite"),
              "foreign": lambda: _foreign(tmp_path / "b.sqlite"), "newer": lambda: _newer(tmp_path / "b.sqlite", store),
              "live": lambda: store.path, "directory": lambda: tmp_path}[case]()
    with pytest.raises(AnnotationStoreError, match=expected) as err:
        store.restore(backup)
    assert "nothing was changed" in str(err.value)
    assert _at_path(store.path) == ["Q1"]
    assert not list(store.data_dir.glob("annotations-before-restore-*"))  # refused before anything was written
    assert _save(store, mention_id, "Q2").annotator_total == 2


def test_restore_command_refuses_a_foreign_file_with_a_clear_message(store, tmp_path):
    mention_id = _mention(store)
    _save(store, mention_id, "Q1")
    done = _restore_cli(store.path, _foreign(tmp_path / "kb.sqlite"))
    assert done.returncode != 0
    assert "not an annotation database backup" in done.stderr and "nothing was changed" in done.stderr
    assert "Traceback" not in done.stderr
    assert _at_path(store.path) == ["Q1"]
    assert not list(store.data_dir.glob("annotations-before-restore-*"))


def _catch(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - returned to the test thread
        return exc
