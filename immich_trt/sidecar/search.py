"""Search over stored results: similar faces, CLIP text/image search, OCR text, hybrid.

Every function takes the :class:`~immich_trt.sidecar.store.Store` first (it runs on the
store thread through :meth:`~immich_trt.sidecar.service.Sidecar.call`) and returns
JSON-able dicts with camelCase keys. Assets in results are
:func:`~immich_trt.sidecar.assets.asset_summaries` dicts.

Similarities are cosine similarities in ``[-1, 1]`` between L2-normalised embeddings of
one model (embeddings of different models are not comparable, so every vector search
names its model and an unknown model finds nothing).

Hidden assets (``assets.hidden = 1``: the losers of a resolved duplicate group) are left
out of every search unless ``include_hidden`` is true.

OCR text search is a substring search: the ``ocr_fts`` FTS5 table uses the ``trigram``
tokenizer, which matches any substring of three or more characters, case-insensitively
(its default ``case_sensitive 0`` folds Unicode case). The query is passed as one FTS5
string (wrapped in double quotes, inner double quotes doubled), so FTS5 operators such
as ``NEAR(``, ``*``, ``AND`` or ``^`` are matched literally. A trigram index cannot
answer a query shorter than three characters; those fall back to a scan of
``ocr_lines`` with ``LIKE`` (``%``, ``_`` and ``\\`` escaped), which SQLite folds for
ASCII letters only. Either way every returned line is re-checked with Python's
``re.IGNORECASE`` search, which also gives the ``match`` character offsets.
"""

from __future__ import annotations

import math
import re
import sqlite3
from typing import Any

import numpy as np
import orjson

from .assets import asset_summaries
from .errors import BadRequest, NotFound
from .store import Store, from_blob
from .vectors import VectorIndex, normalise

#: Longest accepted OCR query, in characters.
MAX_QUERY_CHARS = 256
#: Largest ``k`` / page size of any search.
MAX_K = 1000
#: Hybrid search takes the CLIP candidates from this many times ``k`` nearest assets.
HYBRID_CANDIDATES = 5


# ---------------------------------------------------------------- validation


def check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int in ``1..MAX_K``; raises :class:`BadRequest` otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise BadRequest(f"{name} must be an integer from 1 to {MAX_K}, got {k!r}")
    return int(k)


