"""The whole /predict over HTTP through `immich-trt serve`, with the real Triton server and
with the default runtime (in-process ONNX Runtime on this GPU-less host), compared byte for
byte with stock immich-ml 3.1.0 on the real images."""

from __future__ import annotations

import json

import pytest

from conftest import GOLDEN, SHARED_DATA, requires_data
from immich_trt.contract import ocr_detection_entries, ocr_entries, predict

GOLDEN_OCR = json.loads((GOLDEN / "immich_ml_3.1.0_ocr.json").read_text(encoding="utf-8"))
CASES = [(kind, image) for kind, responses in GOLDEN_OCR["responses"].items() for image in responses]


def test_golden_file_covers_both_request_kinds() -> None:
    assert {kind for kind, _ in CASES} == {"ocr", "ocr_detection_only"}
    assert len(CASES) == 70
    # the recorded requests are the ones immich_trt.contract builds (Immich's defaults)
    assert GOLDEN_OCR["requests"] == {"ocr": ocr_entries(), "ocr_detection_only": ocr_detection_entries()}


@pytest.fixture(params=["live_server", "default_server"], ids=["triton", "default"], scope="session")
def server(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


@requires_data
@pytest.mark.parametrize(("kind", "image"), CASES, ids=[f"{k}:{i}" for k, i in CASES])
async def test_byte_identical_to_stock_immich_ml(server, kind: str, image: str) -> None:
    expected = GOLDEN_OCR["responses"][kind][image]
    status, content_type, body = await predict(
        None, server.url, GOLDEN_OCR["requests"][kind], (SHARED_DATA / image).read_bytes()
    )
    assert status == expected["status"]
    assert content_type.split(";")[0] == expected["content_type"].split(";")[0]
    assert body.decode() == expected["body"]


def test_server_log_names_the_runtime(live_server) -> None:
    log = live_server.log_path.read_text(errors="replace")
    assert "Triton ready on http" in log
    assert "runtime: triton" in log


def test_default_runtime_is_in_process_on_a_host_without_gpu(default_server) -> None:
    log = default_server.log_path.read_text(errors="replace")
    assert "Runtime: in-process ONNX Runtime (no NVIDIA GPU and no TRITON_URL" in log
    assert "at most" in log and "inference calls at once" in log
    assert "runtime: onnxruntime" in log and "Triton ready" not in log
