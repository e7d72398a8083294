"""The web page in a real browser: Playwright driving Debian's ``chromium`` against a
live ``immich-trt serve`` (a subprocess on loopback, test-pack models through the
bundled Triton) whose sidecar holds the demo library (``immich_trt/tools/demo.py``),
ingested by ``immich-trt ingest``, clustered and grouped.

Each page renders its data with no console error and no request leaving the server's
origin; the actions change the store (checked through ``/v1``); OCR polygons and face
boxes are drawn where the store says; pictures load lazily; the API key is asked once
and sent as the Bearer header only; the test-pack banner shows. Without chromium the
tests skip with the reason, or fail when ``IMMICH_TRT_BROWSER_TESTS=required`` (as in
``.ci/run``)."""

from __future__ import annotations

import os
import secrets
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_bench_script
from immich_trt.tools.demo import serve_demo_library
from immich_trt.tools.screenshots import (
    CHROMIUM,
    VISIBLE_PICTURES_LOADED,
    launch_args,
    pages,
    prepare,
    take_screenshots,
)
from immich_trt.ui.security import CONTENT_SECURITY_POLICY


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("IMMICH_TRT_BROWSER_TESTS") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=launch_args())
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def library(browser, model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """The live server (Triton) with the demo library, ingested by ``immich-trt ingest``."""
    served = serve_demo_library(model_cache, tmp_path_factory.mktemp("ui-browser"))
    yield served
    served.stop()


class Tab:
    """A browser page that records console errors, uncaught errors and every request."""

    def __init__(self, browser, base: str, **context) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, **context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request))

    def open(self, path: str):
        """Go to ``path`` and wait until the page has filled itself; returns the response."""
        response = self.page.goto(self.base + path)
        self.page.wait_for_selector("body[data-ready]")
        return response

    def act(self, do) -> None:
        """Run ``do()`` (a click...) and wait until the page has loaded its data again."""
        before = int(self.page.get_attribute("body", "data-ready") or 0)
        do()
        self.page.wait_for_function("before => Number(document.body.dataset.ready) > before", arg=before)

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).all_inner_texts()

    def ids(self, selector: str, attribute: str) -> list[int]:
        return [int(v) for v in self.page.eval_on_selector_all(selector, f"els => els.map(e => e.dataset.{attribute})")]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, library):
    opened = Tab(browser, library.url)
    yield opened
    opened.close()


def person_of(library, name: str) -> int:
    return library.asset(name)["faces"][0]["personId"]


def rect(page, selector: str) -> dict:
    return page.eval_on_selector(selector, "e => { const r = e.getBoundingClientRect(); "
                                           "return {x: r.x, y: r.y, width: r.width, height: r.height}; }")


def expected_box(image: dict, xs: list[float], ys: list[float]) -> dict:
    """The screen box of normalised points over the drawn picture ``image``."""
    return {"x": image["x"] + min(xs) * image["width"], "y": image["y"] + min(ys) * image["height"],
            "width": (max(xs) - min(xs)) * image["width"], "height": (max(ys) - min(ys)) * image["height"]}


def assert_close(drawn: dict, expected: dict, tolerance: float = 1.5) -> None:
    for side in ("x", "y", "width", "height"):
        assert abs(drawn[side] - expected[side]) <= tolerance, (side, drawn, expected)


# ----------------------------------------------------------------------------- pages