def check_offset(offset: Any) -> int:
    """``offset`` as an int ``>= 0``; raises :class:`BadRequest` otherwise."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise BadRequest(f"offset must be a non-negative integer, got {offset!r}")
    return int(offset)


def check_range(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``);
    NaN, non-numbers and values outside raise :class:`BadRequest`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {value!r}") from None
    inside = (low < number if low_open else low <= number) and number <= high
    if isinstance(value, bool) or math.isnan(number) or not inside:
        bracket = "(" if low_open else "["
        raise BadRequest(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return number


def check_text_query(query: Any) -> str:
    """The OCR query with surrounding whitespace removed. Raises :class:`BadRequest`
    for a non-string, an empty or whitespace-only query, or one longer than
    :data:`MAX_QUERY_CHARS` characters."""
    if not isinstance(query, str):
        raise BadRequest("query must be a string")
    query = query.strip()
    if not query:
        raise BadRequest("query must not be empty")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"query is longer than {MAX_QUERY_CHARS} characters")
    return query


def _nearest(
    index: VectorIndex, embedding: np.ndarray, k: int, min_similarity: float, drop: set[int]
) -> list[tuple[int, float]]:
    """``index.search`` without the ids in ``drop``: asks for ``k + len(drop)`` rows so
    dropping cannot shorten the answer below ``k``. Dimension mismatch -> BadRequest."""
    try:
        hits = index.search(np.asarray(embedding, dtype=np.float32), k + len(drop), min_similarity)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return [(i, s) for i, s in hits if i not in drop][:k]


def _hidden_assets(store: Store) -> set[int]:
    return {row[0] for row in store.conn.execute("SELECT id FROM assets WHERE hidden = 1")}


# ---------------------------------------------------------------- faces


def _face_dicts(store: Store, face_ids: list[int]) -> dict[int, dict[str, Any]]:
    """``{face id: {"faceId", "assetId", "model", "personId", "personName", "score",
    "box": {"x1", "y1", "x2", "y2"} (pixels), "asset": summary}}``."""
    if not face_ids:
        return {}
    marks = ",".join("?" * len(face_ids))
    rows = store.conn.execute(
        "SELECT f.id, f.asset, f.model, f.x1, f.y1, f.x2, f.y2, f.score, f.person, p.name "
        f"FROM faces f LEFT JOIN persons p ON p.id = f.person WHERE f.id IN ({marks})",
        [int(i) for i in face_ids],
    ).fetchall()
    summaries = asset_summaries(store, [row["asset"] for row in rows])
    return {
        row["id"]: {
            "faceId": row["id"],
            "assetId": row["asset"],
            "model": row["model"],
            "personId": row["person"],
            "personName": row["name"],
            "score": row["score"],
            "box": {"x1": row["x1"], "y1": row["y1"], "x2": row["x2"], "y2": row["y2"]},
            "asset": summaries.get(row["asset"]),
        }
        for row in rows
    }


def search_faces(
    store: Store,
    face_indices: dict[str, VectorIndex],
    embedding: np.ndarray,
    model: str,
    k: int = 20,
    min_similarity: float = 0.0,
    exclude: set[int] | None = None,
    include_hidden: bool = False,
) -> list[dict[str, Any]]:
    """The ``k`` faces of face model ``model`` nearest to ``embedding`` (float[512]),
    best first, with cosine similarity >= ``min_similarity``; face ids in ``exclude``
    and (unless ``include_hidden``) faces on hidden assets are left out.

    Returns ``[{"faceId", "assetId", "model", "personId", "personName" (None when the
    face has no person or the person no name), "similarity", "score" (detector),
    "box": {"x1", "y1", "x2", "y2"} (pixels of the ingested image), "asset": summary}]``;
    an unknown model gives ``[]``. Raises :class:`BadRequest` for ``k`` outside
    1..1000, ``min_similarity`` outside [-1, 1] or an embedding of the wrong dimension.
    """
    k = check_k(k)
    min_similarity = check_range(min_similarity, "min_similarity", -1.0, 1.0)
    index = face_indices.get(model)
    if index is None or len(index) == 0:
        return []
    drop = {int(i) for i in exclude or ()}
    if not include_hidden:
        drop |= {
            row[0]
            for row in store.conn.execute(
                "SELECT f.id FROM faces f JOIN assets a ON a.id = f.asset WHERE a.hidden = 1 AND f.model = ?",
                (model,),
            )
        }
    hits = _nearest(index, embedding, k, min_similarity, drop)
    faces = _face_dicts(store, [i for i, _ in hits])
    return [{**faces[i], "similarity": s} for i, s in hits if i in faces]


def group_by_person(face_hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Persons among face hits: ``[{"personId", "personName", "similarity" (best of the
    person's hits), "faces" (number of hits)}]``, best similarity first, then person id.
    Hits without a person are left out."""
    persons: dict[int, dict[str, Any]] = {}
    for hit in face_hits:
        person = hit.get("personId")
        if person is None:
            continue
        entry = persons.setdefault(
            person,
            {"personId": person, "personName": hit.get("personName"), "similarity": hit["similarity"], "faces": 0},
        )
        entry["similarity"] = max(entry["similarity"], hit["similarity"])
        entry["faces"] += 1
    return sorted(persons.values(), key=lambda p: (-p["similarity"], p["personId"]))


def search_face_by_id(
    store: Store,
    face_indices: dict[str, VectorIndex],
    face_id: int,
    k: int = 20,
    min_similarity: float = 0.0,
    include_hidden: bool = False,
) -> dict[str, Any]:
    """Faces similar to stored face ``face_id`` (same model, its stored embedding).

    Returns ``{"face": query face (as a hit, without "similarity"), "results":
    search_faces(...) without the query face, "persons": group_by_person(results)}``.
    Raises :class:`NotFound` for an unknown face id, :class:`BadRequest` as
    :func:`search_faces`."""
    row = store.conn.execute("SELECT model, embedding FROM faces WHERE id = ?", (int(face_id),)).fetchone()
    if row is None:
        raise NotFound(f"face {face_id} not found")
    face = _face_dicts(store, [int(face_id)])[int(face_id)]
    results = search_faces(
        store, face_indices, from_blob(row["embedding"]), row["model"], k, min_similarity,
        exclude={int(face_id)}, include_hidden=include_hidden,
    )
    return {"face": face, "results": results, "persons": group_by_person(results)}


