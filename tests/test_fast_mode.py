"""Fast mode (IMMICH_TRT_FAST, immich_trt/runtime/fast.py, tools/quantize.py): the setting,
which file or engine each model is served from and what is logged, OpenVINO's sessions on
the real PP-OCRv5 models, and end to end: `immich-trt models quantize` calibrated on real
photos, then /predict in default and fast mode compared with the bench's agreement
metrics against fast mode's fidelity goals."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt import contract
from immich_trt.cli import main as cli_main
from immich_trt.config import Settings
from immich_trt.runtime import make_runtime
from immich_trt.runtime.base import ModelSpec
from immich_trt.runtime.cpu import CpuPlan
from immich_trt.runtime.derived import record_source
from immich_trt.runtime.fast import FastSessions, int8_file, is_quantized, task_and_type
from immich_trt.runtime.onnxruntime import OnnxRuntime, make_session
from immich_trt.runtime.openvino import openvino_available
from immich_trt.tools import bench
from immich_trt.tools import testpack as tp
from immich_trt.tools.testing import UNREACHABLE, offline_settings, prepare_ocr_cache

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="needs openvino (the test and fast extras)")

CLIP = "clip__ViT-B-32__openai__visual"
ARCFACE = "facial-recognition__buffalo_l__recognition"
#: fast mode's fidelity goals against the fp32 (stock) answers
CLIP_COSINE, FACE_COSINE, FACE_BOX_PX, OCR_IDENTICAL = 0.995, 0.99, 2.0, 0.97


@pytest.fixture(scope="module")
def ocr_files(ocr_cache: Path) -> dict[str, Path]:
    """The real PP-OCRv5 mobile detector and recognizer (the offline cache of conftest)."""
    root = ocr_cache / "ocr" / "PP-OCRv5_mobile"
    return {"det": root / "detection" / "model.onnx", "rec": root / "recognition" / "model.onnx"}


# ---------------------------------------------------------------------- the setting


def test_fast_mode_is_off_unless_asked_for() -> None:
    assert Settings().fast is False and Settings.from_env({}).fast is False
    assert Settings.from_env({"IMMICH_TRT_FAST": "true"}).fast is True
    assert Settings.from_env({"IMMICH_TRT_FAST": "0"}).fast is False


def test_which_models_fast_mode_changes(tmp_path: Path) -> None:
    assert task_and_type("clip__XLM-Roberta-Large-Vit-B-16Plus__visual") == ("clip", "visual")
    assert task_and_type("ocr__EN__PP-OCRv5_mobile__recognition") == ("ocr", "recognition")
    assert is_quantized(CLIP) and is_quantized(ARCFACE)
    assert not is_quantized("clip__ViT-B-32__openai__textual")
    assert not is_quantized("facial-recognition__buffalo_l__detection")
    assert int8_file(tmp_path, CLIP) == tmp_path / CLIP / "model.int8.onnx"


def test_make_runtime_in_fast_mode(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="immich_trt.runtime")
    runtime = make_runtime(Settings(runtime="onnxruntime", engines_dir=tmp_path, fast=True))
    assert isinstance(runtime, OnnxRuntime) and isinstance(runtime.session_factory, FastSessions)
    assert "Fast mode (IMMICH_TRT_FAST)" in caplog.text
    asyncio.run(runtime.stop())
    default = make_runtime(Settings(runtime="onnxruntime", engines_dir=tmp_path))
    assert not isinstance(default.session_factory, FastSessions)  # never on by default
    asyncio.run(default.stop())
    caplog.clear()
    from immich_trt.runtime.triton import TritonRuntime

    triton = make_runtime(Settings(runtime="triton", engines_dir=tmp_path, fast=True))
    assert isinstance(triton, TritonRuntime) and "applies to the in-process runtime only" in caplog.text


# ------------------------------------------------- what each model is served from


def test_fast_sessions_serve_int8_only_when_made_from_the_served_file(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, ocr_files: dict[str, Path]
) -> None:
    """Real files: a small ArcFace-layout model and its int8 quantization; the OCR
    recognizer without OpenVINO. Each fallback logs one line saying what to do."""
    from immich_trt.tools.quantize import quantize_file

    caplog.set_level(logging.INFO, logger="immich_trt.runtime.fast")
    source = tp._save(tp.arcface_model(), tmp_path / "cache" / "model.onnx", False)
    spec = ModelSpec(ARCFACE, source)
    factory = FastSessions(tmp_path / "engines", openvino=False)
    assert factory.choose(spec) == ("fp32", source)
    assert factory.choose(spec) == ("fp32", source)
    assert caplog.text.count("int8 file") == 1 and "immich-trt models quantize --images DIR" in caplog.text

    crops = np.random.default_rng(0).uniform(-1, 1, (16, 3, 112, 112)).astype(np.float32)
    dest = int8_file(tmp_path / "engines", ARCFACE)
    quantize_file(source, dest, [{"input.1": crops}], "facial-recognition")
    factory = FastSessions(tmp_path / "engines", openvino=False)
    assert factory.choose(spec) == ("int8", dest)
    session = factory(spec, 1, 1, False, False)
    assert [o.op_type for o in __import__("onnx").load(str(dest)).graph.node].count("QuantizeLinear") > 0
    got = session.run(None, {"input.1": crops})[0]
    want = make_session(source, 1, 1).run(None, {"input.1": crops})[0]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99

    os.utime(source, ns=(1, 1))  # the model file changed after quantization: the int8 file is stale
    caplog.clear()
    factory = FastSessions(tmp_path / "engines", openvino=False)
    assert factory.choose(spec) == ("fp32", source) and "is older than the model file" in caplog.text
    record_source(dest, source)
    assert factory.choose(spec) == ("int8", dest)

    caplog.clear()
    rec = ModelSpec("ocr__PP-OCRv5_mobile__recognition", ocr_files["rec"])
    det = ModelSpec("ocr__PP-OCRv5_mobile__detection", ocr_files["det"])
    assert factory.choose(rec) == ("fp32", ocr_files["rec"]) and factory.choose(det)[0] == "fp32"
    assert caplog.text.count("openvino is not installed") == 1 and "pip install -e '.[fast]'" in caplog.text
    text = ModelSpec("clip__ViT-B-32__openai__textual", source)
    assert factory.choose(text) == ("fp32", source)  # models fast mode does not change


@needs_openvino
async def test_openvino_sessions_answer_as_onnxruntime_under_overlapping_calls(ocr_files: dict[str, Path]) -> None:
    """PP-OCRv5 mobile in OpenVINO through the in-process runtime (wide and one-thread
    sessions from the core plan): outputs within 1e-4 of ONNX Runtime with the same
    dtypes and shapes, concurrent calls on one session safe."""
    plan = CpuPlan(cores=2, wide_threads=2, narrow_max_bytes=64 * 2**20)
    factory = FastSessions(Path("/nonexistent"), openvino=True)
    fast = OnnxRuntime(arena=False, plan=plan, session_factory=factory)
    reference = OnnxRuntime(arena=False, intra_op=2)
    spec = ModelSpec("ocr__PP-OCRv5_mobile__recognition", ocr_files["rec"])
    try:
        await fast.load(spec)
        await reference.load(spec)
        assert factory.served[spec.name] == "openvino"
        rng = np.random.default_rng(1)
        batches = [rng.uniform(-1, 1, (n, 3, 48, 320 + 40 * n)).astype(np.float32) for n in (1, 3, 6, 2)]
        got = await asyncio.gather(*(fast.infer(spec.name, {"x": b}) for b in batches))  # dynamic shapes, overlapping
        assert fast.calls["narrow"] >= 2
        for out, batch in zip(got, batches):
            want = await reference.infer(spec.name, {"x": batch})
            assert set(out) == set(want)
            for name in want:
                assert out[name].dtype == want[name].dtype and out[name].shape == want[name].shape
                assert np.allclose(out[name], want[name], atol=1e-4)
        session = fast._sessions[spec.name].wide
        with ThreadPoolExecutor(4) as pool:  # one infer request per concurrent call
            outs = list(pool.map(lambda b: session.run(None, {"x": b}), batches * 2))
        for out, batch in zip(outs, batches * 2):
            alone = session.run(None, {"x": batch})
            assert len(out) == len(alone) and all(np.allclose(a, b, atol=1e-6) for a, b in zip(out, alone))
    finally:
        await fast.stop()
        await reference.stop()


# ----------------------------------------------- end to end: quantize, serve, compare


def _with_faces(path: Path) -> Image.Image:
    """A real photo with three white squares pasted in, which the small test detector
    reports as faces (its output is a function of the brightness of 32-pixel cells)."""
    image = Image.open(path).convert("RGB")
    image.thumbnail((1440, 1440))
    side = max(image.size) // 6
    for k, (fx, fy) in enumerate(((0.15, 0.2), (0.55, 0.3), (0.35, 0.65))):
        x, y = int(fx * image.width), int(fy * image.height)
        image.paste((255, 255, 255) if k != 1 else (246, 246, 246), (x, y, x + side, y + side))
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


CALIBRATION_PHOTOS = ("portrait.jpg", "prairie_falcon.jpg", "silver_fir.jpg", "tanners_ridge.jpg")
TEST_PHOTOS = ("el_torcal_rocks.jpg", "wood_anemones.jpg", "cyclamen_persicum.jpg", "thompson-springs.jpg")
OCR_IMAGES = ("ch_en_num.jpg", "en.jpg", "japan.jpg", "img_exif_orientation.jpg")


@pytest.fixture(scope="module")
def fast_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PP-OCRv5 mobile, the small test pack, and real architectures (random weights) where
    fast mode quantizes: a one-block ViT-B/32 CLIP visual encoder and a MobileFaceNet."""
    cache = prepare_ocr_cache(tmp_path_factory.mktemp("fast-cache"))
    tp.make_test_pack(cache)
    tp._save(tp.clip_visual_full(layers=1), cache / "clip" / "ViT-B-32__openai" / "visual" / "model.onnx", True)
    face = cache / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx"
    tp._save(tp.mobilefacenet_model(scale=1), face, True)
    return cache


