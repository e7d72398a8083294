"""Response headers of every ``/ui`` response: a strict Content-Security-Policy and its
companions, and caching rules (shells and scripts are revalidated, so a new version is
picked up at once).

The policy allows scripts, styles, images and ``fetch`` from this origin only (images
also from ``blob:`` URLs: with an API key, thumbnails are fetched with the Bearer
header and shown from a blob), no inline script or style (no ``'unsafe-inline'``), no
``eval``, no plugins, no framing, no ``<base>`` and no form posting anywhere."""

from __future__ import annotations

from aiohttp import web

from ..web.access import under

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def headers_hook(prefix: str, static_prefix: str):
    """An ``on_response_prepare`` hook adding :data:`HEADERS` to every response under
    ``prefix`` (errors included), with ``Cache-Control: no-cache`` for the files under
    ``static_prefix`` (revalidated by ETag/Last-Modified) and ``no-store`` for the rest."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        """Set the headers on a response about to be sent (see :func:`headers_hook`)."""
        if not under(request.path, prefix):
            return
        response.headers.update(HEADERS)
        response.headers["Cache-Control"] = "no-cache" if under(request.path, static_prefix) else "no-store"

    return add_headers
