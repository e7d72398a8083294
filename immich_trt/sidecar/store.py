"""The sidecar's SQLite store: assets, faces, persons, OCR lines, duplicate groups, outbox,
asset thumbnails.

One database file ``<IMMICH_TRT_DATA_DIR>/sidecar.db`` in WAL mode with foreign keys on.
The schema is versioned with ``PRAGMA user_version``: :data:`MIGRATIONS` lists the steps,
applied in order inside one transaction each, so a store written by an older version is
upgraded on open and a newer one is refused. Before an existing database is upgraded, a
copy of it is written next to it (``sidecar.db.v<old>-<YYYYmmdd-HHMMSS>.bak``); a copy
that cannot be written leaves the database untouched and unopened.

Content addressing: one ``assets`` row per distinct file content (its imohash); the
caller's ids or file paths for that content are ``asset_refs`` rows, so ingesting the
same bytes twice never duplicates results, and byte-identical files under two ids are an
exact duplicate by construction.

Embeddings are stored as little-endian ``float32`` BLOBs (:func:`to_blob`).

Every write that changes what the OpenSearch mirror shows calls :meth:`Store.touch` in
the same transaction: an ``outbox`` row naming the changed entity. The mirror reads the
entity's current row when it drains (absent = delete), so a row is a change notice, and
its ``version`` makes a notice raised during a drain survive that drain.

Without a mirror (``Store(..., outbox=False)``: no ``OPENSEARCH_URL``) no notice is
written, so no backlog grows, and notices left by earlier runs (a store written while a
mirror was configured, or by a version that always wrote them) are deleted on open,
logged once. The mirror is then behind the store for good; ``immich-trt opensearch
reindex`` brings it level (it rebuilds every document from SQLite), which is what a
mirror configured later needs anyway.

The store is not thread-safe by itself: the sidecar calls it from one thread
(:class:`immich_trt.sidecar.service.Sidecar` runs every store call on a single-thread
executor).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .backup import BackupError, timestamp, write_backup

log = logging.getLogger("immich_trt.sidecar")

DB_NAME = "sidecar.db"

#: Entities the outbox can name (one OpenSearch index each).
ENTITIES = ("asset", "face", "person", "ocr_line")

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE assets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        imohash TEXT NOT NULL UNIQUE,          -- 32 hex chars, imohash 1.1 defaults
        size INTEGER NOT NULL,                 -- bytes of the encoded file
        width INTEGER NOT NULL,                -- pixels of the decoded image
        height INTEGER NOT NULL,
        clip_model TEXT,
        clip_embedding BLOB,                   -- float32[D], as the model returned it
        hidden INTEGER NOT NULL DEFAULT 0,     -- hidden by a duplicate resolution
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE asset_refs (
        ref TEXT PRIMARY KEY,                  -- caller's assetId, a file path, or "imohash:<hex>"
        asset INTEGER NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        filename TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX asset_refs_asset ON asset_refs(asset);
    CREATE TABLE asset_tasks (                 -- which (task, model) ran on an asset
        asset INTEGER NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        task TEXT NOT NULL,                    -- "clip" | "faces" | "ocr"
        model TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (asset, task, model)
    );
    CREATE TABLE persons (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        name TEXT,
        name_source TEXT CHECK (name_source IN ('user', 'import')),
        representative_face INTEGER REFERENCES faces(id) ON DELETE SET NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE faces (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        asset INTEGER NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        x1 REAL NOT NULL, y1 REAL NOT NULL,    -- pixels of the ingested image
        x2 REAL NOT NULL, y2 REAL NOT NULL,
        landmarks BLOB,                        -- float32[5, 2] pixels (eyes, nose, mouth corners)
        score REAL NOT NULL,
        embedding BLOB NOT NULL,               -- float32[512]
        thumbnail BLOB,                        -- JPEG of the face box with a margin, <= 160 px
        person INTEGER REFERENCES persons(id) ON DELETE SET NULL,
        assigned TEXT CHECK (assigned IN ('auto', 'manual')),
        clustered INTEGER NOT NULL DEFAULT 0,  -- seen by a clustering run
        created_at REAL NOT NULL
    );
    CREATE INDEX faces_asset ON faces(asset);
    CREATE INDEX faces_person ON faces(person);
    CREATE TABLE ocr_lines (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        asset INTEGER NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        line INTEGER NOT NULL,                 -- position in the OCR response
        polygon TEXT NOT NULL,                 -- JSON [x1,y1,...,x4,y4], normalised 0..1
        text TEXT NOT NULL,
        box_score REAL NOT NULL,
        text_score REAL NOT NULL
    );
    CREATE INDEX ocr_lines_asset ON ocr_lines(asset);
    CREATE VIRTUAL TABLE ocr_fts USING fts5(
        text, content='ocr_lines', content_rowid='id', tokenize='trigram'
    );
    CREATE TRIGGER ocr_lines_ai AFTER INSERT ON ocr_lines BEGIN
        INSERT INTO ocr_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER ocr_lines_ad AFTER DELETE ON ocr_lines BEGIN
        INSERT INTO ocr_fts(ocr_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    CREATE TRIGGER ocr_lines_au AFTER UPDATE ON ocr_lines BEGIN
        INSERT INTO ocr_fts(ocr_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO ocr_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TABLE duplicate_groups (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused
        kind TEXT NOT NULL CHECK (kind IN ('exact', 'near')),
        keeper INTEGER REFERENCES assets(id) ON DELETE SET NULL,   -- chosen by resolve
        resolved_at REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE duplicate_members (
        grp INTEGER NOT NULL REFERENCES duplicate_groups(id) ON DELETE CASCADE,
        asset INTEGER NOT NULL REFERENCES assets(id) ON DELETE CASCADE,
        similarity REAL,                       -- CLIP cosine to the group's closest member
        PRIMARY KEY (grp, asset)
    );
    CREATE INDEX duplicate_members_asset ON duplicate_members(asset);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        entity TEXT NOT NULL,                  -- one of ENTITIES
        entity_id INTEGER NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,    -- bumped by every later change notice
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,  -- unix seconds
        last_error TEXT,
        created_at REAL NOT NULL,
        UNIQUE (entity, entity_id)
    );
    """,
    # 2: asset thumbnails for the web page (immich_trt/sidecar/thumbnails.py), and indexes
    # that keep its pages fast on large stores
    """
    CREATE TABLE asset_thumbnails (
        asset INTEGER PRIMARY KEY REFERENCES assets(id) ON DELETE CASCADE,
        width INTEGER NOT NULL,                -- pixels of the thumbnail
        height INTEGER NOT NULL,
        data BLOB NOT NULL,                    -- WebP, longest side <= 256 px, the models' pixel frame
        created_at REAL NOT NULL
    );
    -- hidden assets are read by every search and by the status counts: no table scan
    CREATE INDEX assets_hidden ON assets(hidden) WHERE hidden = 1;
    -- a person's faces best first, and the persons' face and asset counts, from the index
    -- alone (face rows hold embeddings and crops: a scan of them reads the whole table)
    DROP INDEX faces_person;
    CREATE INDEX faces_person ON faces(person, score DESC, asset);
    """,
]


class StoreError(Exception):
    """The store cannot be opened (newer schema, unreadable file)."""


def to_blob(vector: np.ndarray) -> bytes:
    """``float32`` little-endian bytes of ``vector`` (any shape, flattened)."""
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of :func:`to_blob`: a ``float32`` array, reshaped when ``shape`` is given."""
    array = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return array.reshape(shape) if shape is not None else array


class Store:
    """An open SQLite store. ``path`` is the data directory or a ``.db`` file;
    ``outbox``: whether change notices are kept for an OpenSearch mirror (see the module
    docstring; ``False`` deletes a backlog left by earlier runs).

    Raises :class:`StoreError` when the file holds a newer schema than
    :data:`MIGRATIONS` knows, or is not an SQLite database.
    """

    def __init__(self, path: Path | str, *, outbox: bool = True) -> None:
        self.outbox = outbox
        path = Path(path)
        if path.suffix != ".db":
            path.mkdir(parents=True, exist_ok=True)
            path = path / DB_NAME
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the sidecar store {path}: {exc}") from exc
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.migrate()
            if not outbox:
                self._drop_backlog()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(f"cannot open the sidecar store {path}: {exc}") from exc
        except BaseException:
            self.conn.close()
            raise

    @property
    def version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> None:
        """Apply the missing :data:`MIGRATIONS`, each in its own transaction, after
        :meth:`backup_before_migration` when the database is not new."""
        current = self.version
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {current}; this immich-trt knows up to {len(MIGRATIONS)}"
            )
        if current < len(MIGRATIONS) and self._has_schema():
            self.backup_before_migration(current)
        for number in range(current, len(MIGRATIONS)):
            with self.transaction():
                for statement in _split_sql(MIGRATIONS[number]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={number + 1}")

    def _has_schema(self) -> bool:
        return self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0

    def backup_before_migration(self, version: int) -> Path:
        """Copy the database to ``<name>.v<version>-<YYYYmmdd-HHMMSS>.bak`` next to it.
        Raises :class:`StoreError` (nothing migrated) when the copy cannot be written."""
        target = self.path.with_name(f"{self.path.name}.v{version}-{timestamp()}.bak")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.v{version}-{timestamp()}-{n}.bak")
            n += 1
        try:
            write_backup(self.conn, target, pages=-1)
        except BackupError as exc:
            raise StoreError(
                f"{exc}; the schema of {self.path} (version {version}) was not upgraded to "
                f"{len(MIGRATIONS)} and the database is untouched"
            ) from exc
        log.info("Schema upgrade from version %d to %d: a copy of the database is in %s",
                 version, len(MIGRATIONS), target)
        return target

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""
        if self.conn.in_transaction:  # nested: join the outer transaction
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _drop_backlog(self) -> None:
        """Delete the change notices of earlier runs (no mirror now), logged once."""
        with self.transaction() as conn:
            dropped = conn.execute("DELETE FROM outbox").rowcount
        if dropped:
            log.warning(
                "Dropped %d pending OpenSearch change notice(s) from %s: OPENSEARCH_URL is not set, so the store "
                "keeps no backlog. If you mirror into OpenSearch again, run 'immich-trt opensearch reindex' once "
                "after setting OPENSEARCH_URL: it copies everything the store holds.", dropped, self.path,
            )

    def touch(self, entity: str, *ids: int) -> None:
        """Enqueue change notices for the mirror (call inside the writing transaction);
        nothing without one (``outbox=False``)."""
        if entity not in ENTITIES:
            raise ValueError(f"unknown outbox entity {entity!r}")
        if not self.outbox:
            return
        now = time.time()
        self.conn.executemany(
            "INSERT INTO outbox (entity, entity_id, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (entity, entity_id) DO UPDATE SET version = version + 1, next_attempt = 0",
            [(entity, int(i), now) for i in ids],
        )

    def counts(self) -> dict[str, int]:
        """Rows per table: ``{"assets", "faces", "persons", "ocr_lines",
        "duplicate_groups", "outbox": int}``."""
        return {
            table: self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("assets", "faces", "persons", "ocr_lines", "duplicate_groups", "outbox")
        }

    def ingest_counts(self) -> dict[str, int]:
        """What ingestion stored: assets per task (``"clip"``, ``"faces"``, ``"ocr"``:
        assets on which the task ran with any model), ``"hidden"`` assets (hidden by a
        duplicate resolution) and assets with a ``"thumbnail"``."""
        counts = {"clip": 0, "faces": 0, "ocr": 0}
        for task, n in self.conn.execute("SELECT task, count(DISTINCT asset) FROM asset_tasks GROUP BY task"):
            counts[task] = n
        counts["hidden"] = self.conn.execute("SELECT count(*) FROM assets WHERE hidden = 1").fetchone()[0]
        counts["thumbnail"] = self.conn.execute("SELECT count(*) FROM asset_thumbnails").fetchone()[0]
        return counts

    def close(self) -> None:
        self.conn.close()


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (``sqlite3.complete_statement`` keeps triggers
    whole); ``executescript`` would commit the open transaction."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements
