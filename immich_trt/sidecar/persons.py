"""Persons: face clustering and person management (Google-Photos-like people).

Clustering reproduces Immich's incremental DBSCAN (server ``person.service.ts``,
``handleQueueRecognizeFaces`` + ``handleRecognizeFaces``). For a face F that has no
person:

1. ``matches`` = up to ``min_faces`` nearest faces of the same face model, F itself
   included, with cosine distance ``1 - cos <= max_distance``, nearest first.
2. If ``min_faces > 1`` and ``len(matches) <= 1``: skip (F stays unassigned, not deferred).
3. F is a *core point* when ``len(matches) >= min_faces`` and its asset is not hidden.
   In the first pass a non-core face is *deferred*: processed again after every
   first-pass face.
4. The person is that of the first match that has one; failing that, that of the
   nearest face with a person within ``max_distance``.
5. A core face with no person found creates a new person (F its representative face).
6. F is assigned to the person (``assigned = 'auto'``).

Differences from Immich, on purpose:

- Immich runs one job per face concurrently; here the faces of a run are processed in
  order of face id, so a run is deterministic. Persons created or joined earlier in a
  run are visible to later faces (an in-memory person-per-face array is kept in step
  with the writes).
- An incremental run processes the faces with no person that no run has seen
  (``clustered = 0``) and afterwards marks every processed face ``clustered = 1``,
  including those left unassigned, so they are not retried on every run. They are
  not lost: a face arriving later that is a core point near them creates or joins a
  person through its own matches, and a full run reconsiders every face.
- A full run (``full=True``, Immich's "force") unassigns only ``'auto'`` assignments;
  manual assignments, manually unassigned faces (``person NULL, assigned 'manual'``)
  and names survive, and persons left without faces are deleted unless they have a
  name. Where a core face would create a new person and the person it had before the
  run survived the reset (it has a name or manual faces) and no face has joined it in
  this run yet, that person is taken again instead, so named persons and persons with
  manual work keep their identity across full runs.

Search is brute force over the in-memory :class:`VectorIndex` of the model: the
similarities of a block of queries against all ``N`` faces of the model are one matrix
product, so a run over ``Q`` faces costs ``Q * N * D`` multiply-adds (``D = 512``:
10 000 new faces against 100 000 stored about 5e11, seconds with BLAS) and a block
holds at most ``2**23`` similarities (32 MB). Measured: a first run over 30 000 faces
of 2 000 identities takes about 7 s on a CPU.

Timestamps (``createdAt``, ``updatedAt``) are unix seconds (float). Every write
enqueues outbox notices: ``face`` for faces whose person changed, ``person`` for
persons created, changed (name, faces, representative face) or deleted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequest, NotFound
from .search import like_pattern
from .store import Store, from_blob
from .vectors import VectorIndex

#: Longest person name accepted by :func:`name_person` and :func:`split_person`.
MAX_NAME_LENGTH = 200
#: Most similarities held at once while clustering (float32 elements).
BLOCK_ELEMENTS = 1 << 23
#: Largest page :func:`list_persons` and :func:`unassigned_faces` return.
MAX_PAGE = 1000

_FACE_COLUMNS = "id, asset, model, x1, y1, x2, y2, score, person, assigned"
_PERSON_SELECT = """
    SELECT p.id, p.name, p.name_source, p.representative_face, p.created_at, p.updated_at,
           count(f.id) AS face_count, count(DISTINCT f.asset) AS asset_count,
           count(f.id) - coalesce(sum(f.asset IN (SELECT id FROM assets WHERE hidden = 1)), 0) AS visible_faces
    FROM persons p
    LEFT JOIN faces f ON f.person = p.id
"""


# ---------------------------------------------------------------- shapes


def face_dict(row: Any) -> dict[str, Any]:
    """A face as the API returns it: ``{"id", "assetId", "box": {"x1", "y1", "x2",
    "y2"} (pixels of the ingested image), "score" (detector), "personId" (or None),
    "assigned" ('auto' | 'manual' | None), "model"}``."""
    return {
        "id": row["id"],
        "assetId": row["asset"],
        "box": {"x1": row["x1"], "y1": row["y1"], "x2": row["x2"], "y2": row["y2"]},
        "score": row["score"],
        "personId": row["person"],
        "assigned": row["assigned"],
        "model": row["model"],
    }


def asset_faces(store: Store, asset_id: int) -> list[dict[str, Any]]:
    """The faces of one asset in id order, as :func:`face_dict` shapes them; ``[]`` for none."""
    return [face_dict(r) for r in store.conn.execute("SELECT * FROM faces WHERE asset = ? ORDER BY id", (asset_id,))]


def face_embeddings(store: Store) -> dict[str, tuple[list[int], list[np.ndarray]]]:
    """Every stored face embedding by face model: ``{model: ([face id], [float32[512]])}``,
    faces in id order."""
    out: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for row in store.conn.execute("SELECT id, model, embedding FROM faces ORDER BY id"):
        ids, vecs = out.setdefault(row["model"], ([], []))
        ids.append(row["id"])
        vecs.append(from_blob(row["embedding"]))
    return out


def _person_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "nameSource": row["name_source"],
        "faceCount": row["face_count"],
        "assetCount": row["asset_count"],
        "representativeFaceId": row["representative_face"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


# ---------------------------------------------------------------- clustering


@dataclass
class _ModelFaces:
    """Every face of one model, rows in face-id order: ids int64[N], unit embeddings
    float32[N, D], person int64[N] (0 = none), hidden bool[N] (asset hidden), previous
    int64[N] (person before a full run's reset, 0 = none)."""

    ids: np.ndarray
    matrix: np.ndarray
    person: np.ndarray
    hidden: np.ndarray
    previous: np.ndarray

    def rows(self, face_ids: list[int]) -> np.ndarray:
        return np.searchsorted(self.ids, np.asarray(face_ids, dtype=np.int64))


@dataclass
class _Run:
    """Writes and counts of one clustering run."""

    store: Store
    now: float
    min_faces: int
    max_distance: float
    survivors: set[int] = field(default_factory=set)  # persons a full run may take again
    assignments: list[tuple[int, int]] = field(default_factory=list)  # (person, face)
    touched: set[int] = field(default_factory=set)  # persons that gained faces
    new_persons: int = 0
    deferred: int = 0

    def create_person(self, face_id: int) -> int:
        cursor = self.store.conn.execute(
            "INSERT INTO persons (representative_face, created_at, updated_at) VALUES (?, ?, ?)",
            (face_id, self.now, self.now),
        )
        self.new_persons += 1
        return int(cursor.lastrowid)

    def process(self, faces: _ModelFaces, rows: np.ndarray, deferred: bool) -> list[int]:
        """One pass over ``rows`` of ``faces`` (see the module docstring); returns the
        rows deferred to the second pass (always empty when ``deferred``)."""
        later: list[int] = []
        block = max(1, BLOCK_ELEMENTS // max(1, len(faces.ids)))
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            sims = faces.matrix[chunk] @ faces.matrix.T
            for row, row_sims in zip(chunk, sims):
                within = np.flatnonzero(1.0 - row_sims <= self.max_distance)
                matches = _nearest(within, row_sims, self.min_faces)
                if self.min_faces > 1 and len(matches) <= 1:
                    continue
                core = len(matches) >= self.min_faces and not faces.hidden[row]
                if not core and not deferred:
                    later.append(int(row))
                    continue
                person = _first_person(faces.person, matches)
                if not person:
                    with_person = within[faces.person[within] > 0]
                    if len(with_person):
                        person = int(faces.person[with_person[np.argmax(row_sims[with_person])]])
                if core and not person:
                    person = self._reuse(faces, row) or self.create_person(int(faces.ids[row]))
                if person:
                    faces.person[row] = person
                    self.assignments.append((person, int(faces.ids[row])))
                    self.touched.add(person)
        return later

    def _reuse(self, faces: _ModelFaces, row: int) -> int:
        """The face's person before a full run, when it survived the reset and no face
        has joined it in this run yet (0 otherwise)."""
        previous = int(faces.previous[row])
        if previous in self.survivors and previous not in self.touched:
            self.store.conn.execute(
                "UPDATE persons SET representative_face = coalesce(representative_face, ?) WHERE id = ?",
                (int(faces.ids[row]), previous),
            )
            return previous
        return 0


def _nearest(within: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` of the row indices ``within``, most similar first (ties: lower row)."""
    if len(within) > 4 * k:  # cut before sorting; keep ties at the cut for determinism
        cut = np.partition(-sims[within], k - 1)[k - 1]
        within = within[-sims[within] <= cut]
    order = np.lexsort((within, -sims[within]))
    return within[order][:k]


def _first_person(person: np.ndarray, matches: np.ndarray) -> int:
    assigned = person[matches]
    hits = np.flatnonzero(assigned > 0)
    return int(assigned[hits[0]]) if len(hits) else 0


def _load_model(store: Store, model: str, index: VectorIndex, previous: dict[int, int]) -> _ModelFaces:
    """Every stored face of ``model`` with its unit embedding from ``index``; faces the
    index lacks are read from the store and added to it, index rows the store no longer
    has are ignored."""
    rows = store.conn.execute(
        "SELECT f.id, coalesce(f.person, 0), a.hidden FROM faces f JOIN assets a ON a.id = f.asset "
        "WHERE f.model = ? ORDER BY f.id",
        (model,),
    ).fetchall()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    index_ids, _ = index.snapshot()
    missing = ids[~np.isin(ids, index_ids)]
    for start in range(0, len(missing), 500):
        chunk = [int(i) for i in missing[start : start + 500]]
        found = store.conn.execute(
            f"SELECT id, embedding FROM faces WHERE id IN ({','.join('?' * len(chunk))})", chunk
        ).fetchall()
        index.add([r[0] for r in found], np.stack([from_blob(r[1]) for r in found]))
    index_ids, index_matrix = index.snapshot()
    sorter = np.argsort(index_ids, kind="stable")
    positions = sorter[np.searchsorted(index_ids, ids, sorter=sorter)]
    return _ModelFaces(
        ids=ids,
        matrix=index_matrix[positions],
        person=np.array([r[1] for r in rows], dtype=np.int64),
        hidden=np.array([bool(r[2]) for r in rows], dtype=bool),
        previous=np.array([previous.get(int(i), 0) for i in ids], dtype=np.int64),
    )


def cluster_faces(
    store: Store,
    face_indices: dict[str, VectorIndex],
    min_faces: int = 3,
    max_distance: float = 0.5,
    full: bool = False,
) -> dict[str, int]:
    """Assign faces to persons, creating persons for new clusters (module docstring).

    ``face_indices``: ``{face model: VectorIndex}`` holding every face of the model
    (``Sidecar.faces``); a missing model or face is loaded from the store into it.
    ``min_faces`` (>= 1) and ``max_distance`` (cosine distance, 0 < d <= 2) are
    Immich's ``facialRecognition.minFaces`` / ``maxDistance`` (``Settings.face_min_faces``,
    ``Settings.face_max_distance``). ``full``: recluster everything but manual work.

    Returns counts ``{"processed", "assigned", "newPersons", "deferred", "unassigned",
    "removedPersons"}``: faces considered, faces given a person, persons created,
    faces deferred in the first pass, considered faces left without a person, persons
    deleted by a full run's reset. One transaction. Raises :class:`BadRequest` for
    out-of-range parameters.
    """
    if isinstance(min_faces, bool) or not isinstance(min_faces, int) or min_faces < 1:
        raise BadRequest(f"min_faces must be an integer >= 1, got {min_faces!r}")
    if not 0 < float(max_distance) <= 2:
        raise BadRequest(f"max_distance must be in (0, 2], got {max_distance!r}")
    run = _Run(store, time.time(), min_faces, float(max_distance))
    removed: list[int] = []
    with store.transaction() as conn:
        previous: dict[int, int] = {}
        if full:
            previous = {r[0]: r[1] for r in conn.execute("SELECT id, person FROM faces WHERE assigned = 'auto'")}
            conn.execute("UPDATE faces SET person = NULL, assigned = NULL WHERE assigned = 'auto'")
            store.touch("face", *previous)
            emptied = set(previous.values())
            removed = _prune(store, emptied)
            run.survivors = emptied - set(removed)
            _persons_changed(store, run.survivors, run.now)
        pending = conn.execute(
            "SELECT id, model FROM faces WHERE person IS NULL AND assigned IS NULL"
            + ("" if full else " AND clustered = 0")
            + " ORDER BY id"
        ).fetchall()
        by_model: dict[str, list[int]] = {}
        for face_id, model in pending:
            by_model.setdefault(model, []).append(face_id)
        for model, face_ids in by_model.items():
            faces = _load_model(store, model, face_indices.setdefault(model, VectorIndex()), previous)
            later = run.process(faces, faces.rows(face_ids), deferred=False)
            run.deferred += len(later)
            run.process(faces, np.asarray(later, dtype=np.int64), deferred=True)
        conn.executemany("UPDATE faces SET person = ?, assigned = 'auto' WHERE id = ?", run.assignments)
        store.touch("face", *(face for _, face in run.assignments))
        conn.executemany("UPDATE faces SET clustered = 1 WHERE id = ?", [(r[0],) for r in pending])
        _persons_changed(store, run.touched, run.now)
    return {
        "processed": len(pending),
        "assigned": len(run.assignments),
        "newPersons": run.new_persons,
        "deferred": run.deferred,
        "unassigned": len(pending) - len(run.assignments),
        "removedPersons": len(removed),
    }


# ---------------------------------------------------------------- bookkeeping


def _persons_changed(store: Store, person_ids: Iterable[int], now: float) -> None:
    """Give each existing person among ``person_ids`` a valid representative face (its
    own, else its best-scoring face, else none), bump ``updated_at`` and touch it."""
    ids = sorted({int(p) for p in person_ids if p})
    for person_id in ids:
        row = store.conn.execute(
            "SELECT p.representative_face, f.person FROM persons p "
            "LEFT JOIN faces f ON f.id = p.representative_face WHERE p.id = ?",
            (person_id,),
        ).fetchone()
        if row is None:
            continue
        representative = row[0]
        if representative is None or row[1] != person_id:
            best = store.conn.execute(
                "SELECT id FROM faces WHERE person = ? ORDER BY score DESC, id LIMIT 1", (person_id,)
            ).fetchone()
            representative = None if best is None else best[0]
        store.conn.execute(
            "UPDATE persons SET representative_face = ?, updated_at = ? WHERE id = ?",
            (representative, now, person_id),
        )
        store.touch("person", person_id)


def _prune(store: Store, person_ids: Iterable[int]) -> list[int]:
    """Delete the persons among ``person_ids`` that have no faces and no name; returns
    their ids (touched in the outbox)."""
    ids = sorted({int(p) for p in person_ids if p})
    doomed: list[int] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        doomed += [
            r[0]
            for r in store.conn.execute(
                f"SELECT id FROM persons p WHERE id IN ({','.join('?' * len(chunk))}) "
                "AND coalesce(name, '') = '' AND NOT EXISTS (SELECT 1 FROM faces f WHERE f.person = p.id)",
                chunk,
            )
        ]
    store.conn.executemany("DELETE FROM persons WHERE id = ?", [(p,) for p in doomed])
    store.touch("person", *doomed)
    return doomed


def _require_person(store: Store, person_id: int) -> Any:
    row = store.conn.execute("SELECT * FROM persons WHERE id = ?", (_int(person_id, "person id"),)).fetchone()
    if row is None:
        raise NotFound(f"person {person_id} not found")
    return row


def _require_faces(store: Store, face_ids: list[int]) -> list[Any]:
    ids = sorted({_int(f, "face id") for f in face_ids})
    rows = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows += store.conn.execute(
            f"SELECT {_FACE_COLUMNS} FROM faces WHERE id IN ({','.join('?' * len(chunk))})", chunk
        ).fetchall()
    missing = sorted(set(ids) - {r["id"] for r in rows})
    if missing:
        raise NotFound(f"faces not found: {missing[:20]}")
    return rows


def _person_models(store: Store, person_id: int) -> set[str]:
    return {r[0] for r in store.conn.execute("SELECT DISTINCT model FROM faces WHERE person = ?", (person_id,))}


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadRequest(f"{what} must be an integer, got {value!r}")
    return int(value)


def _clean_name(name: Any) -> str | None:
    """Stripped name, None for an empty one; :class:`BadRequest` for a non-string or
    one longer than :data:`MAX_NAME_LENGTH`."""
    if not isinstance(name, str):
        raise BadRequest("name must be a string")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"name is longer than {MAX_NAME_LENGTH} characters")
    return name or None


def _page(offset: Any, limit: Any) -> tuple[int, int]:
    offset, limit = _int(offset, "offset"), _int(limit, "limit")
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"need offset >= 0 and 1 <= limit <= {MAX_PAGE}")
    return offset, limit


# ---------------------------------------------------------------- reads


def list_persons(
    store: Store, offset: int = 0, limit: int = 50, with_hidden: bool = False, name: str | None = None
) -> dict[str, Any]:
    """A page of persons, most faces first (then by id): ``{"total": int, "items":
    [person]}`` with person = ``{"id", "name", "nameSource" ('user' | 'import' | None),
    "faceCount", "assetCount", "representativeFaceId", "createdAt", "updatedAt"}``
    (unix seconds). Persons without faces (named ones) are listed. Unless
    ``with_hidden``, persons whose faces all lie on hidden assets are left out. ``name``
    keeps the persons whose name contains it (case-insensitive for ASCII letters, as
    SQLite's ``LIKE``). Raises :class:`BadRequest` for a bad page (``limit``
    1..:data:`MAX_PAGE`)."""
    offset, limit = _page(offset, limit)
    having = "" if with_hidden else " HAVING face_count = 0 OR visible_faces > 0"
    where, args = "", []
    if name is not None and name.strip():
        where, args = " WHERE p.name LIKE ? ESCAPE '\\'", [like_pattern(name.strip())]
    grouped = f"{_PERSON_SELECT}{where} GROUP BY p.id{having}"
    # one pass over the faces index: the total rides along with the page (window count)
    rows = store.conn.execute(
        f"SELECT *, count(*) OVER () AS total FROM ({grouped}) ORDER BY face_count DESC, id LIMIT ? OFFSET ?",
        (*args, limit, offset),
    ).fetchall()
    if rows:
        total = rows[0]["total"]
    else:  # a page past the end
        total = store.conn.execute(f"SELECT count(*) FROM ({grouped})", args).fetchone()[0]
    return {"total": total, "items": [_person_dict(r) for r in rows]}


def person_faces(store: Store, person_id: int, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """A page of one person's faces, best detector score first (then by id): ``{"total":
    int, "items": [face]}`` (see :func:`face_dict`). Raises :class:`NotFound` for an
    unknown person, :class:`BadRequest` for a bad page."""
    offset, limit = _page(offset, limit)
    person = _require_person(store, person_id)
    total = store.conn.execute("SELECT count(*) FROM faces WHERE person = ?", (person["id"],)).fetchone()[0]
    rows = store.conn.execute(
        f"SELECT {_FACE_COLUMNS} FROM faces WHERE person = ? ORDER BY score DESC, id LIMIT ? OFFSET ?",
        (person["id"], limit, offset),
    )
    return {"total": total, "items": [face_dict(r) for r in rows]}


def get_person(store: Store, person_id: int, sample: int = 12) -> dict[str, Any]:
    """One person (see :func:`list_persons`) plus ``"faces"``: its first ``sample``
    faces by detector score, best first (see :func:`face_dict`). Raises
    :class:`NotFound`, :class:`BadRequest` for a negative ``sample``."""
    sample = _int(sample, "sample")
    if sample < 0:
        raise BadRequest("sample must be >= 0")
    row = store.conn.execute(f"{_PERSON_SELECT} WHERE p.id = ? GROUP BY p.id", (_int(person_id, "person id"),))
    row = row.fetchone()
    if row is None:
        raise NotFound(f"person {person_id} not found")
    faces = store.conn.execute(
        f"SELECT {_FACE_COLUMNS} FROM faces WHERE person = ? ORDER BY score DESC, id LIMIT ?", (row["id"], sample)
    )
    return {**_person_dict(row), "faces": [face_dict(f) for f in faces]}


def unassigned_faces(store: Store, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """A page of faces without a person (also manually unassigned ones), by face id:
    ``{"total": int, "items": [face]}`` (see :func:`face_dict`). Raises
    :class:`BadRequest` for a bad page."""
    offset, limit = _page(offset, limit)
    total = store.conn.execute("SELECT count(*) FROM faces WHERE person IS NULL").fetchone()[0]
    rows = store.conn.execute(
        f"SELECT {_FACE_COLUMNS} FROM faces WHERE person IS NULL ORDER BY id LIMIT ? OFFSET ?", (limit, offset)
    )
    return {"total": total, "items": [face_dict(r) for r in rows]}


def person_thumbnail(store: Store, person_id: int) -> bytes:
    """The JPEG thumbnail of the person's representative face, else of its
    best-scoring face that has one. Raises :class:`NotFound` when the person is
    missing or none of its faces has a thumbnail."""
    person = _require_person(store, person_id)
    row = store.conn.execute(
        "SELECT thumbnail FROM faces WHERE person = ? AND thumbnail IS NOT NULL "
        "ORDER BY id = ? DESC, score DESC, id LIMIT 1",
        (person["id"], person["representative_face"] or 0),
    ).fetchone()
    if row is None:
        raise NotFound(f"person {person_id} has no face thumbnail")
    return bytes(row[0])


# ---------------------------------------------------------------- writes


def name_person(store: Store, person_id: int, name: str) -> dict[str, Any]:
    """Set (stripped) or clear (empty string) a person's name; ``nameSource`` becomes
    'user' (None when cleared). Returns the person (see :func:`get_person`, without
    faces). Raises :class:`NotFound`, :class:`BadRequest` (not a string, over
    :data:`MAX_NAME_LENGTH` characters)."""
    clean = _clean_name(name)
    with store.transaction() as conn:
        person = _require_person(store, person_id)
        conn.execute(
            "UPDATE persons SET name = ?, name_source = ?, updated_at = ? WHERE id = ?",
            (clean, None if clean is None else "user", time.time(), person["id"]),
        )
        store.touch("person", person["id"])
    return _summary(store, person["id"])


def merge_persons(store: Store, target_id: int, source_ids: list[int]) -> dict[str, Any]:
    """Move every face of the ``source_ids`` persons to ``target_id`` (``assigned =
    'manual'``) and delete the sources. The target keeps its name, or takes the first
    named source's name. Returns the target (see :func:`get_person`, without faces).
    Raises :class:`BadRequest` (no sources, target among them, faces of another face
    model), :class:`NotFound` (an unknown id)."""
    if not isinstance(source_ids, (list, tuple)) or not source_ids:
        raise BadRequest("source_ids must be a non-empty list of person ids")
    sources = list(dict.fromkeys(_int(s, "person id") for s in source_ids))
    with store.transaction() as conn:
        target = _require_person(store, target_id)
        if target["id"] in sources:
            raise BadRequest("the target person is among the sources")
        rows = [_require_person(store, s) for s in sources]
        models = _person_models(store, target["id"])
        for source in sources:
            models |= _person_models(store, source)
        if len(models) > 1:
            raise BadRequest(f"persons hold faces of different face models: {sorted(models)}")
        now = time.time()
        if not target["name"]:
            named = next((r for r in rows if r["name"]), None)
            if named is not None:
                conn.execute(
                    "UPDATE persons SET name = ?, name_source = ? WHERE id = ?",
                    (named["name"], named["name_source"], target["id"]),
                )
        marks = ",".join("?" * len(sources))
        moved = [r[0] for r in conn.execute(f"SELECT id FROM faces WHERE person IN ({marks})", sources)]
        conn.execute(
            f"UPDATE faces SET person = ?, assigned = 'manual', clustered = 1 WHERE person IN ({marks})",
            [target["id"], *sources],
        )
        store.touch("face", *moved)
        conn.execute(f"DELETE FROM persons WHERE id IN ({marks})", sources)
        store.touch("person", *sources)
        _persons_changed(store, [target["id"]], now)
    return _summary(store, target["id"])


def split_person(store: Store, face_ids: list[int], name: str | None = None) -> dict[str, Any]:
    """Move the given faces (from any persons, or none) to a new person, ``assigned =
    'manual'``, optionally named. Persons left without faces and without a name are
    deleted. Returns the new person (see :func:`get_person`, without faces). Raises
    :class:`BadRequest` (empty list, faces of different face models, bad name),
    :class:`NotFound` (an unknown face)."""
    if not isinstance(face_ids, (list, tuple)) or not face_ids:
        raise BadRequest("face_ids must be a non-empty list of face ids")
    clean = None if name is None else _clean_name(name)
    with store.transaction() as conn:
        faces = _require_faces(store, face_ids)
        models = {f["model"] for f in faces}
        if len(models) > 1:
            raise BadRequest(f"faces of different face models: {sorted(models)}")
        now = time.time()
        person_id = int(
            conn.execute(
                "INSERT INTO persons (name, name_source, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (clean, None if clean is None else "user", now, now),
            ).lastrowid
        )
        ids = [f["id"] for f in faces]
        conn.executemany(
            "UPDATE faces SET person = ?, assigned = 'manual', clustered = 1 WHERE id = ?",
            [(person_id, f) for f in ids],
        )
        store.touch("face", *ids)
        old = {f["person"] for f in faces if f["person"]}
        _prune(store, old)
        _persons_changed(store, old | {person_id}, now)
    return _summary(store, person_id)


def delete_person(store: Store, person_id: int) -> dict[str, Any]:
    """Delete a person; its faces become unassigned (``person`` and ``assigned``
    NULL) with ``clustered = 1``, so the next incremental run leaves them alone
    instead of re-creating the person at once (a full run reconsiders them). Returns
    ``{"id", "unassignedFaces"}``. Raises :class:`NotFound`."""
    with store.transaction() as conn:
        person = _require_person(store, person_id)
        faces = [r[0] for r in conn.execute("SELECT id FROM faces WHERE person = ?", (person["id"],))]
        conn.execute(
            "UPDATE faces SET person = NULL, assigned = NULL, clustered = 1 WHERE person = ?", (person["id"],)
        )
        store.touch("face", *faces)
        conn.execute("DELETE FROM persons WHERE id = ?", (person["id"],))
        store.touch("person", person["id"])
    return {"id": person["id"], "unassignedFaces": len(faces)}


def assign_face(store: Store, face_id: int, person_id: int | None) -> dict[str, Any]:
    """Manually assign a face to a person (``assigned = 'manual'``), or with
    ``person_id=None`` manually unassign it (``person`` NULL, ``assigned = 'manual'``,
    so clustering leaves it alone, full runs included). The face's former person gets
    a new representative face if it lost it, and is deleted if left with no faces and
    no name. Returns the face (see :func:`face_dict`). Raises :class:`NotFound`,
    :class:`BadRequest` (the person holds faces of another face model)."""
    with store.transaction() as conn:
        (face,) = _require_faces(store, [face_id])
        if person_id is not None:
            person_id = _require_person(store, person_id)["id"]
            models = _person_models(store, person_id)
            if models - {face["model"]}:
                raise BadRequest(f"person {person_id} holds faces of another face model: {sorted(models)}")
        conn.execute(
            "UPDATE faces SET person = ?, assigned = 'manual', clustered = 1 WHERE id = ?", (person_id, face["id"])
        )
        store.touch("face", face["id"])
        changed = {face["person"], person_id} - {None}
        _prune(store, changed)
        _persons_changed(store, changed, time.time())
        row = conn.execute(f"SELECT {_FACE_COLUMNS} FROM faces WHERE id = ?", (face["id"],)).fetchone()
    return face_dict(row)


def _summary(store: Store, person_id: int) -> dict[str, Any]:
    person = get_person(store, person_id, sample=0)
    del person["faces"]
    return person
