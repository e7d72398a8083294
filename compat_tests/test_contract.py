"""Immich ML HTTP contract tests, runnable against a server you run on loopback.

``pytest compat_tests --base-url http://127.0.0.1:3003`` checks a running server (ours or
stock immich-ml) whose model cache holds PP-OCRv5_mobile and the test pack
(``immich-trt models make-test-pack CACHE``: ViT-B-32__openai CLIP and buffalo_l faces);
without ``--base-url`` a local immich-trt is started with both. Requests are built by
``immich_trt.contract``, as Immich's server builds them (``entries`` first, the image as a
``blob`` part of type application/octet-stream), the same builders ``immich-trt bench`` uses.
"""

from __future__ import annotations

import io
import json

import aiohttp
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.contract import (
    OCR_MODEL,
    clip_textual_entries,
    clip_visual_entries,
    face_detection_entries,
    face_entries,
    ocr_detection_entries,
    ocr_entries,
    predict,
)

OCR = OCR_MODEL
OCR_ENTRIES = ocr_entries()
DETECTION_ONLY = ocr_detection_entries()
FACES = face_entries()


async def post(base_url: str, entries: str | dict | None, image: bytes | None = None, text: str | None = None):
    """POST /predict like Immich's server; returns (status, content type, body bytes)."""
    return await predict(None, base_url, entries, image=image, text=text)


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



# --------------------------------------------------------------------------- CLIP

def embedding(value: str) -> list[float]:
    assert isinstance(value, str) and value.startswith("[") and " " not in value
    floats = json.loads(value)
    assert len(floats) == 512 and all(isinstance(v, float) for v in floats)
    return floats


async def test_clip_visual(base_url: str) -> None:
    status, _, body = await post(base_url, clip_visual_entries(), image=jpeg(300, 200, (90, 140, 200)))
    assert status == 200
    response = json.loads(body)
    assert list(response) == ["clip", "imageHeight", "imageWidth"]
    assert (response["imageWidth"], response["imageHeight"]) == (300, 200)
    values = embedding(response["clip"])
    assert abs(sum(v * v for v in values) - 1.0) < 1e-4  # normalised in the graph


async def test_clip_textual(base_url: str) -> None:
    status, _, body = await post(base_url, clip_textual_entries(), text="a dog on the beach")
    assert status == 200
    response = json.loads(body)
    assert list(response) == ["clip"]
    embedding(response["clip"])


async def test_clip_textual_with_language_option(base_url: str) -> None:
    entries = clip_textual_entries(language="de")
    status, _, body = await post(base_url, entries, text="Hund am Strand")
    assert status == 200
    embedding(json.loads(body)["clip"])


async def test_clip_same_text_same_embedding(base_url: str) -> None:
    entries = clip_textual_entries()
    first = await post(base_url, entries, text="red car")
    second = await post(base_url, entries, text="  red   car ")  # whitespace is collapsed
    assert first[0] == second[0] == 200 and first[2] == second[2]


# -------------------------------------------------------------------------- faces

def square_png(width: int, height: int, x0: int, y0: int, side: int) -> bytes:
    image = Image.new("RGB", (width, height))
    image.paste((255, 255, 255), (x0, y0, x0 + side, y0 + side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_faces_response_shape(base_url: str) -> None:
    """The test pack's detector reports a white 32 px square as one face."""
    status, _, body = await post(base_url, FACES, image=square_png(640, 640, 320, 192, 32))
    assert status == 200
    response = json.loads(body)
    assert list(response) == ["facial-recognition", "imageHeight", "imageWidth"]
    (face,) = response["facial-recognition"]
    assert list(face) == ["boundingBox", "embedding", "score"]
    assert face["boundingBox"] == {"x1": 288.0, "y1": 160.0, "x2": 384.0, "y2": 256.0}
    embedding(face["embedding"])
    assert 0.7 <= face["score"] <= 1.0


async def test_no_faces_is_an_empty_list(base_url: str) -> None:
    status, _, body = await post(base_url, FACES, image=jpeg(64, 64))
    assert status == 200
    assert body == b'{"facial-recognition":[],"imageHeight":64,"imageWidth":64}'


async def test_face_detection_only(base_url: str) -> None:
    entries = face_detection_entries()
    status, _, body = await post(base_url, entries, image=square_png(640, 640, 320, 192, 32))
    assert status == 200
    det = json.loads(body)["facial-recognition"]
    assert list(det) == ["boxes", "scores", "landmarks"]
    assert det["boxes"] == [[288.0, 160.0, 384.0, 256.0]]
    assert len(det["scores"]) == 1 and len(det["landmarks"]) == 1 and len(det["landmarks"][0]) == 5