def test_every_page_renders_its_data_under_the_policy(tab, library) -> None:
    status = library.call("/v1/status")
    menu = library.asset("menu.png")
    ada = library.asset("beach-ada.png")["faces"][0]
    for stem, path in pages(library):
        response = tab.open(path)
        assert response.status == 200 and response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        inline = tab.page.evaluate("document.querySelectorAll('script:not([src]), style, [style]').length")
        assert inline == 0, path
        tab.page.wait_for_function(VISIBLE_PICTURES_LOADED)
        broken = tab.page.eval_on_selector_all("img[data-src]", "els => els.filter(e => e.complete && "
                                                                "e.getBoundingClientRect().top < innerHeight && "
                                                                "e.naturalWidth === 0).length")
        assert broken == 0, path
        page = tab.page
        if stem == "status":
            assert page.inner_text("#store [data-f=assets]") == str(status["assets"]) == "15"
            assert page.inner_text("#runtime [data-f=ready]") == "ready"
            assert "ViT-B-32__openai · clip visual" in tab.texts("#models li")
        elif stem == "people":
            assert sorted(tab.texts("#people [data-f=faces]")) == ["4 faces", "4 faces", "5 faces"]
        elif stem == "person":
            assert len(tab.ids("#faces li", "faceId")) == 5 and page.inner_text("h1") == f"Person #{ada['personId']}"
        elif stem == "unassigned":
            assert page.inner_text("h1 [data-f=total]") == "(0)"
        elif stem == "duplicates":
            assert len(tab.ids("#groups > li", "groupId")) == 2
        elif stem == "search-text":
            assert tab.ids("#results li", "assetId") == [menu["id"]]
            assert page.locator("#results polygon.match").count() == 1
        elif stem == "search-face":
            same = library.call(f"/v1/persons/{ada['personId']}/faces")["items"]
            assert sorted(tab.ids("#face-results li", "faceId")) == sorted(f["id"] for f in same if f["id"] != ada["id"])
        elif stem == "asset":
            assert page.locator("#scene polygon.ocr").count() == len(menu["ocr"]) == 3
            assert page.inner_text("h1") == "menu.png"
    assert tab.errors == []
    foreign = [r.url for r in tab.requests if not r.url.startswith(library.url + "/")]
    assert foreign == []


def test_the_policy_blocks_inline_script(tab) -> None:
    tab.open("/ui")
    tab.page.evaluate("""() => { const s = document.createElement('script');
                                 s.textContent = 'window.injected = true'; document.body.append(s); }""")
    assert tab.page.evaluate("window.injected === undefined")
    assert any("Content Security Policy" in error for error in tab.errors)


def test_test_pack_banner(tab, library) -> None:
    status = library.call("/v1/status")
    listed = status["testPack"]
    assert {"ViT-B-32__openai", "buffalo_l"} <= set(listed)  # the demo library is served by the test pack
    tab.open("/ui")
    banner = tab.page.locator("#test-pack-banner")
    assert banner.is_visible() and all(name in banner.inner_text() for name in listed)
    # and none for a status without test-pack models (the server's own answer, the field emptied)
    tab.page.route("**/v1/status", lambda route: route.fulfill(json={**status, "testPack": []}))
    tab.open("/ui")
    assert not banner.is_visible()
    assert tab.errors == []


# ----------------------------------------------------------------------------- people


