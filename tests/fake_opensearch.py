"""A small in-process stand-in for an OpenSearch node, for the mirror's tests.

It speaks just enough of OpenSearch's documented REST API over real HTTP on a loopback
port for opensearch-py to talk to it: ``GET /`` (cluster info), composable index
templates (``PUT|GET|DELETE /_index_template/<name>``, bodies validated), ``_bulk``
(NDJSON parsed as documented: an action line then a source line for index/create, an
action line alone for delete, an action line plus ``{"doc": ...}`` for update; malformed
bodies answered 400), ``GET /<index>/_doc/<id>``, ``GET /<index>/_count``,
``DELETE /<index>`` and ``POST /<index>/_refresh``. Documents live in
``fake.docs[index][id]``; ``knn_vector`` values are checked against the dimension of the
matching template as a real mapping would.

Failure injection: :meth:`FakeOpenSearch.fail_next` (whole requests answer a status),
:meth:`FakeOpenSearch.fail_ids` (bulk items answer 429), :meth:`FakeOpenSearch.down` /
:meth:`FakeOpenSearch.up` (the port refuses connections, then listens again), and
``before_bulk``, a callable run with the parsed operations before a bulk is applied.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

BULK_ACTIONS = ("index", "create", "update", "delete")


class BadRequest(Exception):
    def __init__(self, reason: str, kind: str = "illegal_argument_exception", status: int = 400) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.status = reason, kind, status


def error_body(kind: str, reason: str, status: int) -> dict[str, Any]:
    """OpenSearch's error response shape."""
    cause = {"type": kind, "reason": reason}
    return {"error": {"root_cause": [cause], **cause}, "status": status}