# ---------------------------------------------------------------- CLIP


def search_clip(
    store: Store,
    clip_indices: dict[str, VectorIndex],
    embedding: np.ndarray,
    model: str,
    k: int = 20,
    min_similarity: float = -1.0,
    include_hidden: bool = False,
) -> list[dict[str, Any]]:
    """Assets ranked by cosine similarity of their CLIP embedding (model ``model``) to
    ``embedding`` (a textual or visual embedding of the same model, float[D]).

    Returns ``[{"assetId", "similarity", "asset": summary}]`` best first, at most ``k``,
    each >= ``min_similarity``; an unknown model gives ``[]``. Raises
    :class:`BadRequest` for ``k`` outside 1..1000, ``min_similarity`` outside [-1, 1]
    or an embedding of the wrong dimension."""
    k = check_k(k)
    min_similarity = check_range(min_similarity, "min_similarity", -1.0, 1.0)
    index = clip_indices.get(model)
    if index is None or len(index) == 0:
        return []
    hits = _nearest(index, embedding, k, min_similarity, set() if include_hidden else _hidden_assets(store))
    summaries = asset_summaries(store, [i for i, _ in hits])
    return [{"assetId": i, "similarity": s, "asset": summaries[i]} for i, s in hits if i in summaries]


# ---------------------------------------------------------------- OCR


def fts5_string(query: str) -> str:
    """``query`` as one FTS5 string literal: wrapped in double quotes with inner double
    quotes doubled, so no character of it acts as an FTS5 operator."""
    return '"' + query.replace('"', '""') + '"'


def like_pattern(query: str) -> str:
    """``%query%`` for ``LIKE ... ESCAPE '\\'`` with ``\\``, ``%`` and ``_`` escaped."""
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _matching_lines(store: Store, query: str, include_hidden: bool) -> dict[int, list[sqlite3.Row]]:
    """``{asset id: [ocr_lines rows containing query]}`` (assets by id, lines by model
    and position); ``query`` already checked by :func:`check_text_query`."""
    hidden = "" if include_hidden else " AND a.hidden = 0"
    columns = "l.id, l.asset, l.polygon, l.text, l.box_score, l.text_score"
    if len(query) >= 3:
        rows = store.conn.execute(
            f"SELECT {columns} FROM ocr_fts JOIN ocr_lines l ON l.id = ocr_fts.rowid "
            f"JOIN assets a ON a.id = l.asset WHERE ocr_fts MATCH ?{hidden} ORDER BY l.asset, l.model, l.line",
            (fts5_string(query),),
        )
    else:
        rows = store.conn.execute(
            f"SELECT {columns} FROM ocr_lines l JOIN assets a ON a.id = l.asset "
            f"WHERE l.text LIKE ? ESCAPE '\\'{hidden} ORDER BY l.asset, l.model, l.line",
            (like_pattern(query),),
        )
    pattern = re.compile(re.escape(query), re.IGNORECASE)
    by_asset: dict[int, list[sqlite3.Row]] = {}
    for row in rows:
        if pattern.search(row["text"]):
            by_asset.setdefault(row["asset"], []).append(row)
    return by_asset


def _line_dict(row: sqlite3.Row, pattern: re.Pattern[str]) -> dict[str, Any]:
    found = pattern.search(row["text"])
    return {
        "id": row["id"],
        "text": row["text"],
        "polygon": orjson.loads(row["polygon"]),
        "boxScore": row["box_score"],
        "textScore": row["text_score"],
        "match": [found.start(), found.end()] if found else None,
    }


