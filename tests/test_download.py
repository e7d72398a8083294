"""Model downloads against local HTTP servers started by the tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from aiohttp import web

from immich_trt.models.base import ModelContext, ModelLoadError
from immich_trt.models.download import DownloadError, download_url, hf_snapshot
from immich_trt.models.ocr import TextDetector, TextRecognizer
from immich_trt.tools.testing import UNREACHABLE, offline_settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


async def cut_midway(request: web.Request, data: bytes, headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Announce ``len(data)`` bytes, send half of them, then close the socket."""
    response = web.StreamResponse(headers=headers)
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    await asyncio.sleep(0.05)
    request.transport.close()
    return response


def fake_hub(repo_id: str, files: dict[str, bytes], log: list[str], cut: dict[str, int] | None = None) -> web.Application:
    """The Hugging Face endpoints snapshot_download uses: revision info, the file tree,
    and HEAD/GET on resolve URLs (with X-Repo-Commit and ETag). The next ``cut[path]``
    GETs of a path are cut off halfway."""
    cut = {} if cut is None else cut

    async def info(request: web.Request) -> web.Response:
        if f"{request.match_info['ns']}/{request.match_info['name']}" != repo_id:
            return web.json_response({"error": "Repository not found"}, status=404, headers={"X-Error-Code": "RepoNotFound"})
        return web.json_response({"id": repo_id, "sha": COMMIT})

    async def tree(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for path, data in files.items()
            ]
        )

    async def resolve(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        log.append(f"{request.method} {path}")
        if path not in files:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(files[path]).hexdigest()}"'}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(files[path]))})
        if cut.get(path, 0) > 0:
            cut[path] -= 1
            return await cut_midway(request, files[path], headers)
        return web.Response(body=files[path], headers=headers)

    app = web.Application()
    app.router.add_get("/api/models/{ns}/{name}/revision/{rev}", info)
    app.router.add_get("/api/models/{ns}/{name}/tree/{rev}", tree)
    app.router.add_route("*", "/{ns}/{name}/resolve/{rev}/{path:.+}", resolve)
    return app