class FakeOpenSearch:
    """The fake node. Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.templates: dict[str, dict[str, Any]] = {}
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.bulk_requests: list[list[tuple[str, str, str]]] = []  # per request: (action, index, id)
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.bulk_content_types: list[str] = []
        self.before_bulk: Callable[[list[tuple[str, str, str]]], None] | None = None
        self._fail_next: list[int] = []
        self._fail_ids: set[Any] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOpenSearch:
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def down(self) -> None:
        """Stop listening: connections to the port are refused."""
        self.stop()

    def up(self) -> None:
        """Listen again on the same port, with the same contents."""
        if self._server is None:
            self.start()

    def __enter__(self) -> FakeOpenSearch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- failure injection and inspection ----
    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` requests (other than ``GET /``) answer ``status`` with an error body."""
        with self.lock:
            self._fail_next = [status] * n

    def fail_ids(self, ids: Iterable[str | tuple[str, str]]) -> None:
        """Bulk items whose ``_id`` (or ``(index, _id)``) is listed answer 429 until
        cleared with ``fail_ids(())``."""
        with self.lock:
            self._fail_ids = {i if isinstance(i, tuple) else str(i) for i in ids}

    def wipe(self) -> None:
        """Forget every template and index (a node that came back empty)."""
        with self.lock:
            self.templates.clear()
            self.docs.clear()

    def count(self, index: str) -> int:
        with self.lock:
            return len(self.docs.get(index, {}))

    def operations(self) -> list[tuple[str, str, str]]:
        """Every bulk operation received so far, in order: ``(action, index, id)``."""
        with self.lock:
            return [op for request in self.bulk_requests for op in request]

    # ---- request handling (server threads) ----
    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        parts = [unquote(p) for p in urlsplit(path).path.split("/") if p]
        with self.lock:
            self.requests.append((method, path))
            if parts and self._fail_next:
                status = self._fail_next.pop(0)
                return status, error_body("unavailable_exception", f"injected failure {status}", status)
        try:
            return self._route(method, parts, headers, body)
        except BadRequest as exc:
            return exc.status, error_body(exc.kind, exc.reason, exc.status)

    def _route(self, method: str, parts: list[str], headers: Any, body: bytes) -> tuple[int, Any]:
        if not parts and method in ("GET", "HEAD"):
            return 200, {
                "name": "fake-node",
                "cluster_name": "fake",
                "cluster_uuid": "fake-uuid",
                "version": {"distribution": "opensearch", "number": "2.19.0", "lucene_version": "9.12.1"},
                "tagline": "The OpenSearch Project: https://opensearch.org/",
            }
        if parts and parts[0] == "_index_template" and len(parts) == 2:
            return self._template(method, parts[1], body)
        if parts and parts[-1] == "_bulk" and len(parts) <= 2 and method in ("POST", "PUT"):
            return self._bulk(parts[0] if len(parts) == 2 else None, headers, body)
        if len(parts) == 3 and parts[1] == "_doc" and method == "GET":
            with self.lock:
                source = self.docs.get(parts[0], {}).get(parts[2])
            if source is None:
                return 404, {"_index": parts[0], "_id": parts[2], "found": False}
            return 200, {"_index": parts[0], "_id": parts[2], "found": True, "_source": source}
        if len(parts) == 2 and parts[1] == "_count" and method in ("GET", "POST"):
            if parts[0] not in self.docs:
                raise BadRequest(f"no such index [{parts[0]}]", "index_not_found_exception", 404)
            return 200, {"count": self.count(parts[0])}
        if len(parts) == 2 and parts[1] == "_refresh" and method in ("POST", "GET"):
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        if len(parts) == 1 and method == "DELETE" and not parts[0].startswith("_"):
            with self.lock:
                if self.docs.pop(parts[0], None) is None:
                    raise BadRequest(f"no such index [{parts[0]}]", "index_not_found_exception", 404)
            return 200, {"acknowledged": True}
        raise BadRequest(f"no handler found for uri [/{'/'.join(parts)}] and method [{method}]", status=405)

    # ---- index templates ----
    def _template(self, method: str, name: str, body: bytes) -> tuple[int, Any]:
        with self.lock:
            if method == "GET":
                if name not in self.templates:
                    raise BadRequest(f"index template matching [{name}] not found", "resource_not_found_exception", 404)
                return 200, {"index_templates": [{"name": name, "index_template": self.templates[name]}]}
            if method == "DELETE":
                if self.templates.pop(name, None) is None:
                    raise BadRequest(f"index_template [{name}] missing", "resource_not_found_exception", 404)
                return 200, {"acknowledged": True}
        if method not in ("PUT", "POST"):
            raise BadRequest(f"method [{method}] not allowed for [/_index_template/{name}]", status=405)
        template = _json(body, "index template body")
        validate_template(template)
        with self.lock:
            self.templates[name] = template
        return 200, {"acknowledged": True}

    def _template_for(self, index: str) -> dict[str, Any] | None:
        matching = [
            t for t in self.templates.values() if any(fnmatch.fnmatchcase(index, p) for p in t["index_patterns"])
        ]
        return max(matching, key=lambda t: t.get("priority", 0), default=None)

    # ---- bulk ----
    def _bulk(self, default_index: str | None, headers: Any, body: bytes) -> tuple[int, Any]:
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in ("application/x-ndjson", "application/json"):
            return 406, {"error": f"Content-Type header [{content_type}] is not supported", "status": 406}
        with self.lock:
            self.bulk_content_types.append(content_type)
        operations = parse_bulk(body, default_index)
        ops = [(action, index, doc_id) for action, index, doc_id, _ in operations]
        if self.before_bulk is not None:
            self.before_bulk(ops)
        started = time.monotonic()
        items = []
        with self.lock:
            self.bulk_requests.append(ops)
            for action, index, doc_id, source in operations:
                items.append({action: self._apply(action, index, doc_id, source)})
        took = int((time.monotonic() - started) * 1000)
        errors = any(next(iter(i.values())).get("error") is not None for i in items)
        return 200, {"took": took, "errors": errors, "items": items}

    def _apply(self, action: str, index: str, doc_id: str, source: Any) -> dict[str, Any]:
        item: dict[str, Any] = {"_index": index, "_id": doc_id}
        if doc_id in self._fail_ids or (index, doc_id) in self._fail_ids:
            reason = f"rejected execution of bulk item [{index}][{doc_id}]: queue capacity exceeded"
            return {**item, "status": 429, "error": {"type": "rejected_execution_exception", "reason": reason}}
        docs = self.docs.setdefault(index, {})
        exists = doc_id in docs
        if action == "delete":
            if not exists:
                return {**item, "status": 404, "result": "not_found"}
            del docs[doc_id]
            return {**item, "status": 200, "result": "deleted"}
        if action == "create" and exists:
            reason = f"[{doc_id}]: version conflict, document already exists"
            return {**item, "status": 409, "error": {"type": "version_conflict_engine_exception", "reason": reason}}
        if action == "update":
            if not exists:
                reason = f"[{doc_id}]: document missing"
                return {**item, "status": 404, "error": {"type": "document_missing_exception", "reason": reason}}
            source = {**docs[doc_id], **source.get("doc", {})}
        problem = self._mapping_problem(index, source)
        if problem is not None:
            return {**item, "status": 400, "error": {"type": "mapper_parsing_exception", "reason": problem}}
        docs[doc_id] = source
        if exists:
            return {**item, "status": 200, "result": "updated"}
        return {**item, "status": 201, "result": "created"}

    def _mapping_problem(self, index: str, source: dict[str, Any]) -> str | None:
        template = self._template_for(index)
        if template is None:
            return None
        properties = template["template"]["mappings"]["properties"]
        for field, mapping in properties.items():
            if mapping.get("type") != "knn_vector" or source.get(field) is None:
                continue
            value = source[field]
            if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
                return f"failed to parse field [{field}] of type [knn_vector]: not an array of numbers"
            if len(value) != mapping["dimension"]:
                return f"Vector dimension mismatch. Expected: {mapping['dimension']}, Given: {len(value)}"
        return None


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"failed to parse {what}: {exc}", "parse_exception") from exc


