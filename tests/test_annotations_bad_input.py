"""Bad input to the `annotations` commands: a clear one-line error (exit 2), and no data lost.

Each test is a case a reviewer found: an export over someone's dataset, a half-failed export, a
foreign restore, absurd project settings, unwritable --json / --out paths, an import of nothing.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image

import annotations.export as export_module
from annotations import AnnotationStore, AnnotationStoreError, export_corrections
from annotations.projects import ProjectSettings, create_project, get_project, list_projects, progress
from mel.cli import main
from mel.errors import InputError
from mel.types import Mention


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "data")
    for caption, text, label in [("Collins waves from the hatch.", "Collins", "Q1"), ("Hopper at the podium.",
                                                                                      "Hopper", "Q3")]:
        mid = s.record_mention(Mention.from_text(caption, text))
        s.record_correction("alice", mid, label, "search", entity_name=f"name of {label}")
    yield s
    s.close()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["annotations", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. an export never replaces files it did not write ------------------------------------------
def test_export_refuses_a_folder_holding_someone_elses_dataset(store, tmp_path, capsys):
    out = tmp_path / "mydata"
    out.mkdir()
    for name in ("train.jsonl", "dev.jsonl", "kb.jsonl"):
        (out / name).write_text(f'{{"mine": "{name}"}}\n')
    before = _files(out)
    code, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(out))
    line = _one_line_error(err)
    assert code == 2 and "dev.jsonl" in line and "new" in line and "empty" in line
    assert _files(out) == before
    with pytest.raises(InputError, match="not written by an export"):
        export_corrections(store, out, "jsonl")
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mydata"], "no temporary folder is left"


def test_export_into_a_previous_export_replaces_it_and_keeps_other_files(store, tmp_path):
    out = tmp_path / "exp"
    first = export_corrections(store, out, "jsonl", dev_fraction=0.5)
    assert (out / "export_report.json").is_file()
    (out / "notes.txt").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("a")
    second = export_corrections(store, out, "gemel")  # a new format: the jsonl-only files go
    assert second.n_examples == first.n_examples == 2
    assert (out / "notes.txt").read_text() == "my notes" and (out / "extra" / "a.txt").read_text() == "a"
    report = json.loads((out / "export_report.json").read_text())
    assert report["format"] == "gemel" and report["n_examples"] == 2
    assert not (out / "dev.jsonl").exists() or second.n_dev
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp"], "no temporary folder is left"


def test_export_into_an_empty_folder_works(store, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert export_corrections(store, out, "jsonl").n_examples == 2
    assert (out / "train.jsonl").is_file() and (out / "export_report.json").is_file()


# -- 2. a failed export leaves the previous one whole, and says why in one line ------------------
def test_a_failed_export_leaves_the_previous_export_and_its_report_whole(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    before = _files(out)
    mid = store.record_mention(Mention.from_text("Chelsea naps.", "Chelsea"))
    store.record_correction("alice", mid, "Q5", "search", entity_name="Chelsea")
    real = export_module._write_json

    def failing(folder, name, data, report):
        if name == "provenance.json":
            raise IsADirectoryError(21, "Is a directory", str(folder / name))
        real(folder, name, data, report)
    monkeypatch.setattr(export_module, "_write_json", failing)
    code, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(out))
    line = _one_line_error(err)
    assert code == 2 and "Is a directory" in line
    assert _files(out) == before, "the old export, report included, is as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp"], "no temporary folder is left"
    monkeypatch.undo()
    assert export_corrections(store, out, "jsonl").n_examples == 3


def test_an_export_over_a_folder_named_like_its_files_is_refused(store, tmp_path, capsys):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    (out / "provenance.json").unlink()
    (out / "provenance.json").mkdir()
    (out / "provenance.json" / "keep.txt").write_text("keep")
    before = _files(out)
    code, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(out))
    line = _one_line_error(err)
    assert code == 2 and "provenance.json" in line
    assert _files(out) == before


# -- 3. restore refuses a file that merely has a schema_version table ----------------------------
def test_restore_refuses_a_foreign_database_with_an_empty_schema_version(store, tmp_path, capsys):
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE schema_version (version INTEGER)")
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = store.path.read_bytes()
    with pytest.raises(AnnotationStoreError, match="not an annotation database backup.*nothing was changed"):
        store.restore(foreign)
    code, _, err = _run(capsys, "restore", "--db", str(store.path), "--from", str(foreign))
    line = _one_line_error(err)
    assert code == 2 and "not an annotation database backup" in line and "nothing was changed" in line
    assert store.path.read_bytes() == before
    assert not list(store.data_dir.glob("annotations-before-restore-*"))
    assert store.stats()["corrections"] == 2


# -- 4. project settings have upper bounds; a stored absurd value does not crash ----------------
@pytest.mark.parametrize("flag, value, bound", [("--annotations-per-task", "99999999999999999999999", "1,000"),
                                                 ("--lease-minutes", "99999999999999999999", "525,600")])
def test_settings_refuse_absurd_values(store, capsys, flag, value, bound):
    create_project(store, "p1")
    code, _, err = _run(capsys, "settings", "--db", str(store.path), "--project", "p1", flag, value)
    line = _one_line_error(err)
    assert code == 2 and bound in line
    assert get_project(store, "p1").settings == ProjectSettings()


def test_settings_bounds_in_the_library():
    with pytest.raises(InputError, match="at most 1,000"):
        ProjectSettings(annotations_per_task=1001)
    with pytest.raises(InputError, match="at most 525,600"):
        ProjectSettings(lease_minutes=525601)
    assert ProjectSettings(annotations_per_task=1000, lease_minutes=525600).lease_minutes == 525600


def test_a_stored_absurd_setting_is_read_within_bounds(store, capsys):
    from annotations.queue import AnnotationQueue
    project = create_project(store, "p1")
    store.db.conn.execute("UPDATE projects SET settings = ? WHERE id = ?",
                          (json.dumps({"annotations_per_task": 10**23, "lease_minutes": 10**20}), project.id))
    settings = list_projects(store)[0].settings
    assert (settings.annotations_per_task, settings.lease_minutes) == (1000, 525600)
    assert progress(store, "p1").total == 0
    assert AnnotationQueue(store, "p1").next_task("alice") is None
    code, out, err = _run(capsys, "projects", "--db", str(store.path))
    assert code == 0 and "p1" in out and "Traceback" not in err


# -- 5. agreement --json is checked before the work ----------------------------------------------
@pytest.mark.parametrize("case", ["folder", "under-a-file"])
def test_agreement_json_to_an_unwritable_path_is_refused_first(store, tmp_path, capsys, case):
    create_project(store, "p1")
    (tmp_path / "afile").write_text("x")
    target = {"folder": tmp_path, "under-a-file": tmp_path / "afile" / "a.json"}[case]
    code, out, err = _run(capsys, "agreement", "--db", str(store.path), "--project", "p1", "--json", str(target))
    line = _one_line_error(err)
    assert code == 2 and ("is a directory" in line if case == "folder" else "is a file" in line)
    assert out == "", "refused before the table is computed"


# -- 6. an import of nothing creates no project ---------------------------------------------------
def test_import_of_only_malformed_records_creates_no_project(store, tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    data.write_text("[1,2]\n")
    code, _, err = _run(capsys, "import", "--db", str(store.path), "--project", "newp", "--format", "tasks-jsonl",
                        "--data", str(data))
    line = _one_line_error(err)
    assert code == 2 and "line 1" in line and "JSON object" in line and "newp" in line
    assert list_projects(store) == []


def test_import_of_an_empty_file_creates_no_project(store, tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n")
    code, _, err = _run(capsys, "import", "--db", str(store.path), "--project", "newp", "--format", "tasks-jsonl",
                        "--data", str(data))
    assert code == 2 and "no record" in _one_line_error(err)
    assert list_projects(store) == []


# -- 7. messages that say what was wrong -----------------------------------------------------------
def test_backup_under_a_file_says_the_parent_is_a_file(store, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "backup", "--db", str(store.path), "--out", str(tmp_path / "afile" / "b.sqlite"))
    line = _one_line_error(err)
    assert code == 2 and "is a file" in line and "already exists" not in line


def test_stats_of_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    code, _, err = _run(capsys, "stats", "--db", str(tmp_path / "nonexistent"))
    line = _one_line_error(err)
    assert code == 2 and "does not exist" in line and "annotations.sqlite" in line


def test_guidelines_not_in_utf8_say_save_it_as_utf8(store, tmp_path, capsys):
    guide = tmp_path / "guide.md"
    guide.write_bytes("Règles".encode("latin-1"))
    data = tmp_path / "tasks.jsonl"
    data.write_text('{"caption": "Collins waves.", "mention": "Collins"}\n')
    code, _, err = _run(capsys, "import", "--db", str(store.path), "--project", "p", "--format", "tasks-jsonl",
                        "--data", str(data), "--guidelines", str(guide))
    line = _one_line_error(err)
    assert code == 2 and "save it as UTF-8" in line and "guide.md" in line
    assert list_projects(store) == []


# -- 4. exports into folders that cannot be renamed, interrupted swaps, the disk's errors ---------
def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _reexport_in_place(store, out: Path) -> None:
    """A previous export (dev split, notes someone added), then a jsonl export without dev into it."""
    first = export_corrections(store, out, "jsonl", dev_fraction=0.99)
    assert first.n_dev and (out / "dev.jsonl").is_file()
    (out / "notes.txt").write_text("my notes")
    inode = out.stat().st_ino
    second = export_corrections(store, out, "jsonl")
    assert second.n_dev == 0 and not (out / "dev.jsonl").exists(), "a stale export file is removed"
    assert out.stat().st_ino == inode, "OUT itself is kept (published in place)"
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / "export_report.json").read_text())["n_dev"] == 0
    assert _hidden(out) == [] and _hidden(out.parent) == [], "no temporary is left"


def test_an_export_into_a_mount_point_is_published_in_place(store, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    real = os.path.ismount
    monkeypatch.setattr(export_module.os.path, "ismount", lambda p: Path(p) == out or real(p))
    real_rename = os.rename

    def rename(src, dst, *a, **k):  # renaming a mount point fails
        if out in (Path(src), Path(dst)) and out.exists():
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_rename(src, dst, *a, **k)
    monkeypatch.setattr(export_module.os, "rename", rename)
    monkeypatch.setattr(export_module, "_exchange", lambda a, b: False, raising=False)  # nor exchanged
    _reexport_in_place(store, out)


def test_an_export_into_a_folder_whose_parent_is_read_only_is_published_in_place(store, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(export_module.os, "access",
                        lambda p, mode, *a, **k: False if Path(p) == tmp_path and mode & os.W_OK
                        else real(p, mode, *a, **k))
    _reexport_in_place(store, out)


def test_an_export_into_the_current_folder_keeps_it(store, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    out.mkdir()
    monkeypatch.chdir(out)
    _reexport_in_place(store, Path("."))
    assert Path.cwd() == out and Path.cwd().exists() and (Path(".") / "train.jsonl").is_file()


def test_an_in_place_export_that_fails_midway_is_not_declared_complete_and_is_finished_later(
        store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    (out / "notes.txt").write_text("my notes")
    monkeypatch.setattr(export_module.os.path, "ismount", lambda p: Path(p) == out)
    real, calls = os.replace, []

    def replace(src, dst, *a, **k):
        calls.append(dst)
        if Path(dst).parent == out and Path(dst).name == "kb.jsonl":
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(export_module.os, "replace", replace)
    code, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(out))
    line = _one_line_error(err)
    assert code == 2 and "partly replaced" in line and "nothing was changed" not in line
    assert not (out / "export_report.json").exists(), "a half-replaced folder is never declared complete"
    monkeypatch.setattr(export_module.os, "replace", real)
    assert export_corrections(store, out, "jsonl").n_examples == 2, "the unfinished export is taken as ours"
    assert (out / "export_report.json").is_file() and (out / "notes.txt").read_text() == "my notes"
    assert _hidden(out) == []


def test_an_interrupt_between_the_two_renames_puts_the_previous_export_back(store, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    (out / "notes.txt").write_text("my notes")
    before = _files(out)
    monkeypatch.setattr(export_module, "_exchange", lambda a, b: False, raising=False)  # no renameat2 here
    real, calls = os.rename, []

    def rename(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)
    monkeypatch.setattr(export_module.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        export_corrections(store, out, "gemel")
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp"], "no temporary folder is left"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_the_swap_exchanges_the_folders_in_one_step_on_linux(store, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")

    def rename(src, dst, *a, **k):
        raise AssertionError("no moment without OUT: the folders are exchanged, not renamed one by one")
    monkeypatch.setattr(export_module.os, "rename", rename)
    assert export_corrections(store, out, "gemel").format == "gemel"
    assert json.loads((out / "export_report.json").read_text())["format"] == "gemel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp"]


def test_a_previous_export_left_aside_by_a_killed_export_is_put_back(store, tmp_path):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    (out / "notes.txt").write_text("my notes")
    os.rename(out, tmp_path / ".exp.tmp-999999999-abcd1234")  # killed between the renames (pid gone)
    assert export_corrections(store, out, "jsonl").n_examples == 2
    assert (out / "notes.txt").read_text() == "my notes", "the files someone added survive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "exp"]


def test_a_folder_left_by_an_unfinished_export_is_taken_as_a_previous_export(store, tmp_path, capsys):
    out = tmp_path / "exp"
    export_corrections(store, out, "jsonl")
    (out / "export_report.json").unlink()  # an older export killed before its report
    (out / ".train.jsonl.tmp-999999999-abcd1234").write_text("half")
    assert export_corrections(store, out, "jsonl").n_examples == 2
    assert (out / "export_report.json").is_file() and _hidden(out) == []
    bare = tmp_path / "bare"  # only train.jsonl and images/: as likely someone's dataset
    (bare / "images").mkdir(parents=True)
    (bare / "train.jsonl").write_text("{}\n")
    code, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(bare))
    line = _one_line_error(err)
    assert code == 2 and "not written by an export" in line and "unfinished export" in line
    assert "export_report.json" in line


@pytest.mark.parametrize("code, words, not_words", [
    (errno.ENOSPC, ["free some space", "nothing was changed"], ["permission"]),
    (errno.EACCES, ["permission", "writable --out", "nothing was changed"], ["free some space"]),
    (errno.EBUSY, ["busy", "mount point"], ["free some space"]),
    (errno.EIO, ["Input/output error"], ["free some space", "permission"]),
])
def test_an_export_disk_error_is_worded_by_its_cause(store, tmp_path, capsys, monkeypatch, code, words, not_words):
    def failing(folder, name, data, report):
        raise OSError(code, os.strerror(code), str(folder / name))
    monkeypatch.setattr(export_module, "_write_json", failing)
    rc, _, err = _run(capsys, "export", "--db", str(store.path), "--format", "jsonl", "--out", str(tmp_path / "x"))
    line = _one_line_error(err).lower()
    assert rc == 2
    assert all(w.lower() in line for w in words) and not any(w.lower() in line for w in not_words), line


def test_a_reexport_links_the_images_it_has_and_keeps_the_folder_mode(store, tmp_path):
    image = tmp_path / "pic.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(image)
    mid = store.record_mention(Mention.from_text("Ride on the shuttle.", "Ride", image=str(image)))
    store.record_correction("alice", mid, "Q9", "search", entity_name="Sally Ride")
    out = tmp_path / "exp"
    assert export_corrections(store, out, "jsonl").n_images == 1
    (picture,) = (out / "images").iterdir()
    inode = picture.stat().st_ino
    out.chmod(0o750)
    assert export_corrections(store, out, "jsonl").n_images == 1
    assert (out / "images" / picture.name).stat().st_ino == inode, "linked from the previous export, not copied"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