def file_server(files: dict[str, bytes], log: list[str], cut: dict[str, int] | None = None) -> web.Application:
    """GET ``/<path>`` of ``files``; the next ``cut[path]`` GETs are cut off halfway."""
    cut = {} if cut is None else cut

    async def get(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        log.append(path)
        if path not in files:
            raise web.HTTPNotFound()
        if cut.get(path, 0) > 0:
            cut[path] -= 1
            return await cut_midway(request, files[path])
        return web.Response(body=files[path])

    app = web.Application()
    app.router.add_get("/{path:.+}", get)
    return app


async def test_hf_snapshot_downloads_the_repository_without_accelerator_files(aiohttp_server, tmp_path: Path) -> None:
    files = {
        "config.json": json.dumps({"embed_dim": 512}).encode(),
        "visual/model.onnx": b"onnx-visual" * 1000,
        "textual/tokenizer.json": b"{}",
        "visual/model.armnn": b"armnn",
        "textual/rknpu/rk3588/model.rknn": b"rknn",
    }
    log: list[str] = []
    server = await aiohttp_server(fake_hub("immich-app/ViT-B-32__openai", files, log))
    dest = tmp_path / "clip" / "ViT-B-32__openai"
    await asyncio.to_thread(hf_snapshot, "immich-app/ViT-B-32__openai", dest, str(server.make_url("")).rstrip("/"))
    assert (dest / "visual" / "model.onnx").read_bytes() == files["visual/model.onnx"]
    assert (dest / "config.json").read_bytes() == files["config.json"]
    assert not (dest / "visual" / "model.armnn").exists()
    assert not any("armnn" in entry or "rknn" in entry for entry in log)


async def test_hf_snapshot_errors(aiohttp_server, tmp_path: Path) -> None:
    server = await aiohttp_server(fake_hub("immich-app/other", {}, []))
    with pytest.raises(DownloadError, match="immich-app/ViT-B-32__openai"):
        await asyncio.to_thread(
            hf_snapshot, "immich-app/ViT-B-32__openai", tmp_path / "a", str(server.make_url("")).rstrip("/")
        )
    with pytest.raises(DownloadError):
        await asyncio.to_thread(hf_snapshot, "immich-app/ViT-B-32__openai", tmp_path / "b", UNREACHABLE)


async def test_download_url_verifies_sha256_atomically(aiohttp_server, tmp_path: Path) -> None:
    payload = b"model bytes" * 10000
    server = await aiohttp_server(file_server({"det/model.onnx": payload}, []))
    url = str(server.make_url("/det/model.onnx"))
    dest = tmp_path / "detection" / "model.onnx"

    with pytest.raises(DownloadError, match="checksum mismatch"):
        await asyncio.to_thread(download_url, url, dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file, no empty folder left

    with pytest.raises(DownloadError, match="404"):
        await asyncio.to_thread(download_url, str(server.make_url("/missing.onnx")), dest)
    with pytest.raises(DownloadError):
        await asyncio.to_thread(download_url, f"{UNREACHABLE}/x.onnx", dest)

    await asyncio.to_thread(download_url, url, dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]


async def test_a_download_cut_midway_leaves_no_file_and_succeeds_on_retry(aiohttp_server, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    cut = {"rec/model.onnx": 0}
    server = await aiohttp_server(file_server({"rec/model.onnx": payload}, [], cut))
    url = str(server.make_url("/rec/model.onnx"))
    dest = tmp_path / "recognition" / "model.onnx"
    # with a known checksum and without one (the length announced by the server is checked)
    for sha256, message in ((hashlib.sha256(payload).hexdigest(), "incomplete"), (None, "incomplete")):
        cut["rec/model.onnx"] = 1
        with pytest.raises(DownloadError, match=message):
            await asyncio.to_thread(download_url, url, dest, sha256)
        assert not dest.parent.exists()  # no partial or temporary file, no empty folder
        await asyncio.to_thread(download_url, url, dest, sha256)  # the next attempt is whole
        assert dest.read_bytes() == payload
        dest.unlink()
        dest.parent.rmdir()


async def test_a_hub_download_cut_midway_is_never_used_and_is_fetched_again(aiohttp_server, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096
    files = {"config.json": b"{}", "visual/model.onnx": payload}
    cut = {"visual/model.onnx": 100}  # every attempt of the first download is cut (huggingface_hub resumes)
    server = await aiohttp_server(fake_hub("immich-app/ViT-B-32__openai", files, [], cut))
    endpoint = str(server.make_url("")).rstrip("/")
    dest = tmp_path / "clip" / "ViT-B-32__openai"
    with pytest.raises(DownloadError):
        await asyncio.to_thread(hf_snapshot, "immich-app/ViT-B-32__openai", dest, endpoint)
    assert not (dest / "visual" / "model.onnx").exists()  # the partial file is kept aside, never used
    cut["visual/model.onnx"] = 0
    await asyncio.to_thread(hf_snapshot, "immich-app/ViT-B-32__openai", dest, endpoint)
    assert (dest / "visual" / "model.onnx").read_bytes() == payload


async def test_ocr_models_download_rapidocr_urls(aiohttp_server, tmp_path: Path) -> None:
    """The URL paths and checksums are RapidOCR's; a server with other bytes fails the
    checksum, and without the offline package fallback that is a load error."""
    log: list[str] = []
    server = await aiohttp_server(file_server({}, log))
    settings = offline_settings(tmp_path, offline_models=False)
    settings = type(settings)(**{**settings.__dict__, "rapidocr_base_url": str(server.make_url("")).rstrip("/")})
    ctx = ModelContext(settings=settings, runtime=None)  # type: ignore[arg-type]
    for model in (
        TextDetector("EN__PP-OCRv5_mobile", ctx),
        TextRecognizer("EN__PP-OCRv5_mobile", ctx),
        TextDetector("PP-OCRv5_server", ctx),
        TextRecognizer("KOREAN__PP-OCRv5_mobile", ctx),
    ):
        with pytest.raises(ModelLoadError, match="404"):
            await asyncio.to_thread(model._obtain)
    assert log == [
        "det/ch_PP-OCRv5_det_mobile.onnx",
        "rec/en_PP-OCRv5_rec_mobile.onnx",
        "det/ch_PP-OCRv5_det_server.onnx",
        "rec/korean_PP-OCRv5_rec_mobile.onnx",
    ]
    assert TextDetector("EN__PP-OCRv5_mobile", ctx).model_file == tmp_path / "ocr/PP-OCRv5_mobile/detection/model.onnx"
    assert TextRecognizer("EN__PP-OCRv5_mobile", ctx).model_file == tmp_path / "ocr/EN__PP-OCRv5_mobile/recognition/model.onnx"


def test_offline_package_is_the_fallback_for_pp_ocrv5_mobile(tmp_path: Path) -> None:
    ctx = ModelContext(settings=offline_settings(tmp_path), runtime=None)  # type: ignore[arg-type]
    rec = TextRecognizer("PP-OCRv5_mobile", ctx)
    rec._obtain()
    assert rec.model_file.is_file()
    assert len((rec.model_file.parent / "characters.txt").read_text(encoding="utf-8").splitlines()) == 18383
    with pytest.raises(ModelLoadError):  # no offline source for other languages
        TextRecognizer("EN__PP-OCRv5_mobile", ctx)._obtain()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_a_failed_download_leaves_no_empty_model_folder(tmp_path: Path) -> None:
    """Offline (a closed loopback port): neither the Hugging Face snapshot of a CLIP or
    face model nor an OCR file leaves a folder behind; a model folder that was already
    there stays, with its files."""
    cache = tmp_path / "cache"
    cache.mkdir()
    ctx = ModelContext(settings=offline_settings(cache, offline_models=False), runtime=None)  # type: ignore[arg-type]
    from immich_trt.models import build_model
    from immich_trt.models.registry import ModelTask, ModelType, resolve

    for name, model_type, task in (
        ("ViT-B-32__openai", "visual", "clip"),
        ("buffalo_l", "detection", "facial-recognition"),
        ("EN__PP-OCRv5_mobile", "recognition", "ocr"),
        ("PP-OCRv5_server", "detection", "ocr"),
    ):
        source, _ = resolve(name, model_type, task)
        model = build_model(source, name, ModelType(model_type), ModelTask(task), ctx, {})
        with pytest.raises(ModelLoadError):
            await asyncio.to_thread(model._obtain)
        assert _tree(cache) == [], name
    # an existing model folder with other files keeps them; only what the download made goes
    kept = cache / "clip" / "ViT-B-32__openai" / "textual"
    kept.mkdir(parents=True)
    (kept / "model.onnx").write_bytes(b"kept")
    source, _ = resolve("ViT-B-32__openai", "visual", "clip")
    visual = build_model(source, "ViT-B-32__openai", ModelType.VISUAL, ModelTask.SEARCH, ctx, {})
    with pytest.raises(ModelLoadError):  # huggingface_hub answers the existing folder; it has no visual model
        await asyncio.to_thread(visual._obtain)
    with pytest.raises(DownloadError):
        await asyncio.to_thread(download_url, f"{UNREACHABLE}/x.onnx", kept.parent / "visual" / "model.onnx")
    assert _tree(cache) == ["clip", "clip/ViT-B-32__openai", "clip/ViT-B-32__openai/textual",
                            "clip/ViT-B-32__openai/textual/model.onnx"]
