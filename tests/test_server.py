"""The aiohttp application in-process (ONNX Runtime), with the real PP-OCRv5 models."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.tools.testing import offline_settings
from immich_trt.web import STATE

OCR = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
    }
}


def jpeg(width: int, height: int, color=(255, 255, 255)) -> bytes:
    image = Image.new("RGB", (width, height), color)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def form(entries, image: bytes | None = None, text: str | None = None) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("entries", entries if isinstance(entries, str) else json.dumps(entries))
    if image is not None:
        data.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        data.add_field("text", text)
    return data


@pytest.fixture
def settings(ocr_cache: Path, tmp_path: Path):
    return offline_settings(ocr_cache, runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path / "engines")


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


async def test_metrics_count_requests_latency_errors_and_loads(client) -> None:
    await client.get("/ping")
    resp = await client.post("/predict", data=form(OCR, jpeg(200, 100)))
    assert resp.status == 200
    resp = await client.post("/predict", data=form("not json", jpeg(10, 10)))
    assert resp.status == 422
    body = await (await client.get("/metrics")).text()
    assert 'immich_trt_http_requests_total{route="/ping",status="200"} 1.0' in body
    assert 'immich_trt_http_requests_total{route="/predict",status="200"} 1.0' in body
    assert 'immich_trt_errors_total{reason="invalid_entries",status="422"} 1.0' in body
    assert 'immich_trt_inference_seconds_count{task="ocr",type="detection"} 1.0' in body
    assert 'immich_trt_inference_seconds_count{task="ocr",type="recognition"} 1.0' in body
    assert 'immich_trt_model_loads_total{outcome="ok",task="ocr",type="detection"} 1.0' in body
    assert "immich_trt_predict_seconds_bucket" in body


async def test_image_wins_over_text(client) -> None:
    resp = await client.post("/predict", data=form(OCR, jpeg(200, 100), text="ignored"))
    assert resp.status == 200
    assert await resp.json() == {
        "ocr": {"box": [], "boxScore": [], "text": [], "textScore": []},
        "imageHeight": 100,
        "imageWidth": 200,
    }


async def test_empty_text_counts_as_absent(client) -> None:
    resp = await client.post("/predict", data=form(OCR, text=""))
    assert resp.status == 400
    assert await resp.json() == {"detail": "Either image or text must be provided"}


async def test_urlencoded_body_without_entries_is_422(client) -> None:
    resp = await client.post("/predict", data={"text": "x"})
    assert resp.status == 422
    assert (await resp.json())["detail"][0]["loc"] == ["body", "entries"]


async def test_image_with_any_filename_and_type(client) -> None:
    data = aiohttp.FormData()
    data.add_field("entries", json.dumps(OCR))
    data.add_field("image", jpeg(64, 40), filename="preview.webp", content_type="image/webp")
    resp = await client.post("/predict", data=data)
    assert resp.status == 200
    assert (await resp.json())["imageWidth"] == 64


async def test_grayscale_and_rgba_are_converted_to_rgb(client) -> None:
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 40)).save(buffer, format="PNG")
        resp = await client.post("/predict", data=form(OCR, buffer.getvalue()))
        assert resp.status == 200, mode


async def test_body_over_the_limit_is_413_and_the_server_survives(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, max_request_mb=1)))
    resp = await client.post("/predict", data=form(OCR, b"\0" * (2 * 1024 * 1024)))
    assert resp.status == 413
    assert (await client.get("/ping")).status == 200


async def test_method_not_allowed_is_json(client) -> None:
    resp = await client.get("/predict")
    assert resp.status == 405
    assert await resp.json() == {"detail": "Method Not Allowed"}
    assert "POST" in resp.headers["Allow"]


async def test_head_ping_for_health_probes(client) -> None:
    assert (await client.head("/ping")).status == 200


async def test_clip_model_that_cannot_be_downloaded_is_500_failed_to_load(client, settings, caplog) -> None:
    """Offline: Immich's body, and one log line with the file expected, why the download
    failed and the ways to fix it."""
    resp = await client.post("/predict", data=form({"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, text="a dog"))
    assert resp.status == 500
    assert await resp.json() == {"detail": "Failed to load model 'ViT-B-32__openai'"}
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "ViT-B-32__openai" in r.getMessage()]
    expected = settings.cache_folder / "clip" / "ViT-B-32__openai" / "textual" / "model.onnx"
    assert f"expected {expected}" in line
    assert "downloading it from http://127.0.0.1:9/immich-app/ViT-B-32__openai failed: " in line
    assert "Connection refused" in line and "\n" not in line
    assert "models fetch ViT-B-32__openai --task clip --type textual" in line
    assert "MACHINE_LEARNING_CACHE_FOLDER" in line and f"models make-test-pack {settings.cache_folder}" in line
    assert not (settings.cache_folder / "clip").exists()  # the failed download left no folder


async def test_face_model_that_cannot_be_downloaded_is_500_failed_to_load(client, settings, caplog) -> None:
    resp = await client.post(
        "/predict",
        data=form({"facial-recognition": {"detection": {"modelName": "buffalo_l"},
                                          "recognition": {"modelName": "buffalo_l"}}}, jpeg(64, 64)),
    )
    assert resp.status == 500
    assert await resp.json() == {"detail": "Failed to load model 'buffalo_l'"}
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "buffalo_l" in r.getMessage()]
    assert str(settings.cache_folder / "facial-recognition" / "buffalo_l" / "detection" / "model.onnx") in line
    assert "models fetch buffalo_l --task facial-recognition --type detection" in line


async def test_face_recognition_without_detection_is_400(client) -> None:
    resp = await client.post("/predict", data=form({"facial-recognition": {"recognition": {"modelName": "buffalo_l"}}}, jpeg(8, 8)))
    assert resp.status == 400
    assert (await resp.json())["detail"].endswith(
        "depends on output of (<ModelType.DETECTION: 'detection'>, <ModelTask.FACIAL_RECOGNITION: 'facial-recognition'>)"
    )


async def test_options_reach_the_constructor_only_once(client) -> None:
    """As upstream: the first request's options build the model; later ones configure it."""
    entries = {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.9}}}}
    assert (await client.post("/predict", data=form(entries, jpeg(64, 64)))).status == 200
    cache = client.app[STATE].cache
    (detector,) = cache.models
    assert detector.postprocess.box_thresh == 0.9
    entries["ocr"]["detection"]["options"] = {"minScore": 0.6, "maxResolution": 320}
    assert (await client.post("/predict", data=form(entries, jpeg(64, 64)))).status == 200
    assert len(cache.models) == 1
    assert detector.postprocess.box_thresh == 0.6 and detector.max_resolution == 320


