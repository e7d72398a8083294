"""First-run behaviour of ingestion: HEIC originals in the sidecar (while /predict keeps
Immich's answer), files refused once and then remembered, and ``immich-trt ingest``
failing fast with one line when nothing can succeed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import aiohttp
import pillow_heif
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.tools.testing import offline_settings


def heic(width: int, height: int, color=(200, 30, 30)) -> bytes:
    """A HEIC file made with pillow-heif's encoder."""
    out = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (width, height), color)).save(out, quality=90)
    return out.getvalue()


def png(width: int, height: int, color=(30, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def settings(model_cache: Path, tmp_path: Path):
    return offline_settings(
        model_cache, runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path / "engines", data_dir=tmp_path / "data"
    )


def form(data: bytes, **fields) -> aiohttp.FormData:
    out = aiohttp.FormData()
    out.add_field("image", data, filename="blob", content_type="application/octet-stream")
    for name, value in fields.items():
        out.add_field(name, value)
    return out


async def test_sidecar_ingests_heic_and_predict_keeps_immichs_500(aiohttp_client, settings) -> None:
    import dataclasses

    client = await aiohttp_client(create_app(settings))
    data = heic(96, 64)
    response = await client.post("/v1/ingest", data=form(data, assetId="IMG_0001.HEIC"))
    body = await response.json()
    assert response.status == 200, body
    assert body["ran"] == ["clip", "faces", "ocr"]
    asset = await (await client.get("/v1/assets/IMG_0001.HEIC")).json()
    assert (asset["width"], asset["height"]) == (96, 64)
    entries = json.dumps({"clip": {"visual": {"modelName": "ViT-B-32__openai"}}})
    predict = aiohttp.FormData()
    predict.add_field("entries", entries)
    predict.add_field("image", data, filename="blob", content_type="application/octet-stream")
    response = await client.post("/predict", data=predict)  # Immich never sends HEIC: its answer is kept
    assert response.status == 500
    # the pixel bound is read from the HEIF header before decoding
    bounded = dataclasses.replace(settings, max_image_pixels=96 * 64 - 1, data_dir=settings.data_dir.with_name("other"))
    small = await aiohttp_client(create_app(bounded))
    response = await small.post("/v1/ingest", data=form(data))
    assert response.status == 413 and "IMMICH_TRT_MAX_IMAGE_PIXELS" in (await response.json())["detail"]
    response = await client.post("/v1/ingest", data=form(data[:200]))  # a truncated HEIC: a clear 400
    assert response.status == 400 and "cannot be decoded" in (await response.json())["detail"]


@requires_data
async def test_the_real_iphone_heic_is_ingested(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(settings))
    data = (SHARED_DATA / "photos" / "IMG_2682.heic").read_bytes()
    response = await client.post("/v1/ingest", data=form(data, ocr="false"))
    assert response.status == 200, await response.text()
    asset = await (await client.get(f"/v1/assets/{(await response.json())['assetId']}")).json()
    assert (asset["width"], asset["height"]) == (4032, 3024)
