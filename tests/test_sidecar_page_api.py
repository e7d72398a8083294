"""The /v1 parts the web page relies on, in-process with the real models (test pack,
PP-OCRv5) and real SQLite: asset and face thumbnails (ingest, record mode, caching
headers, the schema migration and the backfill by re-ingesting), a person's faces by
page, persons by name, duplicate groups by kind and by asset, assets by their numeric
id, and the status's runtime, models and ingest counts."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sqlite3
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image
from test_sidecar_api import encode, faces_image, ingest_form, ok

from immich_trt.application import create_app
from immich_trt.sidecar import store as store_module
from immich_trt.sidecar.assets import AssetResults, save_results
from immich_trt.sidecar.duplicates import imohash_of
from immich_trt.sidecar.folder import ingest_folder
from immich_trt.sidecar.store import Store
from immich_trt.sidecar.thumbnails import ASSET_SIZE
from immich_trt.tools.testing import offline_settings


@pytest.fixture
def settings(model_cache: Path, tmp_path: Path):
    return offline_settings(
        model_cache, runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path / "engines", data_dir=tmp_path / "data"
    )


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


def gradient(width: int, height: int) -> np.ndarray:
    """An RGB image whose colour tells where a pixel was: red grows left to right,
    green top to bottom (so a thumbnail's orientation and crop can be checked)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    return np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                     np.full((height, width), 40.0)], axis=-1).astype(np.uint8)


async def test_asset_thumbnail_is_stored_at_ingest_and_served_with_caching(client) -> None:
    data = encode(gradient(900, 600), "JPEG", quality=92)
    ingested = await ok(await client.post("/v1/ingest", data=ingest_form(data, assetId="wide", faces=False, ocr=False)))
    response = await client.get(f"/v1/assets/{ingested['assetId']}/thumbnail")
    body = await response.read()
    assert response.status == 200 and response.content_type == "image/webp"
    assert response.headers["Cache-Control"] == "private, max-age=86400"
    assert response.headers["ETag"] == f'"{ingested["imohash"]}"'
    picture = Image.open(io.BytesIO(body))
    assert picture.format == "WEBP" and picture.size == (ASSET_SIZE, round(ASSET_SIZE * 600 / 900))
    pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
    assert pixels[0, 0, 0] < 30 and pixels[0, -1, 0] > 225  # left dark red, right full red: not mirrored
    assert pixels[0, 0, 1] < 30 and pixels[-1, 0, 1] > 225  # top to bottom green: not flipped

    again = await client.get(f"/v1/assets/{ingested['assetId']}/thumbnail",
                             headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""
    assert (await client.get("/v1/assets/987654/thumbnail")).status == 404

    small = await ok(await client.post("/v1/ingest", data=ingest_form(encode(gradient(40, 90)), faces=False, ocr=False)))
    tiny = Image.open(io.BytesIO(await (await client.get(f"/v1/assets/{small['assetId']}/thumbnail")).read()))
    assert tiny.size == (40, 90)  # never enlarged


async def test_face_thumbnail_and_person_faces_by_page(client) -> None:
    # the same test-pack face in three images (one of them twice): one person of four faces
    for squares in ([(96, 96)], [(320, 160)], [(160, 448), (448, 448)]):
        await ok(await client.post("/v1/ingest", data=ingest_form(faces_image(squares), ocr=False)))
    await ok(await client.post("/v1/faces/cluster", json={}))
    person = (await ok(await client.get("/v1/persons")))["items"][0]
    first = await ok(await client.get(f"/v1/persons/{person['id']}/faces?limit=3"))
    second = await ok(await client.get(f"/v1/persons/{person['id']}/faces?offset=3&limit=3"))
    assert first["total"] == second["total"] == 4 and len(first["items"]) == 3 and len(second["items"]) == 1
    every = first["items"] + second["items"]
    assert len({f["id"] for f in every}) == 4
    assert [f["score"] for f in every] == sorted((f["score"] for f in every), reverse=True)
    assert (await client.get("/v1/persons/424242/faces")).status == 404

    face = every[0]
    response = await client.get(f"/v1/faces/{face['id']}/thumbnail")
    assert response.status == 200 and response.content_type == "image/jpeg"
    assert response.headers["Cache-Control"] == "private, max-age=86400"
    crop = np.asarray(Image.open(io.BytesIO(await response.read())).convert("L"))
    assert crop.max() > 200 and crop.min() < 40  # the bright square and its dark margin
    assert (await client.get("/v1/faces/424242/thumbnail")).status == 404

    named = await ok(await client.post(f"/v1/persons/{person['id']}/name", json={"name": "Ada Lovelace"}))
    for query, expected in (("ada", [named["id"]]), ("LOVE", [named["id"]]), ("grace", []), ("%", [])):
        found = await ok(await client.get(f"/v1/persons?name={query.replace('%', '%25')}"))
        assert [p["id"] for p in found["items"]] == expected, query


async def test_asset_by_numeric_id_and_duplicate_groups_by_kind_and_asset(client) -> None:
    picture = gradient(320, 240)
    data = encode(picture, "PNG")
    reencoded = encode(picture, "JPEG", quality=95)
    other = encode(255 - picture, "PNG")
    ids = {}
    for ref, image in (("orig", data), ("copy", data), ("re", reencoded), ("other", other)):
        ids[ref] = (await ok(await client.post("/v1/ingest", data=ingest_form(image, assetId=ref, faces=False,
                                                                              ocr=False))))["assetId"]
    assert ids["orig"] == ids["copy"]
    by_id = await ok(await client.get(f"/v1/assets/{ids['re']}"))
    assert by_id["refs"] == ["re"] and by_id["width"] == 320
    await ok(await client.post("/v1/duplicates/find", json={}))
    exact = await ok(await client.get("/v1/duplicates/groups?kind=exact"))
    near = await ok(await client.get("/v1/duplicates/groups?kind=near"))
    assert [sorted(m["id"] for m in g["members"]) for g in exact["items"]] == [[ids["orig"]]]
    assert [sorted(m["id"] for m in g["members"]) for g in near["items"]] == [sorted({ids["orig"], ids["re"]})]
    mine = await ok(await client.get(f"/v1/duplicates/groups?assetId={ids['re']}"))
    assert [g["id"] for g in mine["items"]] == [g["id"] for g in near["items"]]
    assert (await ok(await client.get(f"/v1/duplicates/groups?assetId={ids['other']}")))["total"] == 0
    bad = await client.get("/v1/duplicates/groups?kind=similar")
    assert bad.status == 400 and "kind" in (await bad.json())["detail"]


async def test_status_reports_runtime_models_and_ingest_counts(client) -> None:
    empty = await ok(await client.get("/v1/status"))
    assert empty["runtime"] == {"name": "onnxruntime", "reason": "IMMICH_TRT_RUNTIME=onnxruntime", "tritonUrl": None,
                                "ready": True}
    assert empty["models"] == [] and empty["schemaVersion"] == len(store_module.MIGRATIONS)
    assert empty["ingested"] == {"clip": 0, "faces": 0, "ocr": 0, "hidden": 0, "thumbnail": 0}
    await ok(await client.post("/v1/ingest", data=ingest_form(faces_image([(96, 96)]), ocr=False)))
    status = await ok(await client.get("/v1/status"))
    assert status["ingested"] == {"clip": 1, "faces": 1, "ocr": 0, "hidden": 0, "thumbnail": 1}
    assert {(m["task"], m["type"], m["name"]) for m in status["models"]} == {
        ("clip", "visual", "ViT-B-32__openai"),
        ("facial-recognition", "detection", "buffalo_l"),
        ("facial-recognition", "recognition", "buffalo_l"),
    }


async def test_record_mode_stores_the_thumbnail(aiohttp_client, settings) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, record=True)))
    image = encode(gradient(500, 500), "PNG")
    form = aiohttp.FormData()
    form.add_field("entries", json.dumps({"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}))
    form.add_field("image", image, filename="blob")
    await ok(await client.post("/predict", data=form))
    for _ in range(100):  # recorded in the background
        stored = await client.get(f"/v1/assets/imohash:{imohash_of(image)}")
        if stored.status == 200:
            break
        await asyncio.sleep(0.05)
    asset = await ok(stored)
    thumbnail = await client.get(f"/v1/assets/{asset['id']}/thumbnail")
    assert thumbnail.status == 200
    assert Image.open(io.BytesIO(await thumbnail.read())).size == (ASSET_SIZE, ASSET_SIZE)


async def test_a_store_from_before_thumbnails_is_migrated_and_backfilled_by_reingesting(
    aiohttp_client, settings, monkeypatch
) -> None:
    data = encode(gradient(300, 200), "PNG")
    settings.data_dir.mkdir(parents=True)
    with monkeypatch.context() as patch:  # an immich-trt of schema version 1 ingested this file
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        old = Store(settings.data_dir)
        save_results(old, AssetResults(imohash_of(data), len(data), 300, 200, ref="old-one"))
        old.conn.execute("INSERT INTO asset_tasks VALUES (1, 'clip', 'ViT-B-32__openai', 0)")
        assert old.version == 1
        old.close()

    client = await aiohttp_client(create_app(settings))
    backups = list(settings.data_dir.glob("sidecar.db.v1-*.bak"))
    assert len(backups) == 1  # the copy kept before the upgrade
    assert sqlite3.connect(backups[0]).execute("PRAGMA user_version").fetchone()[0] == 1
    status = await ok(await client.get("/v1/status"))
    assert status["schemaVersion"] == len(store_module.MIGRATIONS) and status["ingested"]["thumbnail"] == 0
    missing = await client.get("/v1/assets/1/thumbnail")
    assert missing.status == 404 and "ingest its file again" in (await missing.json())["detail"]

    assert (await ok(await client.get("/v1/assets/1")))["thumbnail"] is False
    again = await ok(await client.post("/v1/ingest", data=ingest_form(data, assetId="old-one", faces=False, ocr=False)))
    assert again["created"] is False and again["ran"] == [] and again["skipped"] == ["clip"]
    thumbnail = await client.get("/v1/assets/1/thumbnail")
    assert thumbnail.status == 200
    assert Image.open(io.BytesIO(await thumbnail.read())).size == (256, 171)
    assert (await ok(await client.get("/v1/assets/1")))["thumbnail"] is True
    assert (await ok(await client.get("/v1/status")))["ingested"]["thumbnail"] == 1


async def test_folder_ingest_sends_files_again_only_for_a_missing_thumbnail(aiohttp_client, settings, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(gradient(300, 200), "PNG"))
    (folder / "b.png").write_bytes(encode(gradient(200, 300), "PNG"))
    client = await aiohttp_client(create_app(settings))
    url = str(client.server.make_url("")).rstrip("/")
    first = await ingest_folder(url, folder, faces=False, ocr=False, progress=False)
    assert (first.ingested, first.skipped, first.failed) == (2, 0, 0)
    second = await ingest_folder(url, folder, faces=False, ocr=False, progress=False)
    assert (second.ingested, second.skipped) == (0, 2)
    # as if "a" were stored by a version without thumbnails: the next run sends it again
    sqlite3.connect(settings.data_dir / "sidecar.db", isolation_level=None).execute(
        "DELETE FROM asset_thumbnails WHERE asset = 1"
    )
    third = await ingest_folder(url, folder, faces=False, ocr=False, progress=False)
    assert (third.ingested, third.skipped, third.failed) == (1, 1, 0)
    assert (await client.get("/v1/assets/1/thumbnail")).status == 200
