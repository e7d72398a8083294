"""The ``/ui`` routes: one server-rendered shell per page, the package's static files,
the access rule and the security headers (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .. import __version__
from ..web import STATE
from ..web.access import PAGE_PREFIX, make_access_middleware
from .security import headers_hook

PREFIX = PAGE_PREFIX
STATIC_PREFIX = PREFIX + "/static"
STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class Page:
    """One page: its ``path`` (aiohttp syntax; a ``{name}`` part reaches the template as
    ``name``), ``template``, ``script`` (its module under ``static/``), the navigation
    ``section`` it belongs to and its ``title``."""

    path: str
    template: str
    script: str
    section: str
    title: str


PAGES: tuple[Page, ...] = (
    Page("", "status.html", "status.js", "status", "Status"),
    Page("/", "status.html", "status.js", "status", "Status"),
    Page("/people", "people.html", "people.js", "people", "People"),
    Page(r"/people/{person_id:\d{1,18}}", "person.html", "person.js", "people", "Person"),
    Page("/faces/unassigned", "unassigned.html", "unassigned.js", "unassigned", "Unassigned faces"),
    Page("/duplicates", "duplicates.html", "duplicates.js", "duplicates", "Duplicates"),
    Page("/search", "search.html", "search.js", "search", "Search"),
    Page("/assets/{ref:.+}", "asset.html", "asset.js", "search", "Asset"),
)

#: Navigation entries: (section, path, label).
NAVIGATION = (
    ("status", PREFIX, "Status"),
    ("people", PREFIX + "/people", "People"),
    ("unassigned", PREFIX + "/faces/unassigned", "Unassigned faces"),
    ("duplicates", PREFIX + "/duplicates", "Duplicates"),
    ("search", PREFIX + "/search", "Search"),
)


def _handler(page: Page):
    """The GET handler of ``page``: its template with the page's context (no stored data)."""

    async def handle(request: web.Request) -> web.Response:
        """Render the shell of one page (see :func:`_handler`)."""
        settings = request.app[STATE].settings
        context = {
            "page": page,
            "navigation": NAVIGATION,
            "auth": "key" if settings.api_key else "loopback",
            "version": __version__,
            "static": STATIC_PREFIX,
            "duplicate_threshold": settings.duplicate_threshold,
            **request.match_info,
        }
        return aiohttp_jinja2.render_template(page.template, request, context)

    return handle


def install(app: web.Application) -> None:
    """Add the page to ``app`` (made by :func:`immich_trt.server.app.create_app`, with the
    sidecar installed, not yet started): the templates, the ``/ui`` routes and static
    files, the access rule (:mod:`immich_trt.web.access`) and the security headers."""
    settings = app[STATE].settings
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("immich_trt.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.middlewares.append(make_access_middleware(settings.api_key, PREFIX, data=False))
    app.on_response_prepare.append(headers_hook(PREFIX, STATIC_PREFIX))
    for page in PAGES:
        app.router.add_get(PREFIX + page.path, _handler(page), allow_head=False)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