@requires_data
async def test_several_tasks_in_one_request_share_one_decode(client) -> None:
    data = (SHARED_DATA / "ocr" / "text_rec.jpg").read_bytes()
    entries = {**OCR, "clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    # CLIP cannot be obtained offline: the whole request fails as upstream would
    assert (await client.post("/predict", data=form(entries, data))).status == 500
    resp = await client.post("/predict", data=form(OCR, data))
    assert (await resp.json())["ocr"]["text"] == ["韩国小馆"]


async def test_idle_models_are_unloaded_after_the_ttl(aiohttp_client, settings) -> None:
    app = create_app(dataclasses.replace(settings, model_ttl=1, model_ttl_poll_s=1))
    client = await aiohttp_client(app)
    assert (await client.post("/predict", data=form(OCR, jpeg(64, 64)))).status == 200
    cache = app[STATE].cache
    runtime = app[STATE].ctx.runtime
    assert len(cache) == 2 and len(runtime._sessions) == 2
    for _ in range(40):
        await asyncio.sleep(0.1)
        if len(cache) == 0:
            break
    assert len(cache) == 0 and runtime._sessions == {}
    # and they come back on the next request
    assert (await client.post("/predict", data=form(OCR, jpeg(64, 64)))).status == 200
    assert len(cache) == 2


async def test_preloaded_models_load_at_startup_and_never_expire(aiohttp_client, settings) -> None:
    preload = {("ocr", "detection"): ["PP-OCRv5_mobile"], ("ocr", "recognition"): ["PP-OCRv5_mobile", "nope"]}
    app = create_app(dataclasses.replace(settings, preload=preload, model_ttl=1, model_ttl_poll_s=1))
    client = await aiohttp_client(app)
    cache = app[STATE].cache
    assert len(cache) == 2 and all(m.loaded for m in cache.models)
    await asyncio.sleep(2.5)
    assert len(cache) == 2
    assert (await client.get("/ping")).status == 200