def search_ocr(
    store: Store, query: str, limit: int = 20, offset: int = 0, include_hidden: bool = False
) -> dict[str, Any]:
    """Assets with recognised text lines containing ``query`` (case-insensitive
    substring; surrounding whitespace of the query is ignored; see the module docstring
    for the FTS5 trigram / LIKE paths).

    Assets are ordered by number of matching lines (descending), then asset id; a page
    is ``items[offset:offset + limit]``. Returns ``{"total": number of matching assets,
    "items": [{"assetId", "asset": summary, "lines": [{"id", "text", "polygon": 8
    floats (x, y clockwise from top-left, normalised 0..1), "boxScore", "textScore",
    "match": [start, end] (character offsets into text of the first case-insensitive
    occurrence)}]}]}``, lines in response order.

    Raises :class:`BadRequest` for an empty/whitespace query, one longer than 256
    characters, ``limit`` outside 1..1000 or a negative ``offset``."""
    query = check_text_query(query)
    limit, offset = check_k(limit, "limit"), check_offset(offset)
    by_asset = _matching_lines(store, query, include_hidden)
    ranked = sorted(by_asset, key=lambda asset: (-len(by_asset[asset]), asset))
    page = ranked[offset : offset + limit]
    summaries = asset_summaries(store, page)
    pattern = re.compile(re.escape(query), re.IGNORECASE)
    items = [
        {"assetId": asset, "asset": summaries.get(asset), "lines": [_line_dict(r, pattern) for r in by_asset[asset]]}
        for asset in page
    ]
    return {"total": len(ranked), "items": items}


# ---------------------------------------------------------------- hybrid


def search_hybrid(
    store: Store,
    clip_indices: dict[str, VectorIndex],
    query: str,
    embedding: np.ndarray | None,
    model: str | None,
    k: int = 20,
    ocr_weight: float = 0.5,
) -> list[dict[str, Any]]:
    """Assets ranked by OCR text match and CLIP similarity together (hidden assets left
    out).

    ``score = ocr_weight * ocrScore + (1 - ocr_weight) * clip``, where ``ocrScore`` is
    1.0 when a text line of the asset contains ``query`` (as :func:`search_ocr`) and 0.0
    otherwise, and ``clip`` is the cosine similarity of the asset's CLIP embedding
    (model ``model``) to ``embedding`` (usually the CLIP textual embedding of the same
    query), 0.0 when unknown. Candidates: the ``5 * k`` assets nearest to
    ``embedding`` and every OCR match (whose similarity is read from its index row with
    :meth:`VectorIndex.get`). Without ``embedding`` (or for a model with no index) the
    ranking is by OCR match alone. Ties go to the lower asset id.

    Returns at most ``k`` ``[{"assetId", "score", "ocrScore", "clipSimilarity" (None
    when the asset has no embedding of ``model`` or none was given), "lines": matching
    lines as in :func:`search_ocr` ([] for none), "asset": summary}]``, best first.
    Raises :class:`BadRequest` for a bad query (as :func:`search_ocr`), ``k`` outside
    1..1000, ``ocr_weight`` outside [0, 1], an embedding without a model, or an
    embedding of the wrong dimension."""
    query = check_text_query(query)
    k = check_k(k)
    ocr_weight = check_range(ocr_weight, "ocr_weight", 0.0, 1.0)
    if embedding is not None and not model:
        raise BadRequest("model is required with an embedding")
    by_asset = _matching_lines(store, query, include_hidden=False)
    clip: dict[int, float] = {}
    index = clip_indices.get(model) if embedding is not None and model else None
    if index is not None and len(index):
        clip.update(_nearest(index, embedding, k * HYBRID_CANDIDATES, -1.0, _hidden_assets(store)))
        unit = normalise(np.asarray(embedding, dtype=np.float32).reshape(-1))
        for asset in by_asset:
            row = index.get(asset) if asset not in clip else None
            if row is not None:
                clip[asset] = float(row @ unit)
    scored = []
    for asset in set(clip) | set(by_asset):
        ocr_score = 1.0 if asset in by_asset else 0.0
        similarity = clip.get(asset)
        score = ocr_weight * ocr_score + (1.0 - ocr_weight) * (similarity or 0.0)
        scored.append((score, asset, ocr_score, similarity))
    scored.sort(key=lambda item: (-item[0], item[1]))
    top = scored[:k]
    summaries = asset_summaries(store, [asset for _, asset, _, _ in top])
    pattern = re.compile(re.escape(query), re.IGNORECASE)
    return [
        {
            "assetId": asset,
            "score": score,
            "ocrScore": ocr_score,
            "clipSimilarity": similarity,
            "lines": [_line_dict(r, pattern) for r in by_asset.get(asset, [])],
            "asset": summaries.get(asset),
        }
        for score, asset, ocr_score, similarity in top
    ]