def test_people_actions_change_the_store(tab, library) -> None:
    ada, bob = person_of(library, "beach-ada.png"), person_of(library, "park-bob.png")
    page = tab.page

    tab.open(f"/ui/people/{ada}")
    page.fill("#rename input[name=name]", "Ada")
    tab.act(lambda: page.click("#rename button"))
    assert library.call(f"/v1/persons/{ada}")["name"] == "Ada" and page.inner_text("h1") == "Ada"

    faces = tab.ids("#faces li", "faceId")
    for face in faces[:2]:
        page.check(f'#faces li[data-face-id="{face}"] input[type=checkbox]')
    page.fill("#split input[name=name]", "Ada's twin")
    tab.act(lambda: page.click("#split button"))
    twin = library.call("/v1/persons?name=twin")["items"]
    assert len(twin) == 1 and twin[0]["faceCount"] == 2
    twin_faces = library.call(f"/v1/persons/{twin[0]['id']}/faces")["items"]
    assert sorted(f["id"] for f in twin_faces) == sorted(faces[:2])
    assert library.call(f"/v1/persons/{ada}")["faceCount"] == 3 and len(tab.ids("#faces li", "faceId")) == 3

    tab.open("/ui/people")
    for person in (ada, twin[0]["id"]):
        page.check(f'#people li[data-person-id="{person}"] input[type=checkbox]')
    page.click("#merge")
    assert "into Ada" in page.inner_text("#confirm-dialog")
    tab.act(lambda: page.click("#confirm-dialog button[value=ok]"))
    merged = library.call(f"/v1/persons/{ada}")
    assert merged["faceCount"] == 5 and merged["name"] == "Ada"
    with pytest.raises(urllib.error.HTTPError) as gone:
        library.call(f"/v1/persons/{twin[0]['id']}")
    assert gone.value.code == 404
    assert sorted(tab.texts("#people [data-f=faces]")) == ["4 faces", "4 faces", "5 faces"]

    tab.open(f"/ui/people/{bob}")
    stray = tab.ids("#faces li", "faceId")[0]
    page.check(f'#faces li[data-face-id="{stray}"] input[type=checkbox]')
    tab.act(lambda: page.click("#unassign"))
    unassigned = library.call("/v1/faces/unassigned")["items"]
    assert [(f["id"], f["assigned"]) for f in unassigned] == [(stray, "manual")]

    tab.open("/ui/faces/unassigned")
    assert tab.ids("#faces li", "faceId") == [stray]
    page.check(f'#faces li[data-face-id="{stray}"] input[type=checkbox]')
    page.fill("#assign input[name=person]", f"#{bob}")
    tab.act(lambda: page.click("#assign button"))
    assert library.call("/v1/faces/unassigned")["total"] == 0
    assert stray in [f["id"] for f in library.call(f"/v1/persons/{bob}/faces")["items"]]

    tab.open("/ui/people")
    page.click("#recluster")
    tab.act(lambda: page.click("#confirm-dialog button[value=ok]"))
    assert "considered" in page.inner_text("#notice")
    persons = library.call("/v1/persons")
    assert persons["total"] == 3 and library.call(f"/v1/persons/{ada}")["name"] == "Ada"  # names survive
    assert tab.errors == []


# ----------------------------------------------------------------------------- duplicates


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(selector, f"""e => {{ e.value = '{value}';
        e.dispatchEvent(new Event('input', {{bubbles: true}})); e.dispatchEvent(new Event('change', {{bubbles: true}})); }}""")


def test_duplicates_resolve_undo_kinds_and_threshold(tab, library) -> None:
    png, jpg = library.asset("lake-cyd.png")["id"], library.asset("lake-cyd-small.jpg")["id"]
    page = tab.page
    tab.open("/ui/duplicates")
    groups = tab.ids("#groups > li", "groupId")
    assert len(groups) == 2
    tab.act(lambda: page.click(".tabs button[data-kind=exact]"))
    assert "Exact copy" in page.inner_text("#groups") and len(tab.ids("#groups > li", "groupId")) == 1
    tab.act(lambda: page.click(".tabs button[data-kind=near]"))
    (near,) = tab.ids("#groups > li", "groupId")
    card = f'#groups > li[data-group-id="{near}"]'
    assert page.locator(f'{card} li[data-asset-id="{png}"] [data-f=keeper]').is_visible()  # larger file
    assert not page.locator(f'{card} li[data-asset-id="{jpg}"] [data-f=keeper]').is_visible()

    tab.act(lambda: page.click(f"{card} [data-f=resolve]"))
    group = library.call(f"/v1/duplicates/groups?assetId={jpg}&includeResolved=true")["items"][0]
    assert group["resolved"] and group["keeper"] == png
    assert library.asset("lake-cyd-small.jpg")["hidden"] is True
    assert tab.ids("#groups > li", "groupId") == []  # resolved groups are not shown...
    tab.act(lambda: page.check("#resolved"))  # ...unless asked
    assert page.locator(f'{card} li[data-asset-id="{jpg}"] [data-f=hidden]').is_visible()
    tab.act(lambda: page.click(f"{card} [data-f=undo]"))
    assert not library.call(f"/v1/duplicates/groups?assetId={jpg}&includeResolved=true")["items"][0]["resolved"]
    assert library.asset("lake-cyd-small.jpg")["hidden"] is False

    tab.act(lambda: page.click(f'{card} li[data-asset-id="{jpg}"] [data-f=keep]'))  # keep the other one
    group = library.call(f"/v1/duplicates/groups?assetId={jpg}&includeResolved=true")["items"][0]
    assert group["keeper"] == jpg and library.asset("lake-cyd.png")["hidden"] is True
    tab.act(lambda: page.click(f"{card} [data-f=undo]"))
    assert library.asset("lake-cyd.png")["hidden"] is False

    tab.act(lambda: page.click(".tabs button[data-kind='']"))
    tab.act(lambda: set_range(page, "#threshold", 0.95))  # the brightened copy joins at 0.967
    assert "3 open groups" in page.inner_text("#found")
    assert library.call("/v1/duplicates/groups")["total"] == 3 and len(tab.ids("#groups > li", "groupId")) == 3
    tab.act(lambda: set_range(page, "#threshold", 0.98))
    assert "2 open groups" in page.inner_text("#found") and library.call("/v1/duplicates/groups")["total"] == 2
    assert tab.errors == []


