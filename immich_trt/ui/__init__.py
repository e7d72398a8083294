"""The web page (``/ui``): people, duplicates, search, assets and status, in a browser.

Pages are server-rendered shells (Jinja2 templates through ``aiohttp-jinja2``) holding
layout, navigation and ``<template>`` elements, but no stored data: each page's own
small script (``static/*.js``, ES modules, no framework) fetches the data from the
``/v1`` API with ``fetch`` and fills the templates. So the page's data obeys ``/v1``'s
access rule exactly (:mod:`immich_trt.web.access`): with ``IMMICH_TRT_API_KEY`` the
script asks for the key once, keeps it in the tab's ``sessionStorage`` (or, when asked
to remember it, ``localStorage``) and sends it as ``Authorization: Bearer`` (never in
a URL); without a key, pages and data answer loopback clients only.

Every ``/ui`` response carries a strict Content-Security-Policy (:mod:`.security`): no
inline script or style, no ``eval``, nothing from another origin; every file the page
uses ships in this package. :func:`install` is called by
:func:`immich_trt.application.create_app` next to the sidecar's own install.
"""

from .pages import PAGES, PREFIX, install

__all__ = ["PAGES", "PREFIX", "install"]
