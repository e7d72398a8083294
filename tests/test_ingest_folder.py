"""First-run behaviour of ingestion: HEIC originals in the sidecar (while /predict keeps
Immich's answer), files refused once and then remembered, and ``immich-trt ingest``
failing fast with one line when nothing can succeed."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import aiohttp
import pillow_heif
import pytest
from aiohttp import web
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.cli import main
from immich_trt.sidecar.folder import FAILURES_FILE, IngestAborted, ingest_folder
from immich_trt.tools.testing import UNREACHABLE, offline_settings


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


async def test_a_refused_file_is_reported_once_and_skipped_until_changed(aiohttp_server, settings, tmp_path) -> None:
    server = await aiohttp_server(create_app(settings))
    url = str(server.make_url("")).rstrip("/")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(40, 30))
    (folder / "b.heic").write_bytes(heic(50, 40))
    broken = folder / "c.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    failures = tmp_path / "state" / FAILURES_FILE

    def run(**kw):
        return ingest_folder(url, folder, progress=False, failures=failures, **kw)

    first = await run()
    assert (first.ingested, first.failed, first.failed_before) == (2, 1, 0)
    assert len(first.errors) == 1 and "c.jpg: HTTP 400" in first.errors[0] and "cannot be decoded" in first.errors[0]
    assert list(json.loads(failures.read_text())) == [str(broken.resolve())]

    second = await run()  # not uploaded again, not reported again
    assert (second.ingested, second.skipped, second.failed, second.failed_before) == (0, 2, 0, 1)
    assert second.errors == []

    third = await run(retry_failed=True)  # asked: tried again
    assert (third.skipped, third.failed, third.failed_before) == (2, 1, 0)

    broken.write_bytes(png(20, 20, (1, 2, 3)))  # fixed: new content is uploaded without asking
    fourth = await run()
    assert (fourth.ingested, fourth.skipped, fourth.failed, fourth.failed_before) == (1, 2, 0, 0)
    assert json.loads(failures.read_text()) == {}


def test_ingest_of_a_missing_folder_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "data"))
    assert main(["ingest", str(tmp_path / "missing"), "--url", UNREACHABLE, "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"ingest: {tmp_path / 'missing'} does not exist"]
    assert captured.out == ""


def test_ingest_with_the_server_down_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(5):
        (folder / f"{n}.png").write_bytes(png(10 + n, 10))
    assert main(["ingest", str(folder), "--url", UNREACHABLE, "--quiet"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ingest: cannot reach the server at {UNREACHABLE} (") and "immich-trt serve" in line


async def test_ingest_refused_key_and_a_server_lost_midway_stop_at_once(aiohttp_server, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(6):
        (folder / f"{n}.png").write_bytes(png(10 + n, 10))
    seen: list[str] = []

    async def status(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer right":
            return web.json_response({"detail": "missing or wrong API key"}, status=401)
        return web.json_response({"assets": 0})

    async def asset(request: web.Request) -> web.Response:  # the server goes away after /v1/status
        seen.append(request.path)
        request.transport.close()
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/assets/{ref:.+}", asset)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    with pytest.raises(IngestAborted, match="refused the request \\(HTTP 401\\): set IMMICH_TRT_API_KEY"):
        await ingest_folder(url, folder, progress=False, api_key="wrong")
    assert seen == []  # nothing was attempted
    with pytest.raises(IngestAborted, match=f"lost the server at {url} while ingesting"):
        await ingest_folder(url, folder, progress=False, api_key="right", concurrency=2)
    assert 1 <= len(set(seen)) <= 2  # the files in flight when it went away (aiohttp retries a GET once); none after


async def test_the_cli_reports_a_refused_file_once(aiohttp_server, settings, monkeypatch, tmp_path, capsys) -> None:
    server = await aiohttp_server(create_app(settings))
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "client"))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.heic").write_bytes(heic(30, 20))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    argv = ["ingest", str(folder), "--url", str(server.make_url("")).rstrip("/"), "--quiet"]

    assert await asyncio.to_thread(main, argv) == 1
    out, err = capsys.readouterr()
    assert [line.split(": HTTP 400")[0] for line in err.splitlines()] == [f"failed: {folder / 'broken.png'}"]
    assert json.loads(out) == {"ingested": 1, "skipped": 0, "failed": 1, "faces": 0, "failedBefore": 0}
    assert (tmp_path / "client" / FAILURES_FILE).is_file()

    assert await asyncio.to_thread(main, argv) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"1 file(s) failed on an earlier run and are unchanged: skipped (listed in "
        f"{tmp_path / 'client' / FAILURES_FILE}; --retry-failed tries them again)"
    ]
    assert json.loads(out) == {"ingested": 0, "skipped": 1, "failed": 0, "faces": 0, "failedBefore": 1}
    assert await asyncio.to_thread(main, [*argv, "--retry-failed"]) == 1
    assert "failed: " in capsys.readouterr().err


def test_the_failures_file_survives_damage(tmp_path) -> None:
    from immich_trt.sidecar.folder import FailedFiles

    state = FailedFiles(tmp_path / FAILURES_FILE)
    state.add("/x/y.jpg", "0" * 32, "HTTP 400: image cannot be decoded")
    state.save()
    again = FailedFiles(tmp_path / FAILURES_FILE)
    assert again.known("/x/y.jpg", "0" * 32)["error"].startswith("HTTP 400")
    assert again.known("/x/y.jpg", "1" * 32) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert FailedFiles(tmp_path / "bad.json").entries == {}