# ----------------------------------------------------------------------------- search and assets


def test_ocr_polygons_and_face_boxes_are_where_the_store_says(tab, library) -> None:
    page = tab.page
    menu = library.asset("menu.png")
    tab.open("/ui/search")
    page.fill("#search input[name=q]", "coffee")
    page.check("#search input[value=ocr]")
    tab.act(lambda: page.click("#search button"))
    assert tab.ids("#results li", "assetId") == [menu["id"]]
    (line,) = [line for line in menu["ocr"] if "Coffee" in line["text"]]
    tab.page.wait_for_function(VISIBLE_PICTURES_LOADED)
    picture = rect(page, "#results image")
    polygon = rect(page, f'#results polygon.match[data-line-id="{line["id"]}"]')
    assert_close(polygon, expected_box(picture, line["polygon"][0::2], line["polygon"][1::2]))
    assert page.inner_text("#results mark") == "Coffee"

    tab.open(f"/ui/assets/{menu['id']}")  # every line of an asset
    picture = rect(page, "#scene image")
    assert abs(picture["width"] / picture["height"] - menu["width"] / menu["height"]) < 0.01
    for line in menu["ocr"]:
        drawn = rect(page, f'#scene polygon[data-line-id="{line["id"]}"]')
        assert_close(drawn, expected_box(picture, line["polygon"][0::2], line["polygon"][1::2]))
    assert tab.texts("#lines li") == [line["text"] for line in menu["ocr"]]

    party = library.asset("party-ada-bob.png")
    tab.open(f"/ui/assets/{party['id']}")
    picture = rect(page, "#scene image")
    assert len(party["faces"]) == 2
    for face in party["faces"]:
        box = face["box"]
        drawn = rect(page, f'#scene rect[data-face-id="{face["id"]}"]')
        xs, ys = [box["x1"] / party["width"], box["x2"] / party["width"]], [box["y1"] / party["height"],
                                                                            box["y2"] / party["height"]]
        assert_close(drawn, expected_box(picture, xs, ys))
    page.uncheck("#show-faces")
    assert not page.locator("#scene rect.face-box").first.is_visible()
    assert tab.errors == []


