"""Immich ML HTTP contract tests, runnable against any server.

``pytest compat_tests --base-url http://host:3003`` checks a running server (ours or
stock immich-ml with PP-OCRv5_mobile in its cache); without ``--base-url`` a local
immich-trt is started. Requests are built the way Immich's server builds them
(``entries`` first, the image as a ``blob`` part of type application/octet-stream).
"""

from __future__ import annotations

import io
import json
import aiohttp
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data

OCR = "PP-OCRv5_mobile"
OCR_ENTRIES = {
    "ocr": {
        "detection": {"modelName": OCR, "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": OCR, "options": {"minScore": 0.8}},
    }
}
DETECTION_ONLY = {"ocr": {"detection": {"modelName": OCR, "options": {"minScore": 0.5, "maxResolution": 736}}}}


async def post(base_url: str, entries: str | dict | None, image: bytes | None = None, text: str | None = None):
    """POST /predict like Immich's server; returns (status, content type, body bytes)."""
    form = aiohttp.FormData()
    if entries is not None:
        form.add_field("entries", entries if isinstance(entries, str) else json.dumps(entries))
    if image is not None:
        form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        form.add_field("text", text)
    if entries is None and image is None and text is None:
        form.add_field("unrelated", "x")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/predict", data=form) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()


def jpeg(width: int = 64, height: int = 48, color=(0, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


# ------------------------------------------------------------------------- routes


async def test_root(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert await response.json() == {"message": "Immich ML"}


async def test_ping(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/ping") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await response.text() == "pong"


async def test_unknown_path_is_404_json(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/nonexistent") as response:
        assert response.status == 404
        assert await response.json() == {"detail": "Not Found"}


# ------------------------------------------------------------------------- errors


async def test_missing_entries_is_fastapi_422(base_url: str) -> None:
    status, ctype, body = await post(base_url, None, image=jpeg())
    assert status == 422
    assert ctype.startswith("application/json")
    assert json.loads(body) == {
        "detail": [{"type": "missing", "loc": ["body", "entries"], "msg": "Field required", "input": None}]
    }


@pytest.mark.parametrize(
    "entries",
    ["not json", '{"clip":{"visual":{}}}', "[1,2]", '{"ocr":"detection"}', '{"ocr":{"detection":{"modelName":null}}}'],
)
async def test_malformed_entries_is_422(base_url: str, entries: str) -> None:
    status, _, body = await post(base_url, entries, image=jpeg())
    assert status == 422
    assert body == b'{"detail":"Invalid request format."}'


async def test_unknown_model_is_500(base_url: str) -> None:
    status, ctype, body = await post(base_url, {"clip": {"visual": {"modelName": "nope"}}}, image=jpeg())
    assert status == 500
    assert ctype.startswith("text/plain")
    assert body == b"Internal Server Error"


async def test_unknown_task_type_combination_is_500(base_url: str) -> None:
    status, _, _ = await post(base_url, {"ocr": {"visual": {"modelName": OCR}}}, image=jpeg())
    assert status == 500


async def test_neither_image_nor_text_is_400(base_url: str) -> None:
    status, _, body = await post(base_url, OCR_ENTRIES)
    assert status == 400
    assert body == b'{"detail":"Either image or text must be provided"}'


async def test_undecodable_image_is_500(base_url: str) -> None:
    status, _, body = await post(base_url, OCR_ENTRIES, image=b"this is not an image")
    assert status == 500
    assert body == b"Internal Server Error"


async def test_empty_image_is_500(base_url: str) -> None:
    status, _, _ = await post(base_url, OCR_ENTRIES, image=b"")
    assert status == 500


async def test_recognition_without_detection_is_400(base_url: str) -> None:
    status, _, body = await post(base_url, {"ocr": {"recognition": {"modelName": OCR}}}, image=jpeg())
    assert status == 400
    assert json.loads(body) == {
        "detail": "Task ocr of type recognition depends on output of "
        "(<ModelType.DETECTION: 'detection'>, <ModelTask.OCR: 'ocr'>)"
    }


async def test_text_to_an_image_model_is_500(base_url: str) -> None:
    status, _, _ = await post(base_url, OCR_ENTRIES, text="hello")
    assert status == 500


# ---------------------------------------------------------------------------- OCR


async def test_small_image_gives_empty_ocr(base_url: str) -> None:
    status, ctype, body = await post(base_url, OCR_ENTRIES, image=jpeg(31, 100))
    assert status == 200 and ctype.startswith("application/json")
    assert body == b'{"ocr":{"box":[],"boxScore":[],"text":[],"textScore":[]},"imageHeight":100,"imageWidth":31}'


async def test_blank_image_detection_only_is_empty(base_url: str) -> None:
    status, _, body = await post(base_url, DETECTION_ONLY, image=jpeg(200, 100, (255, 255, 255)))
    assert status == 200
    assert body == b'{"ocr":{"boxes":[],"scores":[]},"imageHeight":100,"imageWidth":200}'


@requires_data
async def test_ocr_reads_the_known_lines(base_url: str) -> None:
    data = (SHARED_DATA / "ocr" / "ch_en_num.jpg").read_bytes()
    status, _, body = await post(base_url, OCR_ENTRIES, image=data)
    assert status == 200
    response = json.loads(body)
    ocr = response["ocr"]
    assert (response["imageWidth"], response["imageHeight"]) == Image.open(io.BytesIO(data)).size
    assert list(ocr) == ["box", "text", "boxScore", "textScore"]
    n = len(ocr["text"])
    assert n == 14
    assert len(ocr["box"]) == 8 * n and len(ocr["boxScore"]) == n and len(ocr["textScore"]) == n
    assert all(0.0 <= v <= 1.0 for v in ocr["box"])
    assert all(s > 0.8 for s in ocr["textScore"])
    for expected in ("正品促销", "极速发货", "强力去污符合国标", "-40℃深度防冻不结冰", "大桶装更划算"):
        assert expected in ocr["text"]


@requires_data
async def test_ocr_single_cropped_line(base_url: str) -> None:
    status, _, body = await post(base_url, OCR_ENTRIES, image=(SHARED_DATA / "ocr" / "text_rec.jpg").read_bytes())
    assert status == 200
    assert json.loads(body)["ocr"]["text"] == ["韩国小馆"]


@requires_data
async def test_ocr_empty_black_photo(base_url: str) -> None:
    status, _, body = await post(base_url, OCR_ENTRIES, image=(SHARED_DATA / "ocr" / "empty_black.jpg").read_bytes())
    assert status == 200
    assert json.loads(body)["ocr"] == {"box": [], "boxScore": [], "text": [], "textScore": []}


@requires_data
async def test_ocr_detection_only_returns_pixel_quads(base_url: str) -> None:
    data = (SHARED_DATA / "ocr" / "ch_en_num.jpg").read_bytes()
    status, _, body = await post(base_url, DETECTION_ONLY, image=data)
    assert status == 200
    det = json.loads(body)["ocr"]
    width, height = Image.open(io.BytesIO(data)).size
    assert list(det) == ["boxes", "scores"]
    assert len(det["boxes"]) == len(det["scores"]) == 17
    for quad in det["boxes"]:
        assert len(quad) == 4
        for x, y in quad:
            assert 0 <= x <= width - 1 and 0 <= y <= height - 1 and float(x).is_integer()
    assert all(s >= 0.5 for s in det["scores"])


@requires_data
async def test_exif_orientation_is_not_applied(base_url: str) -> None:
    data = (SHARED_DATA / "photos" / "portrait-orientation-6.jpg").read_bytes()
    status, _, body = await post(base_url, DETECTION_ONLY, image=data)
    assert status == 200
    response = json.loads(body)
    assert (response["imageWidth"], response["imageHeight"]) == Image.open(io.BytesIO(data)).size

