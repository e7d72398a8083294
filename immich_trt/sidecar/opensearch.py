"""The OpenSearch mirror: index templates, documents built from the store, the outbox drain.

The store is the source of truth; OpenSearch holds a read-only copy for search at scale
(k-NN over CLIP and face embeddings, trigram text search over OCR lines). Every write
that changes a mirrored document enqueues an ``outbox`` change notice in its own
transaction (:meth:`Store.touch`); :func:`drain_once` reads due notices, builds each
entity's *current* document (a row that is gone becomes a delete), sends one ``_bulk``
request, and deletes a notice only after OpenSearch acknowledged its item and only if its
``version`` did not move meanwhile (``DELETE ... WHERE id = ? AND version = ?``), so a
change raised during a drain is sent by the next one. Failed items and failed requests
(connection refused, timeouts, 5xx) keep their notices with ``attempts``,
``next_attempt`` (exponential backoff, :func:`backoff_s`) and ``last_error``: an outage
delays the mirror but loses nothing, and the documents are idempotent (id = the SQLite
row id), so a resend overwrites.

Indices (``<prefix>`` = ``Settings.opensearch_prefix``), one composable index template
each (``PUT _index_template/<prefix>-<suffix>``, see :func:`index_templates`):

- ``<prefix>-assets``: one document per distinct content (imohash);
- ``<prefix>-faces``: detected faces with their ArcFace embedding;
- ``<prefix>-persons``: persons with name and face count;
- ``<prefix>-ocr-lines``: recognised text lines, text analysed into trigrams.

Vectors are ``knn_vector`` fields, HNSW on the Lucene engine with the ``cosinesimil``
space (OpenSearch k-NN "Methods and engines"); values are sent L2-normalised. CLIP models
differ in dimension (ViT-B-32 512, ViT-L-14 768, ViT-SO400M 1152, ...), and one field
has one dimension, so the CLIP vector of an asset goes to a per-dimension field
``clip_<D>`` (``clip_512`` for the default model); the template declares
:data:`CLIP_DIMENSIONS`, and an embedding of any other dimension is left out of the
document (``clipModel`` still says which model ran). Dimensions above 1024 need the
Lucene limit of 16,000 (OpenSearch 2.12 and later).

The client is opensearch-py's synchronous :class:`opensearchpy.OpenSearch` (urllib3),
called through :func:`asyncio.to_thread`: one code path for the server and the CLI, no
second aiohttp session. It runs with a request timeout and ``max_retries=0``: retrying
is the outbox's job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
from opensearchpy import OpenSearch
from opensearchpy.exceptions import OpenSearchException

from ..config import Settings
from .assets import asset_summaries
from .store import ENTITIES, Store, from_blob

log = logging.getLogger("immich_trt.sidecar.opensearch")

#: Index name suffix of each outbox entity.
INDEX_SUFFIXES = {"asset": "assets", "face": "faces", "person": "persons", "ocr_line": "ocr-lines"}

#: CLIP embedding sizes that get a ``clip_<D>`` k-NN field (the models Immich offers:
#: 512 ViT-B-32/B-16, 640 RN50x4/B-16-plus, 768 ViT-L-14/SigLIP-B, 1024 ViT-H-14/RN50x64,
#: 1152 SO400M, 1280 ViT-bigG-14, 1536 SigLIP2 gopt).
CLIP_DIMENSIONS = (512, 640, 768, 1024, 1152, 1280, 1536)

#: Face recognition (ArcFace) embedding size.
FACE_DIMENSION = 512

#: Template priority: above the 0 of catch-all templates, so they never collide.
TEMPLATE_PRIORITY = 200

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0

_DATE = {"type": "date", "format": "epoch_millis"}


def index_name(prefix: str, entity: str) -> str:
    """``<prefix>-assets`` etc. for an outbox entity (``ValueError`` if unknown)."""
    if entity not in INDEX_SUFFIXES:
        raise ValueError(f"unknown outbox entity {entity!r}")
    return f"{prefix}-{INDEX_SUFFIXES[entity]}"


def knn_vector(dimension: int) -> dict[str, Any]:
    """Mapping of a ``knn_vector`` field: HNSW, Lucene engine, cosine similarity."""
    return {
        "type": "knn_vector",
        "dimension": dimension,
        "method": {
            "name": "hnsw",
            "space_type": "cosinesimil",
            "engine": "lucene",
            "parameters": {"m": 16, "ef_construction": 128},
        },
    }


def index_templates(prefix: str) -> dict[str, dict[str, Any]]:
    """``{template name: body}`` of the four composable index templates.

    Each body is ``{"index_patterns": [index], "priority", "template": {"settings",
    "mappings": {"properties"}}, "_meta"}`` (OpenSearch "Index templates"). Field names
    follow the documents of :func:`build_document`; dates are epoch milliseconds."""
    knn_settings = {"index": {"knn": True}}
    assets = {
        "imohash": {"type": "keyword"},
        "refs": {"type": "keyword"},
        "filenames": {"type": "keyword"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "size": {"type": "long"},
        "hidden": {"type": "boolean"},
        "duplicateGroups": {"type": "integer"},
        "clipModel": {"type": "keyword"},
        **{f"clip_{d}": knn_vector(d) for d in CLIP_DIMENSIONS},
        "createdAt": _DATE,
        "updatedAt": _DATE,
    }
    faces = {
        "asset": {"type": "integer"},
        "person": {"type": "integer"},
        "assigned": {"type": "keyword"},
        "model": {"type": "keyword"},
        "box": {"properties": {k: {"type": "float"} for k in ("x1", "y1", "x2", "y2")}},
        "landmarks": {"type": "float", "index": False},
        "score": {"type": "float"},
        "embedding": knn_vector(FACE_DIMENSION),
        "createdAt": _DATE,
    }
    persons = {
        "name": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
        "nameSource": {"type": "keyword"},
        "faceCount": {"type": "integer"},
        "representativeFace": {"type": "integer"},
        "createdAt": _DATE,
        "updatedAt": _DATE,
    }
    ocr_lines = {
        "asset": {"type": "integer"},
        "model": {"type": "keyword"},
        "line": {"type": "integer"},
        "text": {
            "type": "text",
            "analyzer": "trigram",
            "fields": {"keyword": {"type": "keyword", "ignore_above": 256}},
        },
        "polygon": {"type": "float", "index": False},
        "boxScore": {"type": "float"},
        "textScore": {"type": "float"},
    }
    trigram_settings = {
        "analysis": {
            "tokenizer": {"trigram": {"type": "ngram", "min_gram": 3, "max_gram": 3}},
            "analyzer": {"trigram": {"type": "custom", "tokenizer": "trigram", "filter": ["lowercase"]}},
        }
    }
    parts = {
        "asset": (knn_settings, assets),
        "face": (knn_settings, faces),
        "person": ({}, persons),
        "ocr_line": (trigram_settings, ocr_lines),
    }
    templates = {}
    for entity, (settings, properties) in parts.items():
        name = index_name(prefix, entity)
        templates[name] = {
            "index_patterns": [name],
            "priority": TEMPLATE_PRIORITY,
            "template": {"settings": settings, "mappings": {"properties": properties}},
            "_meta": {"managedBy": "immich-trt"},
        }
    return templates


# ---- documents (store thread) ----


def _millis(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def normalized(blob: bytes) -> list[float] | None:
    """A float32 embedding BLOB as an L2-normalised list of floats; None for a zero or
    non-finite vector (cosine similarity is undefined, and OpenSearch rejects it)."""
    vector = from_blob(blob)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        return None
    return (vector / norm).astype(np.float32).tolist()


def build_document(store: Store, entity: str, entity_id: int) -> dict[str, Any] | None:
    """The mirrored document of one entity, read from its CURRENT row; ``None`` when the
    row is gone (the drain sends a delete). ``ValueError`` for an unknown entity.

    Shapes (ids are SQLite integer ids; dates epoch milliseconds):

    - asset: ``{"imohash", "refs": [str], "filenames": [str], "width", "height"
      (pixels), "size" (bytes), "hidden", "duplicateGroups": [int], "clipModel",
      "clip_<D>": float[D] (normalised; only for D in CLIP_DIMENSIONS), "createdAt",
      "updatedAt"}``
    - face: ``{"asset", "person", "assigned", "model", "box": {"x1", "y1", "x2", "y2"}
      (pixels), "landmarks": float[10] (x, y pixels) or None, "score", "embedding":
      float[512] (normalised), "createdAt"}``
    - person: ``{"name", "nameSource", "faceCount", "representativeFace", "createdAt",
      "updatedAt"}``
    - ocr_line: ``{"asset", "model", "line", "text", "polygon": float[8] (normalised
      0..1), "boxScore", "textScore"}``
    """
    conn = store.conn
    entity_id = int(entity_id)
    if entity == "asset":
        summary = asset_summaries(store, [entity_id]).get(entity_id)
        if summary is None:
            return None
        row = conn.execute(
            "SELECT clip_model, clip_embedding, created_at, updated_at FROM assets WHERE id = ?", (entity_id,)
        ).fetchone()
        groups = [g for (g,) in conn.execute(
            "SELECT grp FROM duplicate_members WHERE asset = ? ORDER BY grp", (entity_id,)
        )]
        doc = {k: v for k, v in summary.items() if k != "id"}
        doc.update(
            duplicateGroups=groups,
            clipModel=row["clip_model"],
            createdAt=_millis(row["created_at"]),
            updatedAt=_millis(row["updated_at"]),
        )
        if row["clip_embedding"] is not None:
            dimension = len(row["clip_embedding"]) // 4
            vector = normalized(row["clip_embedding"]) if dimension in CLIP_DIMENSIONS else None
            if vector is not None:
                doc[f"clip_{dimension}"] = vector
        return doc
    if entity == "face":
        row = conn.execute(
            "SELECT asset, model, x1, y1, x2, y2, landmarks, score, embedding, person, assigned, created_at "
            "FROM faces WHERE id = ?",
            (entity_id,),
        ).fetchone()
        if row is None:
            return None
        doc = {
            "asset": row["asset"],
            "person": row["person"],
            "assigned": row["assigned"],
            "model": row["model"],
            "box": {"x1": row["x1"], "y1": row["y1"], "x2": row["x2"], "y2": row["y2"]},
            "landmarks": None if row["landmarks"] is None else from_blob(row["landmarks"]).tolist(),
            "score": row["score"],
            "createdAt": _millis(row["created_at"]),
        }
        vector = normalized(row["embedding"]) if len(row["embedding"]) // 4 == FACE_DIMENSION else None
        if vector is not None:
            doc["embedding"] = vector
        return doc
    if entity == "person":
        row = conn.execute(
            "SELECT name, name_source, representative_face, created_at, updated_at, "
            "(SELECT count(*) FROM faces WHERE faces.person = persons.id) AS face_count "
            "FROM persons WHERE id = ?",
            (entity_id,),
        ).fetchone()
        if row is None:
            return None
        return {
            "name": row["name"],
            "nameSource": row["name_source"],
            "faceCount": row["face_count"],
            "representativeFace": row["representative_face"],
            "createdAt": _millis(row["created_at"]),
            "updatedAt": _millis(row["updated_at"]),
        }
    if entity == "ocr_line":
        row = conn.execute(
            "SELECT asset, model, line, polygon, text, box_score, text_score FROM ocr_lines WHERE id = ?",
            (entity_id,),
        ).fetchone()
        if row is None:
            return None
        return {
            "asset": row["asset"],
            "model": row["model"],
            "line": row["line"],
            "text": row["text"],
            "polygon": orjson.loads(row["polygon"]),
            "boxScore": row["box_score"],
            "textScore": row["text_score"],
        }
    raise ValueError(f"unknown outbox entity {entity!r}")


def due_changes(store: Store, now: float, batch: int) -> list[dict[str, Any]]:
    """Outbox rows with ``next_attempt <= now`` (oldest first, at most ``batch``), each
    ``{"id", "entity", "entityId", "version", "attempts", "doc"}`` with ``doc`` the
    current document (None = delete); an unknown entity has ``"error"`` instead."""
    rows = store.conn.execute(
        "SELECT id, entity, entity_id, version, attempts FROM outbox WHERE next_attempt <= ? ORDER BY id LIMIT ?",
        (now, batch),
    ).fetchall()
    changes = []
    for row in rows:
        change = {
            "id": row["id"],
            "entity": row["entity"],
            "entityId": row["entity_id"],
            "version": row["version"],
            "attempts": row["attempts"],
            "doc": None,
        }
        if row["entity"] in ENTITIES:
            change["doc"] = build_document(store, row["entity"], row["entity_id"])
        else:
            change["error"] = f"unknown outbox entity {row['entity']!r}"
        changes.append(change)
    return changes


def settle(
    store: Store, acknowledged: list[tuple[int, int]], failed: list[tuple[int, float, str]]
) -> int:
    """Record a drain's outcome in one transaction and return the remaining backlog.

    ``acknowledged``: ``(outbox id, version)`` pairs deleted only if the version is
    unchanged. ``failed``: ``(outbox id, next_attempt unix seconds, error)``; attempts
    are incremented."""
    with store.transaction() as conn:
        conn.executemany("DELETE FROM outbox WHERE id = ? AND version = ?", acknowledged)
        conn.executemany(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
            [(next_attempt, error[:1000], row_id) for row_id, next_attempt, error in failed],
        )
    return backlog(store)


def backlog(store: Store) -> int:
    """Number of outbox change notices not yet mirrored."""
    return int(store.conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


def touch_all(store: Store) -> dict[str, int]:
    """Enqueue a change notice for every asset, face, person and OCR line (a reindex);
    returns ``{entity: rows touched}``. Failing notices become due at once."""
    tables = {"asset": "assets", "face": "faces", "person": "persons", "ocr_line": "ocr_lines"}
    counts = {}
    with store.transaction() as conn:
        for entity, table in tables.items():
            ids = [i for (i,) in conn.execute(f"SELECT id FROM {table}")]
            if ids:
                store.touch(entity, *ids)
            counts[entity] = len(ids)
    return counts


# ---- drain ----


def backoff_s(attempts: int) -> float:
    """Delay before retry number ``attempts`` (>= 1): 1 s doubling per attempt, capped
    at 300 s, times a uniform jitter of 0.8..1.2 (then capped again)."""
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** min(max(attempts, 1) - 1, 30))
    return min(BACKOFF_MAX_S, base * random.uniform(0.8, 1.2))


def bulk_body(prefix: str, changes: list[dict[str, Any]]) -> bytes:
    """NDJSON ``_bulk`` body: an ``index`` action line plus the document for each change
    with a document, a lone ``delete`` action line for each without (OpenSearch "Bulk")."""
    lines = []
    for change in changes:
        meta = {"_index": index_name(prefix, change["entity"]), "_id": str(change["entityId"])}
        if change["doc"] is None:
            lines.append(orjson.dumps({"delete": meta}))
        else:
            lines.append(orjson.dumps({"index": meta}))
            lines.append(orjson.dumps(change["doc"]))
    return b"\n".join(lines) + b"\n"


def _item_error(item: dict[str, Any]) -> str:
    error = item.get("error")
    if isinstance(error, dict):
        return f"{item.get('status')} {error.get('type')}: {error.get('reason')}"
    return f"{item.get('status')} {error}"


async def drain_once(
    store_call: Callable[..., Awaitable[Any]],
    client: OpenSearch,
    prefix: str,
    batch: int = 500,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """One drain pass: read up to ``batch`` due notices, send one ``_bulk`` request,
    settle the notices. Never raises for OpenSearch trouble.

    ``store_call`` is :meth:`Sidecar.call`; ``client`` a synchronous ``OpenSearch``;
    ``now`` (unix seconds, default the clock) decides which notices are due and is the
    base of their next attempt. Returns ``{"sent": index items acknowledged, "deleted":
    delete items acknowledged (404 = already gone = acknowledged), "failed": notices
    kept for a retry, "backlog": notices left, "error": the last error or None,
    "requestError": the error of a failed request or None}``."""
    now = time.time() if now is None else now
    changes = await store_call(due_changes, now, batch)
    result = {"sent": 0, "deleted": 0, "failed": 0, "error": None, "requestError": None}
    acknowledged: list[tuple[int, int]] = []
    failed: list[tuple[int, float, str]] = []

    def fail(change: dict[str, Any], error: str) -> None:
        failed.append((change["id"], now + backoff_s(change["attempts"] + 1), error))
        result["error"] = error

    for change in [c for c in changes if "error" in c]:
        fail(change, change["error"])
    sendable = [c for c in changes if "error" not in c]
    if sendable:
        try:
            response = await asyncio.to_thread(
                client.bulk, body=bulk_body(prefix, sendable), headers={"content-type": "application/x-ndjson"}
            )
            items = response.get("items") if isinstance(response, dict) else None
            if not isinstance(items, list) or len(items) != len(sendable):
                raise OpenSearchException(f"malformed _bulk response ({len(items or [])} items for {len(sendable)})")
        except OpenSearchException as exc:
            message = f"{type(exc).__name__}: {exc}"[:1000]
            result["requestError"] = message
            for change in sendable:
                fail(change, message)
        else:
            for change, entry in zip(sendable, items):
                action, item = next(iter(entry.items())) if entry else ("", {})
                status = int(item.get("status", 0) or 0)
                if 200 <= status < 300 or (action == "delete" and status == 404):
                    acknowledged.append((change["id"], change["version"]))
                    result["deleted" if action == "delete" else "sent"] += 1
                else:
                    fail(change, _item_error(item))
    result["failed"] = len(failed)
    result["backlog"] = await store_call(settle, acknowledged, failed) if changes else await store_call(backlog)
    if failed:
        log.warning("OpenSearch mirror: %d of %d changes failed: %s", len(failed), len(changes), result["error"])
    return result


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def make_client(url: str, timeout_s: float = 30.0) -> OpenSearch:
    """An opensearch-py client for ``url`` (``https://user:password@host:9200`` carries
    basic auth) with a request timeout and no transport retries."""
    # the client logs every failed request with a traceback at WARNING; the mirror
    # reports failures itself (status(), one log line per failed pass)
    logging.getLogger("opensearch").setLevel(logging.ERROR)
    return OpenSearch(hosts=[url], timeout=timeout_s, max_retries=0, retry_on_timeout=False)


class Mirror:
    """Keeps OpenSearch in step with the sidecar's store.

    ``sidecar`` is a started :class:`~immich_trt.sidecar.service.Sidecar`; ``settings``
    supplies ``opensearch_url`` (required) and ``opensearch_prefix``. :meth:`start`
    returns at once and runs :meth:`run` in the background: templates are put first
    (retried with backoff while OpenSearch is unreachable), then the outbox is drained
    every ``interval_s`` seconds or as soon as :meth:`notify` is called. Documents are
    never sent before the templates were acknowledged (an index created without them
    would get dynamic mappings), and after a failed request the templates are put again
    before the next drain (OpenSearch may have come back empty)."""

    def __init__(
        self, sidecar: Any, settings: Settings, *, interval_s: float = 5.0, batch: int = 500,
        timeout_s: float = 30.0,
    ) -> None:
        if not settings.opensearch_url:
            raise ValueError("the OpenSearch mirror needs settings.opensearch_url")
        self.sidecar = sidecar
        self.prefix = settings.opensearch_prefix
        self.interval_s = interval_s
        self.batch = batch
        self.client = make_client(settings.opensearch_url, timeout_s)
        self._templates_ok = False
        self._backlog: int | None = None
        self._last_error: str | None = None
        self._last_success: float | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # ---- lifecycle ----
    async def start(self) -> None:
        """Start the background loop; never blocks on OpenSearch, never raises for it."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name="opensearch-mirror")

    def notify(self) -> None:
        """Wake the background loop (call after writes that touched the outbox)."""
        self._wake.set()

    async def run(self) -> None:
        """Background loop: drain, then sleep ``interval_s`` (or a backoff after a
        failure) until woken by :meth:`notify`; ends on :meth:`stop`."""
        failures = 0
        while not self._stopping:
            delay = self.interval_s
            try:
                result = await self.drain()
                if result.get("requestError") or result.get("templateError"):
                    failures += 1
                    delay = min(delay, backoff_s(failures))
                else:
                    failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep mirroring whatever happened to one pass
                failures += 1
                delay = backoff_s(failures)
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("OpenSearch mirror pass failed")
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self) -> None:
        """Stop the background loop (an in-flight pass finishes) and close the client."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 60)
            except TimeoutError:
                self._task.cancel()
            self._task = None
        await asyncio.to_thread(self.client.close)

    # ---- operations ----
    async def ensure_templates(self) -> None:
        """Put the four index templates (raises ``OpenSearchException`` on failure)."""
        for name, body in index_templates(self.prefix).items():
            await asyncio.to_thread(self.client.indices.put_index_template, name=name, body=body)
        self._templates_ok = True
        self._last_success = time.time()

    async def drain(self) -> dict[str, Any]:
        """Drain until the outbox is empty or only failing notices remain. Returns the
        summed ``{"sent", "deleted", "failed", "backlog", "error", "requestError"}``,
        plus ``"templateError"`` when the templates could not be put (nothing sent)."""
        async with self._lock:
            return await self._drain_locked()

    async def _drain_locked(self) -> dict[str, Any]:
        total = {"sent": 0, "deleted": 0, "failed": 0, "error": None, "requestError": None}
        if not self._templates_ok:
            try:
                await self.ensure_templates()
            except OpenSearchException as exc:
                self._last_error = total["templateError"] = f"{type(exc).__name__}: {exc}"[:1000]
                self._backlog = total["backlog"] = await self.sidecar.call(backlog)
                log.warning("OpenSearch mirror: cannot put the index templates: %s", total["templateError"])
                return total
        while True:
            result = await drain_once(self.sidecar.call, self.client, self.prefix, self.batch)
            for key in ("sent", "deleted", "failed"):
                total[key] += result[key]
            total["backlog"] = self._backlog = result["backlog"]
            for key in ("error", "requestError"):
                total[key] = result[key] or total[key]
            if result["requestError"]:
                self._templates_ok = False
            else:
                if result["sent"] or result["deleted"] or result["failed"]:
                    self._last_success = time.time()
            if result["error"]:
                self._last_error = result["error"]
            elif result["sent"] or result["deleted"]:
                self._last_error = None
            if not (result["sent"] or result["deleted"]):
                return total

    async def reindex(self, recreate: bool = False) -> dict[str, Any]:
        """Touch every asset, face, person and OCR line, (re)put the templates, and
        drain. With ``recreate`` the four indices are deleted first, so they are created
        anew from the templates (mapping changes) and lose documents the store no longer
        has. Returns the :meth:`drain` summary plus ``"touched": {entity: rows}``.
        Raises ``OpenSearchException`` when the templates cannot be put (the notices
        stay queued for the background loop)."""
        async with self._lock:
            touched = await self.sidecar.call(touch_all)
            self._templates_ok = False
            await self.ensure_templates()
            if recreate:
                for entity in INDEX_SUFFIXES:
                    await asyncio.to_thread(
                        self.client.indices.delete, index=index_name(self.prefix, entity), params={"ignore": 404}
                    )
            result = await self._drain_locked()
        return {**result, "touched": touched}

    def status(self) -> dict[str, Any]:
        """``{"backlog": notices left after the last pass (None before the first),
        "lastError": str or None, "lastSuccess": unix seconds or None}``."""
        return {"backlog": self._backlog, "lastError": self._last_error, "lastSuccess": self._last_success}


async def reindex_command(settings: Settings, recreate: bool = False) -> int:
    """CLI body: open the store at ``settings.data_dir``, reindex into
    ``settings.opensearch_url``, print a summary. Exit code 0 when everything was
    mirrored, 1 when a backlog remains (or OpenSearch is not configured/reachable)."""
    from .service import Sidecar

    if not settings.opensearch_url:
        print("OPENSEARCH_URL is not set: nothing to reindex into")
        return 1
    sidecar = Sidecar(settings)
    await sidecar.start()
    mirror = Mirror(sidecar, settings)
    try:
        try:
            result = await mirror.reindex()
        except OpenSearchException as exc:
            print(f"OpenSearch at {redact_url(settings.opensearch_url)} failed: {exc}")
            return 1
        touched = ", ".join(f"{n} {entity}" for entity, n in result["touched"].items())
        print(
            f"reindexed into {settings.opensearch_url} ({settings.opensearch_prefix}-*): touched {touched}; "
            f"sent {result['sent']}, deleted {result['deleted']}, failed {result['failed']}, "
            f"backlog {result['backlog']}"
        )
        if result["backlog"]:
            print(f"last error: {result['error']}")
        return 0 if result["backlog"] == 0 else 1
    finally:
        await mirror.stop()
        await sidecar.stop()