def test_searches_clip_hybrid_and_faces(tab, library) -> None:
    page = tab.page
    menu = library.asset("menu.png")
    ada = person_of(library, "beach-ada.png")
    tab.open("/ui/search?q=a%20photo&mode=clip")
    assert len(tab.ids("#results li", "assetId")) == 15  # every asset, best first (k covers them all)

    tab.open("/ui/search")
    assert not page.locator("#weight-field").is_visible()
    page.check("#search input[value=hybrid]")
    assert page.locator("#weight-field").is_visible()
    set_range(page, "#search input[name=ocrWeight]", 0.8)
    assert page.inner_text("#search [data-f=weight]") == "0.80"
    page.fill("#search input[name=q]", "menu")
    tab.act(lambda: page.click("#search button"))
    assert tab.ids("#results li", "assetId")[0] == menu["id"]
    assert "text match" in tab.texts("#results [data-f=score]")[0]
    assert "w=0.8" in page.url and "mode=hybrid" in page.url

    page.set_input_files("#face-search input[type=file]", str(library.folder / "garden-ada.png"))
    tab.act(lambda: page.click("#face-search button"))
    assert "1 face found" in page.inner_text("#summary")
    assert f"/ui/people/{ada}" in page.eval_on_selector_all("#face-results p a", "as => as.map(a => a.pathname)")

    face = library.asset("kitchen-ada.png")["faces"][0]
    tab.open(f"/ui/search?face={face['id']}")
    hits = library.call("/v1/search/face/by-id", {"faceId": face["id"], "k": 48})["results"]
    assert tab.ids("#face-results li", "faceId") == [hit["faceId"] for hit in hits]
    assert all(h["personId"] == ada for h in hits[:4])  # the other faces of the same person come first
    assert tab.errors == []


def test_pictures_load_lazily(browser, library) -> None:
    narrow = Tab(browser, library.url)
    narrow.page.set_viewport_size({"width": 420, "height": 500})
    try:
        narrow.open("/ui/search?q=a%20photo&mode=clip")
        cards = narrow.ids("#results li", "assetId")
        assert len(cards) == 15

        def thumbnails() -> set[str]:
            return {r.url for r in narrow.requests if r.url.endswith("/thumbnail")}

        narrow.page.wait_for_function(VISIBLE_PICTURES_LOADED)
        first = thumbnails()
        assert 0 < len(first) <= 6, len(first)  # one column: only what is near the viewport
        for _ in range(40):
            narrow.page.mouse.wheel(0, 400)
            narrow.page.wait_for_timeout(50)
        narrow.page.wait_for_function("n => document.querySelectorAll('image[data-loaded]').length === n",
                                      arg=len(cards))
        assert len(thumbnails()) == 15
        narrow.open("/ui/people")
        assert set(narrow.page.eval_on_selector_all("img.face", "els => els.map(e => e.loading)")) == {"lazy"}
        assert narrow.errors == []
    finally:
        narrow.close()


# ----------------------------------------------------------------------------- the API key