async def _answers(aiohttp_client, settings: Settings, requests: list[tuple[str, str, dict, bytes]]) -> dict:
    from immich_trt.application import create_app

    client = await aiohttp_client(create_app(settings))
    answers = {}
    for task, name, entries, image in requests:
        data = contract.build_form(entries, image, None)
        response = await client.post("/predict", data=data)
        assert response.status == 200, await response.text()
        answers[(task, name)] = await response.read()
    await client.close()
    return answers


@requires_data
@needs_openvino
async def test_fast_mode_end_to_end_meets_its_fidelity_goals(
    aiohttp_client, fast_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    engines = tmp_path / "engines"
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in CALIBRATION_PHOTOS:
        (photos / name).write_bytes(_jpeg(_with_faces(SHARED_DATA / "photos" / name)))
    for key, value in {
        "MACHINE_LEARNING_CACHE_FOLDER": str(fast_cache),
        "IMMICH_TRT_ENGINES_DIR": str(engines),
        "HF_ENDPOINT": UNREACHABLE,
        "IMMICH_TRT_RAPIDOCR_BASE_URL": UNREACHABLE,
    }.items():
        monkeypatch.setenv(key, value)

    quantize = ["models", "quantize", "--images"]
    assert await asyncio.to_thread(cli_main, [*quantize, str(tmp_path / "missing")]) == 1  # the CLI runs its own loop
    assert "is not a folder of images" in capsys.readouterr().err
    assert await asyncio.to_thread(cli_main, [*quantize, str(photos)]) == 0
    out = capsys.readouterr().out
    assert f"{len(CALIBRATION_PHOTOS)} previews from" in out and "IMMICH_TRT_FAST=true" in out
    for name in (CLIP, ARCFACE):
        assert int8_file(engines, name).is_file() and str(int8_file(engines, name)) in out
    assert not list(fast_cache.rglob("*.int8.onnx"))  # never into the model cache

    requests = []
    for name in TEST_PHOTOS:
        preview = bench.make_preview(_jpeg(_with_faces(SHARED_DATA / "photos" / name)))
        requests.append(("clip-visual", name, contract.clip_visual_entries(), preview))
        requests.append(("faces", name, contract.face_entries(), preview))
    for name in OCR_IMAGES:
        requests.append(("ocr", name, contract.ocr_entries(), bench.make_preview((SHARED_DATA / "ocr" / name).read_bytes())))

    base = offline_settings(fast_cache, runtime="onnxruntime", model_ttl=0, engines_dir=engines, sidecar=False)
    default = await _answers(aiohttp_client, base, requests)
    fast = await _answers(aiohttp_client, dataclasses.replace(base, fast=True), requests)
    answers = {key: {"default": default[key], "fast": fast[key]} for key in default}
    clip, faces, ocr = bench.agreements(answers, ["default", "fast"], ["clip-visual", "faces", "ocr"])
    summary = {a.task: a.summary() for a in (clip, faces, ocr)}

    assert clip.items == len(TEST_PHOTOS) and min(clip.cosines) >= CLIP_COSINE, summary
    assert min(clip.cosines) < 1.0  # the int8 file served, not the fp32 one
    assert faces.items == len(TEST_PHOTOS) and faces.equal == faces.items, summary  # same face count
    assert faces.unmatched_faces == 0 and len(faces.cosines) >= len(TEST_PHOTOS), summary
    assert max(faces.offsets) <= FACE_BOX_PX and min(faces.cosines) >= FACE_COSINE, summary
    assert min(faces.cosines) < 1.0
    assert ocr.items == len(OCR_IMAGES) and ocr.lines >= 20, summary
    assert ocr.identical_line_share is not None and ocr.identical_line_share >= OCR_IDENTICAL, summary
    assert max(ocr.offsets) <= 2.0, summary
    print(json.dumps(summary, ensure_ascii=False))
