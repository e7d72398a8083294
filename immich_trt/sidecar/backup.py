"""Online backups of the sidecar's SQLite store.

:func:`backup_database` copies ``sidecar.db`` with SQLite's backup API while a server may
be reading and writing it (WAL mode: the copy is one consistent snapshot and a writer is
never blocked by it). Pages are copied in steps; a write by another connection between
two steps restarts the copy, so after a few restarts the rest is copied in one step,
which in WAL mode holds only a read snapshot. The copy goes to a temporary file in the
destination's folder, is checked (``PRAGMA integrity_check`` and
``PRAGMA foreign_key_check``), switched to a self-contained rollback-journal file, and
renamed into place: a destination path either holds a whole, checked backup or nothing
new.

:class:`immich_trt.sidecar.store.Store` uses :func:`write_backup` to keep a copy of a
database before it migrates its schema.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
import time
from pathlib import Path

#: Pages copied per backup step (4 KiB pages: 4 MiB a step).
STEP_PAGES = 1024
#: Seconds between steps, for the writers.
STEP_SLEEP_S = 0.005
#: Restarts (a write by another connection between two steps) before copying the rest in one step.
MAX_RESTARTS = 3

_SQLITE_FULL = 13


class BackupError(Exception):
    """A backup could not be written; the message says what to check."""


class _Restarted(Exception):
    pass


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def backup_name() -> str:
    """``sidecar-YYYYmmdd-HHMMSS.db``: the file name used when the destination is a folder."""
    return f"sidecar-{timestamp()}.db"


def open_source(db: Path) -> sqlite3.Connection:
    """A connection to the existing database ``db`` (never creates one)."""
    if not db.is_file():
        raise BackupError(
            f"no sidecar database at {db}: check IMMICH_TRT_DATA_DIR (the server's data directory)"
        )
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"cannot read {db}: {exc}") from exc
    return conn


def backup_database(db: Path | str, dest: Path | str, *, pages: int = STEP_PAGES,
                    sleep_s: float = STEP_SLEEP_S) -> Path:
    """Back up the SQLite database ``db`` to ``dest`` (a file path, or an existing folder
    for a ``sidecar-YYYYmmdd-HHMMSS.db`` in it); returns the file written.

    Raises :class:`BackupError` with a one-line message: no database at ``db``, a
    destination that cannot be written, a full disk, a copy that fails its checks."""
    db, dest = Path(db), Path(dest)
    if dest.is_dir():
        dest = _free_name(dest / backup_name())
    if dest.exists() and dest.resolve() == db.resolve():
        raise BackupError(f"{dest} is the database itself; choose another destination")
    source = open_source(db)
    try:
        return write_backup(source, dest, pages=pages, sleep_s=sleep_s)
    finally:
        source.close()


def write_backup(source: sqlite3.Connection, dest: Path, *, pages: int = STEP_PAGES,
                 sleep_s: float = STEP_SLEEP_S) -> Path:
    """Copy the open database ``source`` to ``dest`` through a checked temporary file in
    ``dest``'s folder, renamed into place when complete. Raises :class:`BackupError`."""
    folder = dest.parent
    if not folder.is_dir():
        raise BackupError(f"cannot write the backup {dest}: the folder {folder} does not exist")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BackupError(f"cannot write the backup to {folder}: {_reason(exc)}") from exc
    os.close(handle)
    temporary = Path(name)
    try:
        copy = _open_copy(temporary)
        try:
            _copy(source, copy, pages, sleep_s)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            _check(copy, dest)
        finally:
            copy.close()
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, dest)
        _fsync_folder(folder)
    except sqlite3.DatabaseError as exc:
        _remove(temporary)
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc):
            raise BackupError(f"cannot write the backup {dest}: the disk is full") from exc
        raise BackupError(f"cannot write the backup {dest}: {exc}") from exc
    except OSError as exc:
        _remove(temporary)
        raise BackupError(f"cannot write the backup {dest}: {_reason(exc)}") from exc
    except BaseException:
        _remove(temporary)
        raise
    return dest


def _open_copy(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _copy(source: sqlite3.Connection, copy: sqlite3.Connection, pages: int, sleep_s: float) -> None:
    restarts, last = 0, None

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal restarts, last
        if last is not None and remaining > last:
            restarts += 1
            if restarts > MAX_RESTARTS:
                raise _Restarted
        last = remaining

    try:
        source.backup(copy, pages=pages, progress=progress, sleep=sleep_s)
    except _Restarted:
        source.backup(copy, pages=-1)


def _check(copy: sqlite3.Connection, dest: Path) -> None:
    integrity = [row[0] for row in copy.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        raise BackupError(f"the copy for {dest} fails PRAGMA integrity_check: {'; '.join(integrity[:3])}")
    violations = copy.execute("PRAGMA foreign_key_check").fetchall()
    if violations:
        raise BackupError(f"the copy for {dest} fails PRAGMA foreign_key_check: {len(violations)} row(s)")


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({exc.strerror})"
    return exc.strerror or str(exc)


def _remove(path: Path) -> None:
    for leftover in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