def test_the_key_is_asked_once_and_sent_as_bearer_only(browser, model_cache: Path, tmp_path: Path) -> None:
    key = "key-" + secrets.token_hex(12)
    env = {"IMMICH_TRT_API_KEY": key, "IMMICH_TRT_RUNTIME": "onnxruntime"}  # a second server: in-process models
    keyed = serve_demo_library(model_cache, tmp_path, env)
    server = keyed.server
    try:
        tab = Tab(browser, server.url)
        page = tab.page
        page.goto(server.url + "/ui/people")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.fill("#key-dialog input[name=key]", "wrong-key")
        page.click("#key-dialog button[value=ok]")
        page.wait_for_function("() => document.querySelector('#key-dialog [data-f=message]').textContent"
                               ".includes('refused')")
        assert dialog.is_visible()
        page.fill("#key-dialog input[name=key]", key)
        page.click("#key-dialog button[value=ok]")
        page.wait_for_selector("body[data-ready]")
        assert not dialog.is_visible()
        assert sorted(tab.texts("#people [data-f=faces]")) == ["4 faces", "4 faces", "5 faces"]
        page.wait_for_function(VISIBLE_PICTURES_LOADED)
        sources = page.eval_on_selector_all("img.face", "els => els.map(e => [e.src, e.naturalWidth])")
        assert sources and all(src.startswith("blob:") and width > 0 for src, width in sources)
        assert page.evaluate("sessionStorage.getItem('immich-trt-api-key')") == key
        assert page.evaluate("localStorage.getItem('immich-trt-api-key')") is None

        page.reload()  # asked once: the tab keeps it
        page.wait_for_selector("body[data-ready]")
        assert not dialog.is_visible() and page.locator("#people li").count() == 3

        api_calls = [r for r in tab.requests if "/v1/" in r.url]
        assert api_calls and all(key not in r.url for r in tab.requests)
        refused = [r for r in api_calls if r.headers.get("authorization") == "Bearer wrong-key"]
        assert len(refused) == 1
        assert all(r.headers.get("authorization") == f"Bearer {key}" for r in api_calls if r not in refused)
        # the only console errors: the browser's note of the refused key's 401
        assert tab.errors and all("401" in error for error in tab.errors), tab.errors

        page.click("#forget-key")
        assert page.evaluate("sessionStorage.getItem('immich-trt-api-key')") is None
        tab.close()

        remembered = Tab(browser, server.url)
        remembered.page.goto(server.url + "/ui")
        remembered.page.fill("#key-dialog input[name=key]", key)
        remembered.page.check("#key-dialog input[name=remember]")
        remembered.page.click("#key-dialog button[value=ok]")
        remembered.page.wait_for_selector("body[data-ready]")
        assert remembered.page.evaluate("localStorage.getItem('immich-trt-api-key')") == key
        assert remembered.page.inner_text("#store [data-f=assets]") == "15" and remembered.errors == []
        remembered.close()
    finally:
        keyed.stop()
    assert key not in server.log_path.read_text(errors="replace")


# ----------------------------------------------------------------------------- screenshots


def test_screenshots_of_every_page(browser, library, tmp_path: Path) -> None:
    """The routine that makes docs/screenshots (``python -m immich_trt.tools.screenshots
    docs/screenshots`` runs it against a fresh server) captures every page."""
    prepare(library)
    written = take_screenshots(browser, library, tmp_path)
    assert [p.stem for p in written] == [stem for stem, _ in pages(library)]
    for path in written:
        image = Image.open(path)
        assert image.size == (1200, 760) and path.stat().st_size < 250_000, path
        assert len(image.getcolors(256) or []) > 8, path  # not a blank page
    names = {p["name"] for p in library.call("/v1/persons")["items"]}
    assert names == {"Ada", "Bob", "Cyd"} and library.call("/v1/faces/unassigned")["total"] == 1


# ----------------------------------------------------------------------------- a large store


def test_pages_stay_paged_on_a_large_store(browser, model_cache: Path, tmp_path: Path) -> None:
    """bench/ui_scale.py (50 000 assets, 200 000 faces: bench/2026-12-06-ui-scale/) at a
    CI size still larger than every page: no list reaching the browser is longer than
    its page, no console error, every page filled."""
    scale = load_bench_script("ui_scale")
    facts, _, rows, calls = scale.measure(browser, model_cache, tmp_path, assets=2_000, faces=8_000, persons=400,
                                          repeat=1)
    assert facts["persons"] > 60 and len(rows) == len(scale.page_paths(facts))
    for row in rows:
        assert row["errors"] == [] and row["oversized"] == [], row
        assert row["calls"], row["label"]  # the page did fetch its data
    by_label = {row["label"]: row for row in rows}
    assert by_label["people, first page"]["largest"][0] == 60
    assert by_label["unassigned faces"]["largest"][0] == 100
    assert by_label["largest person"]["largest"][0] == 100
    assert by_label["duplicates"]["largest"][0] == 20
    assert by_label["search OCR 'invoice'"]["largest"][0] == 48
    assert all(seconds < 5 for seconds in calls.values()), calls
