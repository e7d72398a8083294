"""Backups of the sidecar's SQLite store: online copies while writes go on, restoring
them, the ``immich-trt backup`` command, and the copy kept before a schema migration."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_sidecar_persons import MODEL, Faces, five_identities, person_for

from immich_trt.cli import main
from immich_trt.sidecar import backup as backup_module
from immich_trt.sidecar import store as store_module
from immich_trt.sidecar.assets import AssetResults, FaceResult, OcrLine, save_results
from immich_trt.sidecar.backup import BackupError, backup_database
from immich_trt.sidecar.duplicates import find_duplicates
from immich_trt.sidecar.persons import assign_face, merge_persons, name_person, split_person
from immich_trt.sidecar.service import Sidecar
from immich_trt.sidecar.store import DB_NAME, Store, StoreError
from immich_trt.sidecar.vectors import normalise
from immich_trt.tools.testing import offline_settings


def contents(db: Path) -> dict[str, object]:
    """Every table's rows (sorted: some FTS5 shadow tables have no rowid) and the schema version."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out: dict[str, object] = {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
        out["user_version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        out["schema"] = sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall(), key=repr)
        return out
    finally:
        conn.close()


def checks(db: Path) -> tuple[list, list]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall(), conn.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        conn.close()


def populated(tmp_path: Path) -> Faces:
    """A store holding people's work: clustered persons, names, a merge, a split, manual
    assignments, OCR lines and a near-duplicate group."""
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    store = faces.store
    ada, bob, cyd = (person_for(faces, members[f"id{i}"]) for i in range(3))
    name_person(store, ada, "Ada")
    name_person(store, bob, "Bob")
    merge_persons(store, ada, [cyd])
    split_person(store, members["id3"][:2], name="Grace")
    assign_face(store, members["strangers"][0], bob)
    assign_face(store, members["id4"][0], None)
    clip = normalise(np.random.default_rng(1).standard_normal(512)).astype(np.float32)
    for n in range(2):
        save_results(store, AssetResults(f"{0xd0 + n:032x}", 5000 + n, 800, 600, ref=f"dup-{n}",
                                         clip=("ViT-B-32__openai", clip),
                                         ocr=("PP-OCRv5_mobile", [OcrLine([0, 0, 1, 0, 1, 1, 0, 1], "invoice 42", .9, .8)])))
    sidecar = Sidecar(offline_settings(tmp_path))
    sidecar.load_indices(store)
    assert find_duplicates(store, sidecar.clip, 0.98)
    return faces


def test_backup_while_writes_go_on_is_consistent(tmp_path: Path) -> None:
    faces = populated(tmp_path)
    db = faces.store.path
    # enough pages that a copy of a few pages a step sees many writes in between
    faces.store.conn.execute("CREATE TABLE ballast (b BLOB)")
    faces.store.conn.executemany("INSERT INTO ballast VALUES (randomblob(3000))", [()] * 3000)
    stop, written, errors = threading.Event(), [], []

    def writer() -> None:  # another connection, as a running server is
        store = Store(db)
        rng = np.random.default_rng(7)
        try:
            n = 0
            while not stop.is_set():
                face = FaceResult((1.0, 2.0, 30.0, 40.0), 0.9, normalise(rng.standard_normal(512)).astype(np.float32))
                save_results(store, AssetResults(f"{0xabc000 + n:032x}", 10 + n, 64, 64, ref=f"w-{n}", faces=(MODEL, [face])))
                name_person(store, 1, f"Ada {n}")
                written.append(n)
                n += 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            store.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 5:
            time.sleep(0.01)
        before = len(written)
        started = time.monotonic()
        target = backup_database(db, tmp_path / "copy.db", pages=8, sleep_s=0.001)
        during = len(written) - before
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert during > 0, "the writer was blocked during the backup"
    assert time.monotonic() - started < 60
    assert checks(target) == ([("ok",)], [])
    conn = sqlite3.connect(target)
    # each writer transaction stored one asset with one face: a snapshot never splits one
    assert conn.execute("SELECT count(*) FROM assets WHERE id NOT IN (SELECT asset FROM faces)").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM faces").fetchone()[0] == 34 + conn.execute(
        "SELECT count(*) FROM asset_refs WHERE ref LIKE 'w-%'").fetchone()[0]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
    conn.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy.db")] == []  # no temporary left


def test_restored_backup_holds_every_row(tmp_path: Path) -> None:
    faces = populated(tmp_path)
    db = faces.store.path
    backup = backup_database(db, tmp_path / "backup.db")
    faces.store.close()
    original = contents(db)
    assert original["persons"] and original["ocr_lines"] and original["duplicate_members"]
    assert {r[1] for r in original["persons"]} >= {"Ada", "Bob", "Grace"}
    assert any(r[-3] == "manual" for r in original["faces"])

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copyfile(backup, restored_dir / DB_NAME)  # the documented restore
    store = Store(restored_dir)
    store.close()
    assert contents(restored_dir / DB_NAME) == original
    assert not list(restored_dir.glob("*.bak"))  # same schema version: nothing migrated


def test_backup_command(tmp_path: Path, monkeypatch, capsys) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(data))
    assert main(["backup", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no sidecar database at {data / DB_NAME}" in err and "IMMICH_TRT_DATA_DIR" in err
    assert not data.exists()  # nothing created

    store = Store(data)
    name_person(store, store.conn.execute(
        "INSERT INTO persons (created_at, updated_at) VALUES (0, 0) RETURNING id").fetchone()[0], "Ada")
    store.close()
    folder = tmp_path / "backups"
    folder.mkdir()
    assert main(["backup", str(folder)]) == 0
    out = capsys.readouterr().out.strip()
    written = Path(out)
    assert written.parent == folder and written.name.startswith("sidecar-") and written.suffix == ".db"
    assert len(written.stem) == len("sidecar-YYYYmmdd-HHMMSS")
    assert contents(written) == contents(data / DB_NAME)
    assert main(["backup", str(folder)]) == 0  # the same second: a second file, the first kept
    assert len(list(folder.iterdir())) == 2

    assert main(["backup", str(tmp_path / "named.db")]) == 0
    assert (tmp_path / "named.db").is_file()

    assert main(["backup", str(tmp_path / "missing" / "x.db")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err

    assert main(["backup", str(data / DB_NAME)]) == 1
    assert "the database itself" in capsys.readouterr().err


def test_backup_to_a_read_only_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """A folder nobody may write, root included: sysfs."""
    Store(tmp_path / "data").close()
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "data"))
    assert main(["backup", "/sys"]) == 1
    assert "not writable" in capsys.readouterr().err
    assert not list(Path("/sys").glob("sidecar-*"))


@pytest.mark.parametrize(("code", "message"), [(errno.EACCES, "not writable"), (errno.ENOSPC, "the disk is full")])
def test_destination_errors(tmp_path: Path, monkeypatch, capsys, code: int, message: str) -> None:
    Store(tmp_path / "data").close()
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "data"))

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(backup_module.tempfile, "mkstemp", refuse)
    assert main(["backup", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("backup: ") and message in err


def test_disk_full_during_the_copy_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    faces = populated(tmp_path)
    real = backup_module._open_copy

    def small_disk(path: Path) -> sqlite3.Connection:
        conn = real(path)
        conn.execute("PRAGMA max_page_count=4")
        return conn

    monkeypatch.setattr(backup_module, "_open_copy", small_disk)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BackupError, match="the disk is full"):
        backup_database(faces.store.path, out / "b.db")
    assert list(out.iterdir()) == []


def test_not_a_database(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not sqlite" * 100)
    with pytest.raises(BackupError, match="cannot read"):
        backup_database(tmp_path / DB_NAME, tmp_path / "b.db")


EXTRA = """
CREATE TABLE later (id INTEGER PRIMARY KEY, note TEXT);
ALTER TABLE persons ADD COLUMN nickname TEXT;
"""


def test_migration_keeps_a_copy_of_the_older_database(tmp_path: Path, monkeypatch, caplog) -> None:
    faces = populated(tmp_path)
    db = faces.store.path
    faces.store.close()
    before = contents(db)
    assert before["user_version"] == len(store_module.MIGRATIONS)
    old = len(store_module.MIGRATIONS)

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, EXTRA])
    with caplog.at_level(logging.INFO, logger="immich_trt.sidecar"):
        store = Store(db.parent)
    assert store.version == old + 1
    store.close()
    copies = list(db.parent.glob(f"{DB_NAME}.v{old}-*.bak"))
    assert len(copies) == 1
    assert len(copies[0].name) == len(f"{DB_NAME}.v{old}-YYYYmmdd-HHMMSS.bak")
    assert contents(copies[0]) == before
    assert checks(copies[0]) == ([("ok",)], [])
    lines = [r.getMessage() for r in caplog.records if str(copies[0]) in r.getMessage()]
    assert len(lines) == 1 and caplog.records[0].levelno == logging.INFO

    Store(db.parent).close()  # up to date now: no further copy
    assert len(list(db.parent.glob("*.bak"))) == 1


def test_a_new_database_needs_no_copy(tmp_path: Path) -> None:
    Store(tmp_path).close()
    assert list(tmp_path.glob("*.bak")) == []


def test_migration_without_its_copy_leaves_the_database_untouched(tmp_path: Path, monkeypatch) -> None:
    faces = populated(tmp_path)
    db = faces.store.path
    faces.store.close()
    before = contents(db)

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, EXTRA])
    monkeypatch.setattr(backup_module.tempfile, "mkstemp", refuse)
    with pytest.raises(StoreError, match="disk is full.*not upgraded"):
        Store(db.parent)
    assert contents(db) == before
    assert list(db.parent.glob("*.bak")) == []
