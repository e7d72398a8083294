"""HTTP plumbing shared by Immich's routes and the sidecar's: JSON errors and responses,
form reading, and the error middleware that turns failures into Immich's status codes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from .metrics import Metrics

log = logging.getLogger("immich_trt.server")

#: The :class:`Metrics` of an application.
METRICS = web.AppKey("metrics", Metrics)


class HTTPError(Exception):
    """An error answered as ``{"detail": ...}`` JSON with ``status``; ``reason`` labels the
    error metric, ``headers`` are added to the response (e.g. ``Retry-After``)."""

    def __init__(self, status: int, detail: Any, reason: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason or str(status)
        self.headers = headers or {}


def json_response(content: Any, status: int = 200) -> web.Response:
    """orjson with ``OPT_SERIALIZE_NUMPY``: float32 arrays in shortest round-trip form."""
    return web.Response(
        body=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status=status, content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler):
    """:class:`HTTPError` -> its JSON; aiohttp's own HTTP errors -> FastAPI's
    ``{"detail": reason}``; anything else -> a plain 500 ``Internal Server Error`` with
    the traceback logged, as Starlette. Counts requests by route and status."""
    metrics: Metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except HTTPError as exc:
        metrics.errors.labels(str(exc.status), exc.reason).inc()
        response = json_response({"detail": exc.detail}, status=exc.status)
        response.headers.update(exc.headers)
    except web.HTTPException as exc:
        metrics.errors.labels(str(exc.status), "http").inc()
        metrics.requests.labels(route, str(exc.status)).inc()
        if exc.status >= 400:
            # FastAPI's shape for routing and body-size errors: {"detail": "<reason>"}.
            response = json_response({"detail": exc.reason}, status=exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("Request to %s failed: %s", request.path, exc)
        metrics.errors.labels("500", type(exc).__name__).inc()
        response = web.Response(status=500, text="Internal Server Error")
    metrics.requests.labels(route, str(response.status)).inc()
    return response


class _Parts:
    """python-multipart callbacks collecting each part's headers and data."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[bytes, bytes], list[bytes]]] = []
        self._field = b""

    def on_part_begin(self) -> None:
        self.parts.append(({}, []))

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        headers = self.parts[-1][0]
        key = self._field.lower()
        headers[key] = headers.get(key, b"") + data[start:end]

    def on_header_end(self) -> None:
        self._field = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1][1].append(data[start:end])


def parse_multipart(body: bytes, content_type: str) -> dict[str, str | bytes]:
    """The fields of a ``multipart/form-data`` body, as :func:`read_form` returns them:
    ``image`` and parts with a filename as bytes, the others decoded as text (their
    ``charset``, UTF-8 by default); parts without a name are skipped. Raises
    ``ValueError`` (``python_multipart`` errors, a missing boundary, an unterminated
    body, text that does not decode)."""
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ValueError("multipart body without a boundary")
    collected = _Parts()
    callbacks = {name: getattr(collected, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_part_data")}  # fmt: skip
    parser = MultipartParser(boundary, callbacks)
    if parser.write(body) != len(body) or parser.state != MultipartState.END:
        raise ValueError("multipart body not terminated by its closing boundary")
    fields: dict[str, str | bytes] = {}
    for headers, chunks in collected.parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            continue
        key = name.decode("utf-8", "surrogateescape")
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if key == "image" or b"filename" in disposition:
            fields[key] = bytes(data)
        else:
            _, part_type = parse_options_header(headers.get(b"content-type", b"text/plain"))
            try:
                fields[key] = bytes(data).decode(part_type.get(b"charset", b"utf-8").decode("latin-1"))
            except LookupError as exc:  # an unknown charset
                raise ValueError(str(exc)) from exc
    return fields


async def read_form(request: web.Request) -> dict[str, str | bytes]:
    """Form fields by name: ``image`` as raw bytes (any filename or content type),
    everything else as text. Multipart and urlencoded bodies; the last value of a
    repeated field wins (Starlette ``FormData.get``). A body that cannot be parsed is a
    400 ``There was an error parsing the body``, as FastAPI answers."""
    try:
        return await _read_form(request)
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        log.info("Unparsable form body on %s: %s", request.path, type(exc).__name__)
        raise HTTPError(400, "There was an error parsing the body", "bad_form") from None


async def _read_form(request: web.Request) -> dict[str, str | bytes]:
    from python_multipart.multipart import parse_options_header

    fields: dict[str, str | bytes] = {}
    # not request.content_type: aiohttp parses it with the email package, ~0.17 ms a
    # request, its cache missed by every new multipart boundary
    raw_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    mime = parse_options_header(raw_type)[0].decode("latin-1").lower()
    if mime.startswith("multipart/"):
        # the whole body at once (aiohttp's C parser, client_max_size enforced), then
        # python-multipart, the parser of Starlette and so of immich-ml: ~0.1 ms for a
        # preview, where aiohttp's streaming part reader spends ~1 ms of Python per form
        fields = parse_multipart(await request.read(), raw_type)
    elif mime == "application/x-www-form-urlencoded":
        for name, value in (await request.post()).items():
            fields[name] = value if isinstance(value, str) else value.file.read()
    return fields
