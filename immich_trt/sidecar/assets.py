"""Writing one asset's model results to the store, and reading assets back.

:func:`save_results` is the single write path of ingestion and of ``/predict``
recording: idempotent by imohash (one ``assets`` row per content), and per (task,
model): a task already stored for the asset is kept as it is (so person assignments of
its faces survive a re-ingest), and only new tasks are written; likewise the asset's
thumbnail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .errors import NotFound
from .store import Store, from_blob, to_blob
from .thumbnails import Thumbnail, save_asset_thumbnail


@dataclass
class FaceResult:
    """One detected face: ``box`` (x1, y1, x2, y2) pixels, ``landmarks`` float32[5, 2]
    pixels or None, detector ``score``, ``embedding`` float32[512], ``thumbnail`` JPEG."""

    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray
    landmarks: np.ndarray | None = None
    thumbnail: bytes | None = None


@dataclass
class OcrLine:
    """One recognised line: ``polygon`` 8 floats (x, y clockwise from top-left),
    normalised 0..1 of the image; ``text``; detection and recognition scores."""

    polygon: list[float]
    text: str
    box_score: float
    text_score: float


@dataclass
class AssetResults:
    """Everything one pass over an image produced. ``None`` = task not run."""

    imohash: str
    size: int
    width: int
    height: int
    ref: str | None = None
    filename: str | None = None
    clip: tuple[str, np.ndarray] | None = None  # (model, float32[D])
    faces: tuple[str, list[FaceResult]] | None = None  # (model, faces)
    ocr: tuple[str, list[OcrLine]] | None = None  # (model, lines)
    thumbnail: Thumbnail | None = None  # kept unless the asset has one


@dataclass
class Saved:
    """What :func:`save_results` wrote: the asset id, whether the asset is new, the
    ids of new faces, and whether a CLIP embedding was added."""

    asset_id: int
    created: bool
    face_ids: list[int]
    clip_added: bool


def find_asset(store: Store, imohash: str) -> int | None:
    row = store.conn.execute("SELECT id FROM assets WHERE imohash = ?", (imohash,)).fetchone()
    return None if row is None else int(row[0])


def tasks_done(store: Store, asset_id: int) -> dict[str, set[str]]:
    """``{task: {model, ...}}`` already stored for an asset."""
    done: dict[str, set[str]] = {}
    for task, model in store.conn.execute("SELECT task, model FROM asset_tasks WHERE asset = ?", (asset_id,)):
        done.setdefault(task, set()).add(model)
    return done


def save_results(store: Store, results: AssetResults) -> Saved:
    """Store ``results`` in one transaction (see the module docstring)."""
    now = time.time()
    with store.transaction() as conn:
        asset_id = find_asset(store, results.imohash)
        created = asset_id is None
        if created:
            cursor = conn.execute(
                "INSERT INTO assets (imohash, size, width, height, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (results.imohash, results.size, results.width, results.height, now, now),
            )
            asset_id = int(cursor.lastrowid)
        ref = results.ref or f"imohash:{results.imohash}"
        before = conn.execute("SELECT asset, filename FROM asset_refs WHERE ref = ?", (ref,)).fetchone()
        conn.execute(
            "INSERT INTO asset_refs (ref, asset, filename, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (ref) DO UPDATE SET asset = excluded.asset, filename = coalesce(excluded.filename, filename)",
            (ref, asset_id, results.filename, now),
        )
        if results.thumbnail is not None:
            save_asset_thumbnail(store, asset_id, results.thumbnail, now)
        done = tasks_done(store, asset_id)
        # a new ref (or a ref moved from other content) changes the mirrored refs
        changed = created or before is None or before["asset"] != asset_id or (
            results.filename is not None and before["filename"] != results.filename
        )
        if before is not None and before["asset"] != asset_id:
            store.touch("asset", before["asset"])
        clip_added = False
        if results.clip is not None and results.clip[0] not in done.get("clip", set()):
            model, embedding = results.clip
            conn.execute(
                "UPDATE assets SET clip_model = ?, clip_embedding = ?, updated_at = ? WHERE id = ?",
                (model, to_blob(embedding), now, asset_id),
            )
            _mark(conn, asset_id, "clip", model, now)
            changed = clip_added = True
        face_ids: list[int] = []
        if results.faces is not None and results.faces[0] not in done.get("faces", set()):
            model, faces = results.faces
            for face in faces:
                cursor = conn.execute(
                    "INSERT INTO faces (asset, model, x1, y1, x2, y2, landmarks, score, embedding, thumbnail, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        asset_id,
                        model,
                        *map(float, face.box),
                        None if face.landmarks is None else to_blob(face.landmarks),
                        float(face.score),
                        to_blob(face.embedding),
                        face.thumbnail,
                        now,
                    ),
                )
                face_ids.append(int(cursor.lastrowid))
            _mark(conn, asset_id, "faces", model, now)
            store.touch("face", *face_ids)
            changed = True
        if results.ocr is not None and results.ocr[0] not in done.get("ocr", set()):
            model, lines = results.ocr
            line_ids = []
            for number, line in enumerate(lines):
                cursor = conn.execute(
                    "INSERT INTO ocr_lines (asset, model, line, polygon, text, box_score, text_score) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (asset_id, model, number, orjson.dumps(line.polygon).decode(), line.text,
                     float(line.box_score), float(line.text_score)),
                )
                line_ids.append(int(cursor.lastrowid))
            _mark(conn, asset_id, "ocr", model, now)
            store.touch("ocr_line", *line_ids)
            changed = True
        if changed:
            store.touch("asset", asset_id)
    return Saved(asset_id, created, face_ids, clip_added)


def _mark(conn, asset_id: int, task: str, model: str, now: float) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO asset_tasks (asset, task, model, created_at) VALUES (?, ?, ?, ?)",
        (asset_id, task, model, now),
    )


def asset_summaries(store: Store, ids: list[int]) -> dict[int, dict[str, Any]]:
    """``{id: summary}`` for the given asset ids (missing ids are left out).

    A summary is ``{"id", "imohash", "refs": [str], "filenames": [str], "width",
    "height", "size", "hidden"}``; sizes in pixels and bytes."""
    if not ids:
        return {}
    out: dict[int, dict[str, Any]] = {}
    unique = sorted({int(i) for i in ids})
    for start in range(0, len(unique), 500):
        chunk = unique[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in store.conn.execute(
            f"SELECT id, imohash, width, height, size, hidden FROM assets WHERE id IN ({marks})", chunk
        ):
            out[row["id"]] = {
                "id": row["id"],
                "imohash": row["imohash"],
                "refs": [],
                "filenames": [],
                "width": row["width"],
                "height": row["height"],
                "size": row["size"],
                "hidden": bool(row["hidden"]),
            }
        for row in store.conn.execute(
            f"SELECT asset, ref, filename FROM asset_refs WHERE asset IN ({marks}) ORDER BY created_at, ref", chunk
        ):
            out[row["asset"]]["refs"].append(row["ref"])
            if row["filename"]:
                out[row["asset"]]["filenames"].append(row["filename"])
    return out


def asset_summary(store: Store, asset_id: int) -> dict[str, Any]:
    """The summary of one asset (see :func:`asset_summaries`). Raises :class:`NotFound`."""
    summary = asset_summaries(store, [asset_id]).get(int(asset_id))
    if summary is None:
        raise NotFound(f"asset {asset_id} not found")
    return summary


def asset_ocr_lines(store: Store, asset_id: int) -> list[dict[str, Any]]:
    """The OCR lines of one asset, by model and position: ``[{"id", "text", "polygon"
    (8 floats, normalised 0..1), "boxScore", "textScore"}]``; ``[]`` for none."""
    return [
        {"id": r["id"], "text": r["text"], "polygon": orjson.loads(r["polygon"]),
         "boxScore": r["box_score"], "textScore": r["text_score"]}
        for r in store.conn.execute("SELECT * FROM ocr_lines WHERE asset = ? ORDER BY model, line", (asset_id,))
    ]


def clip_embeddings(store: Store) -> dict[str, tuple[list[int], list[np.ndarray]]]:
    """Every stored CLIP embedding by model: ``{model: ([asset id], [float32[D]])}``,
    assets in id order."""
    out: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for row in store.conn.execute(
        "SELECT id, clip_model, clip_embedding FROM assets WHERE clip_embedding IS NOT NULL ORDER BY id"
    ):
        ids, vecs = out.setdefault(row["clip_model"], ([], []))
        ids.append(row["id"])
        vecs.append(from_blob(row["clip_embedding"]))
    return out


def resolve_ref(store: Store, ref: str) -> int:
    """Asset id named by ``ref``, tried in this order: a stored ref (the caller's
    ``assetId``, a file path, ``imohash:<hex>``); the asset id the API answers
    (``"assetId": 19`` of ``/v1/ingest`` and of search results: decimal digits); an
    imohash, bare or as ``imohash:<hex>``; a file path given without its leading ``/`` (as an unencoded path in a URL
    reads). A caller's ref that is a number wins over an asset id of the same digits.
    Raises :class:`NotFound`."""
    row = store.conn.execute("SELECT asset FROM asset_refs WHERE ref = ?", (ref,)).fetchone()
    if row is None and ref.isascii() and ref.isdigit() and len(ref) <= 18:
        row = store.conn.execute("SELECT id FROM assets WHERE id = ?", (int(ref),)).fetchone()
    if row is None:
        digest = ref[len("imohash:"):] if ref.startswith("imohash:") else ref
        row = store.conn.execute("SELECT id FROM assets WHERE imohash = ?", (digest,)).fetchone()
    if row is None and not ref.startswith("/"):
        row = store.conn.execute("SELECT asset FROM asset_refs WHERE ref = ?", ("/" + ref,)).fetchone()
    if row is None:
        raise NotFound(f"asset {ref!r} not found")
    return int(row[0])
