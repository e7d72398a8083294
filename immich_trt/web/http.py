"""HTTP plumbing shared by Immich's routes and the sidecar's: JSON errors and responses,
form reading, and the error middleware that turns failures into Immich's status codes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
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
    fields: dict[str, str | bytes] = {}
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name is None:
                await part.release()
                continue
            if part.name == "image" or part.filename is not None:
                fields[part.name] = bytes(await part.read())
            else:
                fields[part.name] = await part.text()
    elif request.content_type == "application/x-www-form-urlencoded":
        for name, value in (await request.post()).items():
            fields[name] = value if isinstance(value, str) else value.file.read()
    return fields
