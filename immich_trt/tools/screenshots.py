"""Screenshots of every page of the web page, for ``docs/screenshots`` and the README.

``python -m immich_trt.tools.screenshots DIR`` builds the test pack and PP-OCRv5 into a
temporary model cache, serves the demo library (:mod:`.demo`) with ``immich-trt
serve`` on loopback, names its people, and saves one PNG per page into DIR with
Playwright driving Debian's ``chromium`` (``apt-get install chromium``; the path can be
changed with ``IMMICH_TRT_CHROMIUM``). Needs the ``test`` extra (Playwright).
:func:`take_screenshots` is what the browser tests call against their own server.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

from .demo import DemoLibrary, serve_demo_library

CHROMIUM = Path(os.environ.get("IMMICH_TRT_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT = {"width": 1200, "height": 760}
NAMES = {"beach-ada.png": "Ada", "park-bob.png": "Bob", "lake-cyd.png": "Cyd"}
COLOURS = 128  # palette size of the saved PNGs (small files, text stays sharp)
#: A page function (``wait_for_function``; a function, not an expression, because the
#: pages' policy forbids the ``eval`` Playwright polls expressions with): every picture
#: in the viewport has loaded (or failed).
VISIBLE_PICTURES_LOADED = """() => [...document.querySelectorAll('[data-src]')]
    .filter(e => e.getBoundingClientRect().top < innerHeight)
    .every(e => e.dataset.loaded === 'true' || e.classList.contains('missing'))"""


def launch_args() -> list[str]:
    """Chromium arguments: no sandbox when running as root (CI containers), where
    Chromium refuses to start with it."""
    return ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def pages(library: DemoLibrary) -> list[tuple[str, str]]:
    """``(file stem, path)`` of the pages to capture, with ids read from the server:
    status, people, a person, unassigned faces, duplicates, the three searches, a face
    search and two assets."""
    ada = library.asset("beach-ada.png")["faces"][0]
    return [
        ("status", "/ui"),
        ("people", "/ui/people"),
        ("person", f"/ui/people/{ada['personId']}"),
        ("unassigned", "/ui/faces/unassigned"),
        ("duplicates", "/ui/duplicates"),
        ("search-text", "/ui/search?q=coffee&mode=ocr"),
        ("search-hybrid", "/ui/search?q=menu&mode=hybrid&w=0.7"),
        ("search-face", f"/ui/search?face={ada['id']}"),
        ("asset", f"/ui/assets/{library.asset('menu.png')['id']}"),
        ("asset-faces", f"/ui/assets/{library.asset('party-ada-bob.png')['id']}"),
    ]


def prepare(library: DemoLibrary) -> None:
    """Name the demo people (Ada, Bob, Cyd) and unassign one face by hand, so that the
    pages show names and the unassigned view is not empty."""
    for name, person in NAMES.items():
        face = library.asset(name)["faces"][0]
        library.call(f"/v1/persons/{face['personId']}/name", {"name": person})
    stray = library.asset("bridge-bob.png")["faces"][0]
    library.call(f"/v1/faces/{stray['id']}/assign", {"personId": None})


def save_small_png(png: bytes, path: Path) -> int:
    """Write ``png`` with a :data:`COLOURS`-colour palette; returns the bytes written."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(COLOURS, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path.stat().st_size


def take_screenshots(browser, library: DemoLibrary, folder: Path) -> list[Path]:
    """One PNG per page of :func:`pages` into ``folder`` (created), each taken once the
    page has filled itself and its pictures have loaded; returns the files written.
    ``browser`` is a Playwright ``Browser``. Raises ``RuntimeError`` when a page logs a
    console error."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, color_scheme="light")
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    written = []
    try:
        for stem, path in pages(library):
            page.goto(library.url + path)
            page.wait_for_selector("body[data-ready]")
            page.wait_for_function(VISIBLE_PICTURES_LOADED)
            page.wait_for_timeout(200)  # decoded pictures painted
            if errors:
                raise RuntimeError(f"{path}: console errors {errors}")
            target = folder / f"{stem}.png"
            save_small_png(page.screenshot(), target)
            written.append(target)
    finally:
        context.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="folder for the PNGs (e.g. docs/screenshots)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"no chromium at {CHROMIUM}: apt-get install chromium (or set IMMICH_TRT_CHROMIUM)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    from .testing import prepare_ocr_cache
    from .testpack import make_test_pack

    with tempfile.TemporaryDirectory() as scratch:
        cache = prepare_ocr_cache(Path(scratch) / "cache")
        make_test_pack(cache)
        library = serve_demo_library(cache, Path(scratch) / "work", by_path=False)  # no machine paths shown
        try:
            prepare(library)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=launch_args())
                try:
                    for path in take_screenshots(browser, library, args.dir):
                        print(path)
                finally:
                    browser.close()
        finally:
            library.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
