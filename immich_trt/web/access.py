"""Who may reach the sidecar's data and its web page: one access rule for ``/v1`` and ``/ui``.

* With ``IMMICH_TRT_API_KEY`` set, a data route (``/v1``) needs ``Authorization: Bearer
  <key>`` (401 otherwise; compared in constant time). A page route (``/ui``) is served
  to anyone: a page is a shell without data whose script asks for the key once and
  sends it as the same Bearer header on every ``/v1`` call, so the data is guarded by
  the data routes' rule (a browser cannot attach a header to a navigation).
* Without a key, only loopback clients are served, data and pages alike (403 otherwise;
  :func:`immich_trt.loopback.is_loopback`).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from ..loopback import is_loopback
from .http import HTTPError

#: Where the sidecar's data routes live (the rule's data routes).
DATA_PREFIX = "/v1"
#: Where the web page lives (the rule's page routes).
PAGE_PREFIX = "/ui"


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme is
    case-insensitive, RFC 7235), else None."""
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def under(path: str, prefix: str) -> bool:
    """Whether the URL ``path`` is ``prefix`` or below it (``/v1``, ``/v1/...``; not ``/v1x``)."""
    return path == prefix or path.startswith(prefix + "/")


def access_error(request: web.Request, api_key: str | None, data: bool) -> HTTPError | None:
    """The refusal of ``request`` under the rule above (``data``: a data route, else a
    page route), or None when it may be served."""
    if api_key is not None:
        if not data:
            return None
        token = bearer_token(request.headers.get("Authorization", "")) or ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            return HTTPError(401, "missing or wrong API key (Authorization: Bearer <IMMICH_TRT_API_KEY>)",
                             "unauthorized")
        return None
    if not is_loopback(request.remote):
        return HTTPError(403, "the sidecar serves loopback clients only unless IMMICH_TRT_API_KEY is set",
                         "forbidden")
    return None


def make_access_middleware(api_key: str | None, prefix: str, data: bool = True):
    """Middleware applying :func:`access_error` to the routes under ``prefix`` (``data``:
    they serve data, see the module docstring); other routes pass untouched."""

    @web.middleware
    async def access(request: web.Request, handler):
        """Refuse a request under ``prefix`` with the rule's 401 or 403; pass everything
        else to ``handler``."""
        if under(request.path, prefix):
            refusal = access_error(request, api_key, data)
            if refusal is not None:
                raise refusal
        return await handler(request)

    return access