def validate_template(template: Any) -> None:
    """Raise :class:`BadRequest` unless ``template`` is a composable index template with
    ``index_patterns`` (list of str), ``template.settings`` and
    ``template.mappings.properties``, whose ``knn_vector`` fields have a ``dimension``
    and a ``method`` and live in an index with ``index.knn`` true."""
    if not isinstance(template, dict):
        raise BadRequest("index template must be an object", "parse_exception")
    patterns = template.get("index_patterns")
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise BadRequest("index_patterns must be a non-empty list of strings", "action_request_validation_exception")
    body = template.get("template")
    if not isinstance(body, dict) or not isinstance(body.get("settings"), dict):
        raise BadRequest("template.settings must be an object", "action_request_validation_exception")
    mappings = body.get("mappings")
    if not isinstance(mappings, dict) or not isinstance(mappings.get("properties"), dict):
        raise BadRequest("template.mappings.properties must be an object", "mapper_parsing_exception")
    settings = body["settings"]
    knn_enabled = settings.get("index.knn") is True or (settings.get("index") or {}).get("knn") is True
    for field, mapping in mappings["properties"].items():
        if not isinstance(mapping, dict):
            raise BadRequest(f"mapping of [{field}] must be an object", "mapper_parsing_exception")
        if mapping.get("type") != "knn_vector":
            continue
        dimension = mapping.get("dimension")
        if not isinstance(dimension, int) or not 1 <= dimension <= 16000:
            raise BadRequest(f"knn_vector [{field}] needs a dimension in 1..16000", "mapper_parsing_exception")
        method = mapping.get("method")
        if not isinstance(method, dict) or not method.get("name"):
            raise BadRequest(f"knn_vector [{field}] needs a method with a name", "mapper_parsing_exception")
        if not knn_enabled:
            raise BadRequest(f"knn_vector [{field}] needs index.knn: true", "illegal_argument_exception")


def parse_bulk(body: bytes, default_index: str | None) -> list[tuple[str, str, str, Any]]:
    """Operations ``(action, index, id, source)`` of an NDJSON bulk body, as OpenSearch
    parses it; :class:`BadRequest` for a malformed body (whole request rejected)."""
    if not body.endswith(b"\n"):
        raise BadRequest("The bulk request must be terminated by a newline [\\n]")
    lines = body.split(b"\n")[:-1]
    operations = []
    number = 0
    auto_id = 0
    while number < len(lines):
        line = lines[number]
        number += 1
        if not line.strip():
            continue
        try:
            action_line = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"Malformed action/metadata line [{number}]: {exc}") from exc
        if not isinstance(action_line, dict) or len(action_line) != 1:
            raise BadRequest(f"Malformed action/metadata line [{number}], expected START_OBJECT with one action")
        action, meta = next(iter(action_line.items()))
        if action not in BULK_ACTIONS:
            raise BadRequest(
                f"Malformed action/metadata line [{number}], expected field [create], [delete], [index] or "
                f"[update] but found [{action}]"
            )
        if not isinstance(meta, dict):
            raise BadRequest(f"Malformed action/metadata line [{number}], expected START_OBJECT")
        index = meta.get("_index", default_index)
        if not index:
            raise BadRequest("Validation Failed: 1: index is missing;", "action_request_validation_exception")
        doc_id = meta.get("_id")
        if action != "index" and action != "create" and doc_id is None:
            raise BadRequest("Validation Failed: 1: id is missing;", "action_request_validation_exception")
        source = None
        if action != "delete":
            if number >= len(lines) or not lines[number].strip():
                raise BadRequest(f"action [{action}] on line [{number}] has no source line")
            source = _json(lines[number], f"source on line [{number + 1}]")
            number += 1
            if not isinstance(source, dict):
                raise BadRequest(f"source on line [{number}] must be an object", "mapper_parsing_exception")
        if doc_id is None:
            auto_id += 1
            doc_id = f"auto-{time.time_ns()}-{auto_id}"
        operations.append((action, str(index), str(doc_id), source))
    if not operations:
        raise BadRequest("Validation Failed: 1: no requests added;", "action_request_validation_exception")
    return operations


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: down() drops every client

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fake: FakeOpenSearch = self.server.fake  # type: ignore[attr-defined]
        status, payload = fake.handle(self.command, self.path, self.headers, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass
