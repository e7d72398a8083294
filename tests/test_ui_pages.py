"""The web page's server side in-process: every /ui page and static file is served with
the strict Content-Security-Policy, holds no inline script or style and no stored data,
escapes what comes from the URL, and follows /v1's access rule (a key: pages open,
data needs the key; no key: loopback clients only). The pages in a real browser:
tests/test_ui_browser.py."""

from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_sidecar_api import _peer_middleware

from immich_trt.application import create_app
from immich_trt.config import Settings
from immich_trt.tools.testing import offline_settings
from immich_trt.ui import PAGES
from immich_trt.ui.pages import STATIC_DIR
from immich_trt.ui.security import CONTENT_SECURITY_POLICY

PAGE_URLS = ["/ui", "/ui/", "/ui/people", "/ui/people/7", "/ui/faces/unassigned", "/ui/duplicates", "/ui/search",
             "/ui/assets/12", "/ui/assets/%2Fhome%2Fada%2Fbeach.jpg", "/ui/assets/home/ada/beach.jpg"]


@pytest.fixture
def settings(tmp_path: Path):
    # no model is used: the pages never run one
    return offline_settings(tmp_path / "cache", runtime="onnxruntime", model_ttl=0, data_dir=tmp_path / "data")


class Markup(HTMLParser):
    """What a page's HTML holds: scripts (src, inline text), elements with style or on*
    attributes, <style> elements, and every attribute value."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.styled: list[str] = []
        self.handlers: list[str] = []
        self.style_elements = 0
        self.attributes: list[tuple[str, str, str]] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        self.attributes += [(tag, name, value or "") for name, value in attrs]
        if tag == "script":
            self.scripts.append({"src": values.get("src"), "type": values.get("type"), "text": ""})
            self._in_script = True
        if tag == "style":
            self.style_elements += 1
        if "style" in values:
            self.styled.append(tag)
        self.handlers += [f"{tag}[{name}]" for name in values if name.startswith("on")]

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1]["text"] += data


def parse(html: str) -> Markup:
    markup = Markup()
    markup.feed(html)
    return markup


async def test_every_page_is_a_shell_with_a_strict_policy_and_no_inline_code(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings))
    for url in PAGE_URLS:
        response = await client.get(url)
        html = await response.text()
        assert response.status == 200 and response.content_type == "text/html", url
        headers = response.headers
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
        markup = parse(html)
        assert markup.scripts and all(s["src"] and s["type"] == "module" and not s["text"].strip()
                                      for s in markup.scripts), url
        assert not markup.styled and not markup.handlers and markup.style_elements == 0, url
        for tag, name, value in markup.attributes:  # nothing leaves this origin
            if name in ("src", "href"):
                assert value.startswith("/ui") or value.startswith("#"), (url, tag, value)
    policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY and "*" not in CONTENT_SECURITY_POLICY


async def test_every_static_file_is_served_with_its_type_and_the_policy(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings))
    # JavaScript under either registered name (a browser runs modules of both with nosniff)
    types = {".js": {"text/javascript", "application/javascript"}, ".css": {"text/css"}, ".svg": {"image/svg+xml"}}
    files = sorted(STATIC_DIR.iterdir())
    assert {f.suffix for f in files} == set(types)
    for path in files:
        response = await client.get(f"/ui/static/{path.name}")
        assert response.status == 200 and response.content_type in types[path.suffix], path.name
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["Cache-Control"] == "no-cache" and "ETag" in response.headers
        assert await response.read() == path.read_bytes()
    # every module a page loads exists, and so does every module they import
    for page in PAGES:
        assert (STATIC_DIR / page.script).is_file(), page.script
    for script in STATIC_DIR.glob("*.js"):
        for imported in re.findall(r'from "\./([\w.]+)"', script.read_text()):
            assert (STATIC_DIR / imported).is_file(), (script.name, imported)
    assert (await client.get("/ui/static/../pages.py")).status in (403, 404)
    assert (await client.get("/ui/static/nothing.js")).status == 404


def test_scripts_build_the_page_without_eval_or_html_strings() -> None:
    """Text from the store (names, OCR lines, file names) reaches the page only through
    textContent and attributes: no innerHTML, no eval, no string-built code, no logging
    that could carry the key."""
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                          "setTimeout(\"", "console.", "style.cssText", "setAttribute(\"style\""):
            assert forbidden not in text, (script.name, forbidden)


async def test_values_from_the_url_are_escaped(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings))
    response = await client.get('/ui/assets/"><script>alert(1)</script>')
    html = await response.text()
    assert response.status == 200 and "<script>alert(1)</script>" not in html
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert len(parse(html).scripts) == 1
    assert (await client.get("/ui/people/abc")).status == 404
    assert (await client.get("/ui/people/1234567890123456789012")).status == 404
    assert (await client.get("/ui/nothing")).status == 404


@pytest.mark.parametrize("peer", ["192.0.2.7", "2001:db8::5", "::ffff:10.1.2.3"])
async def test_without_a_key_pages_are_for_loopback_clients_only(aiohttp_client, settings, peer: str) -> None:
    app = create_app(settings)
    app.middlewares.insert(0, _peer_middleware(peer))
    client = await aiohttp_client(app)
    for url in ("/ui", "/ui/people", "/ui/static/ui.js", "/ui/assets/1"):
        response = await client.get(url, headers={"X-Forwarded-For": "127.0.0.1"})
        assert response.status == 403, url
        assert "loopback" in (await response.json())["detail"]
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert (await client.get("/v1/status")).status == 403


async def test_with_a_key_pages_are_open_and_data_needs_the_key(aiohttp_client, settings) -> None:
    app = create_app(dataclasses.replace(settings, api_key="s3cret-key"))
    app.middlewares.insert(0, _peer_middleware("192.0.2.7"))
    client = await aiohttp_client(app)
    page = await client.get("/ui/people")
    html = await page.text()
    assert page.status == 200 and 'data-auth="key"' in html and "s3cret" not in html
    assert (await client.get("/ui/static/ui.js")).status == 200
    assert (await client.get("/v1/persons")).status == 401
    assert (await client.get("/v1/persons", headers={"Authorization": "Bearer s3cret-key"})).status == 200


async def test_loopback_pages_say_no_key_is_needed(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings))
    assert 'data-auth="loopback"' in await (await client.get("/ui")).text()


async def test_the_page_can_be_turned_off(aiohttp_client, settings) -> None:
    assert Settings.from_env({}).ui is True and Settings.from_env({"IMMICH_TRT_UI": "false"}).ui is False
    client = await aiohttp_client(create_app(dataclasses.replace(settings, ui=False)))
    assert (await client.get("/ui")).status == 404
    assert (await client.get("/v1/status")).status == 200
    assert "Content-Security-Policy" not in (await client.get("/ping")).headers
