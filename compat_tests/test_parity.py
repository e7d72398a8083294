"""Opt-in parity check against a stock immich-ml: set ``IMMICH_ML_REFERENCE_URL``.

The same requests go to the server under test (``--base-url`` or a local immich-trt)
and to the reference; both must serve the same model cache (the test pack of
``immich-trt models make-test-pack`` plus PP-OCRv5 mobile). Tolerances: CLIP cosine
>= 0.9999; face boxes equal; face scores and embeddings within 1e-4 relative; OCR
texts equal.

Faces with exactly tied detector scores (the small test detector saturates on white
areas) are ordered by numpy's unstable ``argsort`` in insightface, which differs between
numpy builds, so NMS may keep different boxes; such images are reported as skipped.
"""

from __future__ import annotations

import io
import json
import os

import aiohttp
import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from immich_trt.contract import clip_textual_entries, clip_visual_entries, face_entries, ocr_entries, predict
from immich_trt.tools import bench

REFERENCE = os.environ.get("IMMICH_ML_REFERENCE_URL", "").rstrip("/")
if not REFERENCE:
    pytest.skip("IMMICH_ML_REFERENCE_URL is not set (opt-in parity check)", allow_module_level=True)

FACES = face_entries()
OCR = ocr_entries()
TEXTS = [("a photo of a cat", None), ("Hund am Strand", "de"), ("  sunset over   the sea!  ", "en-null")]


def _images() -> list[tuple[str, bytes]]:
    images = []
    if SHARED_DATA.is_dir():
        for folder in ("photos", "ocr"):
            for path in sorted((SHARED_DATA / folder).iterdir()):
                if path.suffix.lower() in {".jpg", ".png", ".webp", ".avif"}:
                    images.append((f"{folder}/{path.name}", path.read_bytes()))
    for name, (width, height, squares) in {
        "squares-640": (640, 640, [(320, 192, 32, 255), (64, 448, 32, 245)]),
        "squares-1280x960": (1280, 960, [(640, 384, 64, 255), (128, 832, 64, 245), (1152, 64, 64, 240)]),
        "squares-odd": (1000, 700, [(333, 222, 50, 250), (700, 400, 90, 255)]),
    }.items():
        array = np.zeros((height, width, 3), np.uint8)
        for x0, y0, side, value in squares:
            array[y0 : y0 + side, x0 : x0 + side] = value
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        images.append((name, buffer.getvalue()))
    return images


IMAGES = _images()


async def both(base_url: str, entries: dict, image: bytes | None = None, text: str | None = None):
    async with aiohttp.ClientSession() as session:
        status, _, body = await predict(session, base_url, entries, image, text)
        ref_status, _, ref_body = await predict(session, REFERENCE, entries, image, text)
    assert status == ref_status
    return (json.loads(body), json.loads(ref_body)) if status == 200 else (None, None)


def cosine(a: str, b: str) -> float:
    """Cosine of two embedding strings (the bench's agreement measure)."""
    return bench.cosine(json.loads(a), json.loads(b))


@pytest.mark.parametrize(("name", "image"), IMAGES, ids=[n for n, _ in IMAGES])
async def test_clip_visual_parity(base_url: str, name: str, image: bytes) -> None:
    ours, ref = await both(base_url, clip_visual_entries(), image)
    if ours is None:
        return  # both failed alike (e.g. an undecodable format)
    assert cosine(ours["clip"], ref["clip"]) >= 0.9999
    assert (ours["imageWidth"], ours["imageHeight"]) == (ref["imageWidth"], ref["imageHeight"])


@pytest.mark.parametrize(("text", "language"), TEXTS)
async def test_clip_textual_parity(base_url: str, text: str, language: str | None) -> None:
    ours, ref = await both(base_url, clip_textual_entries(language=language), text=text)
    assert cosine(ours["clip"], ref["clip"]) >= 0.9999


@pytest.mark.parametrize(("name", "image"), IMAGES, ids=[n for n, _ in IMAGES])
async def test_face_parity(base_url: str, name: str, image: bytes) -> None:
    ours, ref = await both(base_url, FACES, image)
    if ours is None:
        return
    scores = [f["score"] for f in ref["facial-recognition"]] + [f["score"] for f in ours["facial-recognition"]]
    if len(set(scores)) < len(scores) / 2 and ours["facial-recognition"] != ref["facial-recognition"]:
        pytest.skip("tied detector scores: insightface's order depends on numpy's argsort build")
    assert len(ours["facial-recognition"]) == len(ref["facial-recognition"])
    for a, b in zip(ours["facial-recognition"], ref["facial-recognition"]):
        assert a["boundingBox"] == b["boundingBox"]
        assert a["score"] == pytest.approx(b["score"], rel=1e-4)
        x, y = np.array(json.loads(a["embedding"])), np.array(json.loads(b["embedding"]))
        assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(y)


@pytest.mark.parametrize(("name", "image"), IMAGES, ids=[n for n, _ in IMAGES])
async def test_ocr_parity(base_url: str, name: str, image: bytes) -> None:
    ours, ref = await both(base_url, OCR, image)
    if ours is None:
        return
    assert ours["ocr"]["text"] == ref["ocr"]["text"]
