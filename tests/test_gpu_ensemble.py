"""GPU-target wiring (Triton ensembles) and the server's GPU path, through the real Triton
server of the nvidia-pytriton wheel, with python-backend stand-ins of the same names and
tensor contracts for the DALI and TensorRT models (``write_standin_repository``).

One Triton serves the module: the stand-in repository of the test pack (CLIP
``ViT-B-32__openai``, faces ``buffalo_l``, plus ``buffalo_s`` whose preprocessing model
is removed) and PP-OCRv5 mobile. Its ensembles are checked to be, byte for byte, those
wired to the configs of the real TensorRT and DALI writers. The stand-ins run the CPU
reference preprocessing, so the ensembles must give the CPU path's numbers exactly; the
contract's tolerances (CLIP cosine >= 0.995, face boxes within 2 px, identical OCR
texts) are asserted as well. What this cannot show: the DALI pipelines' own numbers
(``tests/test_dali_parity.py``, CPU mode) and anything on a GPU.

Golden files: ``tests/golden/ensemble/*.pbtxt``; after an intended change, regenerate with
``IMMICH_TRT_UPDATE_GOLDEN=1 pytest tests/test_gpu_ensemble.py -k golden`` and review the diff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from conftest import GOLDEN, SHARED_DATA, requires_data
from immich_trt.application import create_app
from immich_trt.contract import clip_visual_entries, face_entries, ocr_entries
from immich_trt.models.base import ModelContext
from immich_trt.models.clip import ClipVisualEncoder, clip_preprocess
from immich_trt.models.face import FaceDetector, ScrfdLayout, detection_blob, letterbox, scrfd_postprocess
from immich_trt.models.ocr import DET_INPUT_U8, TextDetector, det_resize, pad_to_bucket
from immich_trt.models.transforms import decode_pil, encoded_bytes, to_bgr
from immich_trt.runtime.base import ModelSpec
from immich_trt.runtime.ensemble import (
    BUCKET_HW,
    CLIP_EMBEDDING,
    DET_SCALE_OUTPUT,
    ENCODED_INPUT,
    RESIZE_HW,
    check_gpu_settings,
    gpu_path_names,
    image_format,
    with_ensembles,
)
from immich_trt.runtime.launcher import TritonLauncher
from immich_trt.runtime.triton import TritonRuntime
from immich_trt.tools import testpack as tp
from immich_trt.tools.engines import build_repository
from immich_trt.tools.gpu.ensemble import (
    CLIP_VISUAL,
    FACE_DETECTION,
    FACE_RECOGNITION,
    OCR_DETECTION,
    OCR_RECOGNITION,
    PREPROCESS_MAX_BATCH_SIZE,
    ModelIO,
    TensorSpec,
    build_gpu_repository,
    ensemble_config_pbtxt,
    gpu_kind,
    read_model_io,
    write_standin_models,
    write_standin_preprocess,
    write_standin_repository,
)
from immich_trt.tools.testing import offline_settings
from immich_trt.web import STATE

CLIP = "clip__ViT-B-32__openai__visual"
FACE = "facial-recognition__buffalo_l__detection"
BROKEN_FACE = "facial-recognition__buffalo_s__detection"  # its __preprocess is removed
OCR = "ocr__PP-OCRv5_mobile__detection"
ARCFACE = "facial-recognition__buffalo_l__recognition"
OCR_REC = "ocr__PP-OCRv5_mobile__recognition"
#: every model with GPU preprocessing in the stand-in repository (all but CLIP textual)
GPU_BASES = sorted([CLIP, FACE, BROKEN_FACE, OCR, ARCFACE, BROKEN_FACE.replace("detection", "recognition"), OCR_REC])
GOLDEN_DIR = GOLDEN / "ensemble"
PHOTOS = SHARED_DATA / "photos"
OCR_IMAGES = SHARED_DATA / "ocr"
#: a subset for the direct ensemble calls (150x103 to 5117x3411; JPEG, WebP, PNG, a
#: one-channel JPEG); the server tests below use every photo Pillow decodes
PHOTO_SUBSET = ("portrait.jpg", "portrait-orientation-6.jpg", "denali.webp", "density_plot.png",
                "handwritten-notes.jpg", "book-beside-flowers.jpg", "thompson-springs.jpg")  # fmt: skip


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def png(array_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def squares_png() -> bytes:
    """Two bright squares on black, 1280x960: two faces for the test-pack detector
    (the letterbox scale 0.5 keeps them 32 px squares on the detector's grid)."""
    bgr = tp.bright_square_image(1280, 960, [(128, 128, 64), (768, 512, 64)], value=250)
    return png(bgr[:, :, ::-1].copy())


def decodable_photos() -> list[Path]:
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        try:
            with Image.open(path):
                photos.append(path)
        except Exception:
            continue  # HEIC without a plugin: the server answers 400 on both paths
    return photos


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(model_cache: Path, tmp_path_factory) -> Path:
    """The session's model cache plus a second face pack (``buffalo_s``), in a copy."""
    copy = tmp_path_factory.mktemp("gpu-cache") / "cache"
    shutil.copytree(model_cache, copy, ignore=shutil.ignore_patterns("_*"))
    tp.write_face_model(copy, "buffalo_s")
    return copy


@pytest.fixture(scope="module")
def repository(cache: Path, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("gpu-repository")
    written = write_standin_repository(offline_settings(cache, engines_dir=repo), repo)
    bases = [CLIP, FACE, BROKEN_FACE, OCR]
    others = [CLIP.replace("visual", "textual"), FACE.replace("detection", "recognition"),
              BROKEN_FACE.replace("detection", "recognition"), OCR.replace("detection", "recognition")]  # fmt: skip
    assert written.models == sorted(bases + others)  # every cached model
    assert written.preprocess == [gpu_path_names(b).preprocess for b in GPU_BASES]
    assert written.ensembles == [gpu_path_names(b).ensemble for b in GPU_BASES]
    assert written.skipped == []
    shutil.rmtree(repo / gpu_path_names(BROKEN_FACE).preprocess)
    return repo


@pytest.fixture(scope="module")
async def triton(repository: Path, tmp_path_factory):
    launcher = TritonLauncher(repository, tmp_path_factory.mktemp("triton-work"))
    await launcher.start()
    yield launcher
    await launcher.stop()


@pytest.fixture(scope="module")
def gpu_settings(cache: Path, repository: Path, triton: TritonLauncher):
    return offline_settings(
        cache, engines_dir=repository, triton_url=triton.grpc_url, triton_protocol="grpc", preprocess="gpu",
        sidecar=False, model_ttl=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cpu_settings(gpu_settings):
    return dataclasses.replace(gpu_settings, preprocess="cpu")


@pytest.fixture(scope="module")
async def runtime(gpu_settings):
    runtime = TritonRuntime(gpu_settings)
    await runtime.start()
    for base in (CLIP, FACE, OCR):
        await runtime.load(ModelSpec(gpu_path_names(base).ensemble, Path("-")))
    yield runtime
    await runtime.stop()


@pytest.fixture
async def client_stats(triton: TritonLauncher, runtime):
    """A Triton client for model states and statistics (the ensembles loaded)."""
    import tritonclient.http.aio as httpclient

    client = httpclient.InferenceServerClient(triton.http_url)
    yield client
    await client.close()


async def success_count(client, name: str, expected: int | None = None) -> int:
    """Triton's count of successful inferences of ``name``; with ``expected``, polls for
    up to 5 s until it is reached (an ensemble's statistics may be recorded just after
    its response is sent)."""
    for _ in range(100):
        stats = await client.get_inference_statistics(name)
        count = int(stats["model_stats"][0]["inference_stats"]["success"]["count"])
        if expected is None or count >= expected:
            return count
        await asyncio.sleep(0.05)
    return count


# ------------------------------------------------------------------------------ configs


def batched_models() -> tuple[ModelIO, ModelIO]:
    """A CLIP model with a dynamic batch up to 32 and its preprocessing."""
    model = ModelIO(CLIP, 32, (TensorSpec("image", "TYPE_FP32", (3, 224, 224)),),
                    (TensorSpec("embedding", "TYPE_FP32", (512,)),))  # fmt: skip
    preprocess = ModelIO(gpu_path_names(CLIP).preprocess, 32, (TensorSpec(ENCODED_INPUT, "TYPE_UINT8", (-1,)),),
                         (TensorSpec("image", "TYPE_FP32", (3, 224, 224)),))  # fmt: skip
    return preprocess, model


def test_ensemble_configs_match_the_golden_files(repository: Path) -> None:
    texts = {
        f"{kind}.pbtxt": (repository / gpu_path_names(base).ensemble / "config.pbtxt").read_text()
        for kind, base in ((CLIP_VISUAL, CLIP), (FACE_DETECTION, FACE), (OCR_DETECTION, OCR),
                           (FACE_RECOGNITION, ARCFACE), (OCR_RECOGNITION, OCR_REC))  # fmt: skip
    }
    if os.environ.get("IMMICH_TRT_UPDATE_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (GOLDEN_DIR / name).write_text(text)
    for name, text in texts.items():
        assert text == (GOLDEN_DIR / name).read_text(), name
    # every ensemble has its (empty) version folder, as Triton requires
    assert all((repository / gpu_path_names(b).ensemble / "1").is_dir() for b in (CLIP, FACE, OCR))


def test_the_tensorrt_and_dali_configs_give_the_stand_ins_ensembles(cache: Path, repository: Path, tmp_path) -> None:
    """The ensembles wired to the configs of the real writers (TensorRT plans, DALI
    pipelines; configs only, no engine or pipeline is built here) are the stand-ins'
    byte for byte, so what Triton loads above is what a GPU host loads."""
    from immich_trt.tools.engines import cached_specs
    from immich_trt.tools.gpu.dali import dali_config_pbtxt
    from immich_trt.tools.gpu.tensorrt import engine_layout, tensorrt_config_pbtxt

    def plan_configs(settings, repository, *, only, gpus, **_):
        for spec in cached_specs(settings, only):
            (repository / spec.name / "1").mkdir(parents=True, exist_ok=True)
            text = tensorrt_config_pbtxt(engine_layout(spec, settings), gpus or settings.device_ids)
            (repository / spec.name / "config.pbtxt").write_text(text)

    def pipeline_config(folder: Path, kind, params, max_batch_size, device_ids):
        (folder / "1").mkdir(parents=True, exist_ok=True)
        text = dali_config_pbtxt(folder.name, kind, params, max_batch_size, device_ids=device_ids)
        (folder / "config.pbtxt").write_text(text)

    settings = offline_settings(cache)
    written = build_gpu_repository(settings, tmp_path, gpus=["0", "1"], build_engines=plan_configs,
                                   write_preprocess=pipeline_config)  # fmt: skip
    assert 'platform: "tensorrt_plan"' in (tmp_path / CLIP / "config.pbtxt").read_text()
    assert 'backend: "dali"' in (tmp_path / gpu_path_names(CLIP).preprocess / "config.pbtxt").read_text()
    for base in GPU_BASES:
        name = gpu_path_names(base).ensemble
        assert name in written.ensembles
        if base != BROKEN_FACE:
            assert (tmp_path / name / "config.pbtxt").read_text() == (repository / name / "config.pbtxt").read_text()
    # the DALI models have one GPU instance group per id
    dali = parse_config((tmp_path / gpu_path_names(ARCFACE).preprocess / "config.pbtxt").read_text())
    assert [list(g.gpus) for g in dali.instance_group] == [[0], [1]]
    # the batching that follows from the engines: CLIP batch-1 export, SCRFD without a
    # batch axis in its outputs, the OCR detector one image at a time
    assert [read_model_io(tmp_path / gpu_path_names(b).ensemble).max_batch_size for b in (CLIP, FACE, OCR)] == [1, 0, 1]


def test_names_and_kinds() -> None:
    assert gpu_path_names(OCR) == (OCR, f"{OCR}__preprocess", f"{OCR}__ensemble", f"{OCR}__unbatched")
    assert [gpu_kind(n) for n in (CLIP, FACE, OCR, ARCFACE, OCR_REC)] == [
        CLIP_VISUAL, FACE_DETECTION, OCR_DETECTION, FACE_RECOGNITION, OCR_RECOGNITION
    ]  # fmt: skip
    for name in ("clip__ViT-B-32__openai__textual", "nonsense", "a__b__c"):
        assert gpu_kind(name) is None


def parse_config(text: str):
    """Triton's own ModelConfig schema: configs compare as messages, not as text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_models_that_do_not_fit_together_are_refused() -> None:
    preprocess, model = batched_models()
    wrong_size = dataclasses.replace(preprocess, outputs=(TensorSpec("image", "TYPE_FP32", (3, 256, 256)),))
    with pytest.raises(ValueError, match=r"output 'image' \(TYPE_FP32 \[-1, 3, 256, 256\]\) cannot feed"):
        ensemble_config_pbtxt(CLIP_VISUAL, wrong_size, model)
    wrong_type = dataclasses.replace(preprocess, outputs=(TensorSpec("image", "TYPE_FP16", (3, 224, 224)),))
    with pytest.raises(ValueError, match="cannot feed"):
        ensemble_config_pbtxt(CLIP_VISUAL, wrong_type, model)
    blob = TensorSpec("input.1", "TYPE_FP32", (3, 640, 640))
    with pytest.raises(ValueError, match="has no output 'det_scale'"):
        ensemble_config_pbtxt(
            FACE_DETECTION, dataclasses.replace(preprocess, outputs=(blob,)), dataclasses.replace(model, inputs=(blob,))
        )
    with pytest.raises(ValueError, match="unknown GPU preprocessing kind"):
        ensemble_config_pbtxt("clip_textual", preprocess, model)
    # an unbatched model makes the ensemble unbatched; its dims then carry the batch axis
    image, x = TensorSpec("image", "TYPE_FP32", (1, 3, 224, 224)), TensorSpec("x", "TYPE_FP32", (1, 512))
    unbatched = dataclasses.replace(model, max_batch_size=0, inputs=(image,), outputs=(x,))
    config = parse_config(ensemble_config_pbtxt(CLIP_VISUAL, preprocess, unbatched))
    assert config.max_batch_size == 0
    encoded = parse_config('input [ { name: "encoded" data_type: TYPE_UINT8 dims: [ -1, -1 ] } ]').input
    assert list(config.input) == list(encoded)
    # the CLIP output is "embedding" whatever the model calls it
    embedding = parse_config('output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 1, 512 ] } ]').output
    assert list(config.output) == list(embedding)
    assert dict(config.ensemble_scheduling.step[1].output_map) == {"x": "embedding"}


def test_build_gpu_repository_passes_its_arguments_to_the_builders(cache: Path, tmp_path: Path) -> None:
    """The orchestration with the stand-in writers (real files, recorded calls)."""
    calls: dict[str, list] = {"engines": [], "preprocess": []}

    def engines(settings, repository, **kwargs):
        calls["engines"].append((settings.engines_dir, settings.preprocess, repository, kwargs))
        return build_repository(settings, repository, kwargs["only"])

    def preprocess(folder, kind, params, max_batch_size, device_ids):
        calls["preprocess"].append((folder.name, kind, params, max_batch_size, device_ids))
        return write_standin_preprocess(folder, kind, params, max_batch_size)

    settings = offline_settings(cache, preprocess="gpu")  # models' specs never depend on it
    written = build_gpu_repository(settings, tmp_path, only=[CLIP, OCR, "ocr__PP-OCRv5_mobile__recognition"],
                                   precision="fp32", gpus=["0", "1"], force=True,
                                   build_engines=engines, write_preprocess=preprocess)  # fmt: skip
    assert written.models == [CLIP, OCR, "ocr__PP-OCRv5_mobile__recognition"]  # what the builder returned
    assert written.preprocess == [f"{CLIP}__preprocess", f"{OCR}__preprocess", f"{OCR_REC}__preprocess"]
    assert written.ensembles == [f"{CLIP}__ensemble", f"{OCR}__ensemble", f"{OCR_REC}__ensemble"]
    only = [CLIP, OCR, "ocr__PP-OCRv5_mobile__recognition"]
    assert calls["engines"] == [
        (tmp_path, "gpu", tmp_path, {"only": only, "precision": "fp32", "gpus": ["0", "1"], "force": True})
    ]
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    (clip_call, ocr_call, rec_call) = calls["preprocess"]
    assert clip_call[:2] == (f"{CLIP}__preprocess", CLIP_VISUAL) and clip_call[2]["size"] == 224
    assert np.allclose(clip_call[2]["mean"], mean) and np.allclose(clip_call[2]["std"], std)
    assert clip_call[3:] == (PREPROCESS_MAX_BATCH_SIZE, (0, 1))  # the CLIP model is unbatched; the GPU ids
    assert ocr_call == (f"{OCR}__preprocess", OCR_DETECTION, {}, PREPROCESS_MAX_BATCH_SIZE, (0, 1))
    assert rec_call == (f"{OCR_REC}__preprocess", OCR_RECOGNITION, {}, PREPROCESS_MAX_BATCH_SIZE, (0, 1))
    assert read_model_io(tmp_path / f"{OCR}__ensemble").max_batch_size == 4  # the detector's
    assert not (tmp_path / f"{FACE}__ensemble").exists()


def test_a_failed_engine_skips_only_its_own_kind(cache: Path, tmp_path: Path, caplog) -> None:
    """A model whose engine failed has no config.pbtxt: its preprocessing, unbatched copy
    and ensemble are not written, and every other kind's are."""
    failed = {ARCFACE, OCR}

    def engines(settings, repository, **kwargs):
        written = write_standin_models(settings, repository, only=kwargs["only"])
        for name in failed:
            shutil.rmtree(repository / name)  # as the TensorRT builder leaves a failed model
        return written

    with caplog.at_level(logging.ERROR):
        written = build_gpu_repository(offline_settings(cache), tmp_path, build_engines=engines,
                                       write_preprocess=write_standin_preprocess)  # fmt: skip
    assert written.skipped == sorted(failed)
    expected = [b for b in GPU_BASES if b not in failed]
    assert written.preprocess == [gpu_path_names(b).preprocess for b in expected]
    assert written.ensembles == [gpu_path_names(b).ensemble for b in expected]
    for base in failed:
        names = gpu_path_names(base)
        assert not any((tmp_path / n).exists() for n in names[1:])  # (the base keeps its derived ONNX copy)
        assert f"{base}: no model was built" in caplog.text
    assert (tmp_path / gpu_path_names(OCR_REC).ensemble / "config.pbtxt").is_file()  # OCR recognition still wired


def test_det_scale_comes_back_exactly_from_its_float32() -> None:
    """The ensemble's det_scale is float32; the server recovers letterbox's float64
    ``new_height / height`` exactly, so boxes and landmarks divide by the CPU path's number."""
    from immich_trt.tools.gpu.ensemble import exact_det_scale

    inexact = 0
    for height in range(1, 9000, 7):
        for new_height in {1, height // 3 + 1, 480, 640} - {0}:
            exact = new_height / height
            assert exact_det_scale(np.array([[exact]], np.float32), height) == exact
            inexact += float(np.float32(exact)) != exact
    assert inexact > 1000  # float32 alone would not do


def test_gpu_mode_needs_a_full_triton(gpu_settings, tmp_path) -> None:
    check_gpu_settings(gpu_settings)
    check_gpu_settings(dataclasses.replace(gpu_settings, triton_url=None, triton_server=tmp_path))
    check_gpu_settings(dataclasses.replace(gpu_settings, preprocess="cpu", runtime="onnxruntime", triton_url=None))
    with pytest.raises(ValueError, match="IMMICH_TRT_PREPROCESS=gpu needs IMMICH_TRT_RUNTIME=triton"):
        check_gpu_settings(dataclasses.replace(gpu_settings, runtime="onnxruntime"))
    with pytest.raises(ValueError, match="IMMICH_TRT_TRITON_SERVER=/opt/tritonserver .* or TRITON_URL"):
        check_gpu_settings(dataclasses.replace(gpu_settings, triton_url=None))


def test_serve_refuses_gpu_mode_without_a_full_triton_at_start(tmp_path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "IMMICH_TRT_PREPROCESS": "gpu", "MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path)}
    env.pop("TRITON_URL", None)
    env.pop("IMMICH_TRT_TRITON_SERVER", None)
    done = subprocess.run([sys.executable, "-m", "immich_trt", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "IMMICH_TRT_TRITON_SERVER" in done.stderr and "Traceback" not in done.stderr


async def test_gpu_mode_with_onnxruntime_fails_the_load_with_the_reason(aiohttp_client, gpu_settings, caplog) -> None:
    settings = dataclasses.replace(gpu_settings, runtime="onnxruntime", triton_url=None)
    client = await aiohttp_client(create_app(settings))
    with caplog.at_level(logging.ERROR):
        resp = await client.post("/predict", data=form(clip_visual_entries(), squares_png()))
    assert resp.status == 500
    assert await resp.json() == {"detail": "Failed to load model 'ViT-B-32__openai'"}
    assert "IMMICH_TRT_PREPROCESS=gpu needs IMMICH_TRT_RUNTIME=triton" in caplog.text


# ------------------------------------------------------------------- ensembles directly


async def test_loading_an_ensemble_loads_its_composing_models(gpu_settings, triton, client_stats) -> None:
    names = gpu_path_names(CLIP)
    composed = names[:3]  # a detector's ensemble holds the model itself
    for name in composed[::-1]:
        await client_stats.unload_model(name)
    for _ in range(100):  # an unload completes in the background
        if not any([await client_stats.is_model_ready(n) for n in composed]):
            break
        await asyncio.sleep(0.05)
    assert [await client_stats.is_model_ready(n) for n in composed] == [False, False, False]
    runtime = TritonRuntime(gpu_settings)
    await runtime.start()
    try:
        model = ClipVisualEncoder("ViT-B-32__openai", ModelContext(gpu_settings, with_ensembles(runtime, gpu_settings)))
        assert [spec.name for spec in model.specs()] == [names.base]  # the runtime loads the ensemble
        await model.load()
    finally:
        await runtime.stop()
    assert [await client_stats.is_model_ready(n) for n in composed] == [True, True, True]


@requires_data
async def test_clip_and_face_ensembles_equal_the_direct_model_call(runtime, gpu_settings) -> None:
    clip = ClipVisualEncoder("ViT-B-32__openai", ModelContext(gpu_settings, with_ensembles(runtime, gpu_settings)))
    clip.prepare_files()
    face = FaceDetector("buffalo_l", ModelContext(gpu_settings, with_ensembles(runtime, gpu_settings)))
    face.prepare_files()
    faces_seen = 0
    for data in [(PHOTOS / name).read_bytes() for name in PHOTO_SUBSET] + [squares_png()]:
        encoded = {ENCODED_INPUT: np.frombuffer(data, np.uint8)[None]}
        image = decode_pil(data)
        # CLIP: bytes -> ensemble vs CPU preprocessing -> model
        ens = await runtime.infer(gpu_path_names(CLIP).ensemble, encoded)
        ref = await runtime.infer(CLIP, {"image": clip_preprocess(image, clip.size, clip.mean, clip.std)})
        assert list(ens) == [CLIP_EMBEDDING] and ens[CLIP_EMBEDDING].shape == (1, 512)
        assert cosine(ens[CLIP_EMBEDDING], ref["embedding"]) >= 0.995
        np.testing.assert_array_equal(ens[CLIP_EMBEDDING], ref["embedding"])
        # faces: the 9 SCRFD outputs and det_scale, then the same postprocess
        ens = await runtime.infer(gpu_path_names(FACE).ensemble, encoded)
        canvas, det_scale = letterbox(to_bgr(image))
        ref = await runtime.infer(FACE, {"input.1": detection_blob(canvas)})
        assert sorted(ens) == sorted([*face.layout.output_names, DET_SCALE_OUTPUT])
        for name in face.layout.output_names:
            np.testing.assert_array_equal(ens[name], ref[name])
        assert ens[DET_SCALE_OUTPUT].shape == (1, 1) and ens[DET_SCALE_OUTPUT][0, 0] == np.float32(det_scale)
        layout: ScrfdLayout = face.layout
        boxes = [scrfd_postprocess([out[n] for n in layout.output_names], layout, (640, 640), s, 0.7)["boxes"]
                 for out, s in ((ens, float(ens[DET_SCALE_OUTPUT][0, 0])), (ref, det_scale))]  # fmt: skip
        assert boxes[0].shape == boxes[1].shape and np.abs(boxes[0] - boxes[1]).max(initial=0) <= 2
        faces_seen += len(boxes[1])
    assert faces_seen >= 2  # at least the two squares: the box comparison compared something


@requires_data
@pytest.mark.parametrize("buckets", [False, True], ids=["exact-size", "shape-buckets"])
async def test_ocr_detection_ensemble_equals_the_direct_model_call(runtime, gpu_settings, buckets) -> None:
    from immich_trt.models.ocr import detection_sizes as ocr_detection_inputs

    padded = 0
    for path in sorted(OCR_IMAGES.glob("*"))[:8]:
        data = path.read_bytes()
        image = decode_pil(data)
        if min(image.size) < 32:
            continue  # answered empty before any model
        pixels = det_resize(image, 736)
        sizes = ocr_detection_inputs(pixels.shape[1:3], buckets)
        assert tuple(sizes[RESIZE_HW][0]) == pixels.shape[1:3]
        if buckets:
            pixels = pad_to_bucket(pixels)
        assert tuple(sizes[BUCKET_HW][0]) == pixels.shape[1:3]
        padded += tuple(sizes[RESIZE_HW][0]) != tuple(sizes[BUCKET_HW][0])
        feed = {ENCODED_INPUT: np.frombuffer(data, np.uint8)[None], **sizes}
        ens = await runtime.infer(gpu_path_names(OCR).ensemble, feed)
        ref = await runtime.infer(OCR, {DET_INPUT_U8: pixels})
        assert list(ens) == list(ref)
        np.testing.assert_array_equal(next(iter(ens.values())), next(iter(ref.values())))
    assert (padded > 0) == buckets


async def test_images_without_usable_encoded_bytes_take_the_cpu_path(
    runtime, gpu_settings, cpu_settings, client_stats
) -> None:
    """No ``info[ENCODED]``, bytes of another size (a resized copy keeps PIL's info) or
    of a format DALI does not decode as Pillow: the CPU preprocessing and ``<base>``
    directly, with the CPU path's result."""
    data = squares_png()
    decoded = decode_pil(data)
    assert encoded_bytes(decoded) == data
    bare = Image.open(io.BytesIO(data)).convert("RGB")
    resized = decoded.resize((640, 480))
    tiff = io.BytesIO()
    bare.save(tiff, format="TIFF")
    not_for_dali = decode_pil(tiff.getvalue())  # decoded by Pillow, not by the DALI pipelines
    assert encoded_bytes(bare) is None and encoded_bytes(resized) is None and encoded_bytes(not_for_dali) is None
    models = ((ClipVisualEncoder, "ViT-B-32__openai", CLIP), (FaceDetector, "buffalo_l", FACE),
              (TextDetector, "PP-OCRv5_mobile", OCR))  # fmt: skip
    for cls, name, base in models:
        gpu_model = cls(name, ModelContext(gpu_settings, with_ensembles(runtime, gpu_settings)))
        cpu_model = cls(name, ModelContext(cpu_settings, runtime))
        for model in (gpu_model, cpu_model):
            model.prepare_files()
        ensemble_before = await success_count(client_stats, f"{base}__ensemble")
        base_before = await success_count(client_stats, base)
        for image in (bare, resized, not_for_dali):
            got, want = await gpu_model.predict(image), await cpu_model.predict(image)
            assert type(got) is type(want)
            if isinstance(got, dict):
                assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
            else:
                assert got == want
        assert await success_count(client_stats, base, base_before + 6) == base_before + 6
        assert await success_count(client_stats, f"{base}__ensemble") == ensemble_before
        await gpu_model.predict(decoded)  # with its bytes: through the ensemble
        assert await success_count(client_stats, f"{base}__ensemble", ensemble_before + 1) == ensemble_before + 1


async def test_an_image_the_ensemble_refuses_takes_the_cpu_path(runtime, caplog) -> None:
    """An :class:`InferenceError` of the ensemble (here the stand-in refusing a bucket
    smaller than the image) is logged and answered ``None``: the caller's CPU path runs."""
    from immich_trt.runtime.ensemble import infer_ensemble

    sizes = {RESIZE_HW: np.array([[512, 512]], np.int32), BUCKET_HW: np.array([[256, 256]], np.int32)}
    with caplog.at_level(logging.WARNING):
        assert await infer_ensemble(runtime, OCR, squares_png(), sizes, image_size=(1280, 960)) is None
    assert f"Triton failed on '{OCR}__ensemble'" in caplog.text and "cannot hold a 512x512" in caplog.text
    assert "preprocessing this 1280x960 image on the CPU instead" in caplog.text


# --------------------------------------------------------------------- server end to end


def form(entries: dict, image: bytes):
    import aiohttp

    data = aiohttp.FormData()
    data.add_field("entries", json.dumps(entries))
    data.add_field("image", image, filename="blob", content_type="application/octet-stream")
    return data


@pytest.fixture
async def apps(aiohttp_client, gpu_settings, cpu_settings):
    """(gpu, cpu) in-process servers on the module's Triton."""
    return await aiohttp_client(create_app(gpu_settings)), await aiohttp_client(create_app(cpu_settings))


async def predict_both(apps, entries: dict, data: bytes) -> tuple[dict, dict]:
    bodies = []
    for client in apps:
        resp = await client.post("/predict", data=form(entries, data))
        assert resp.status == 200, await resp.text()
        bodies.append(await resp.json())
    return bodies[0], bodies[1]


@requires_data
async def test_server_clip_and_faces_gpu_path_match_the_cpu_path(apps, client_stats) -> None:
    entries = {**clip_visual_entries(), **face_entries("buffalo_l")}
    faces_seen = 0
    images = [path.read_bytes() for path in decodable_photos()] + [squares_png()]
    before = [await success_count(client_stats, f"{base}__ensemble") for base in (CLIP, FACE)]
    for data in images:
        gpu, cpu = await predict_both(apps, entries, data)
        assert gpu.keys() == cpu.keys() == {"clip", "facial-recognition", "imageHeight", "imageWidth"}
        assert (gpu["imageHeight"], gpu["imageWidth"]) == (cpu["imageHeight"], cpu["imageWidth"])
        assert isinstance(gpu["clip"], str) and cosine(json.loads(gpu["clip"]), json.loads(cpu["clip"])) >= 0.995
        assert gpu["clip"] == cpu["clip"]  # the stand-ins are the reference: exact
        assert len(gpu["facial-recognition"]) == len(cpu["facial-recognition"])
        for g, c in zip(gpu["facial-recognition"], cpu["facial-recognition"]):
            assert g.keys() == c.keys() == {"boundingBox", "embedding", "score"}
            assert max(abs(g["boundingBox"][k] - c["boundingBox"][k]) for k in ("x1", "y1", "x2", "y2")) <= 2
            assert cosine(json.loads(g["embedding"]), json.loads(c["embedding"])) >= 0.995
            assert g == c
        faces_seen += len(cpu["facial-recognition"])
    assert faces_seen >= 2
    # the gpu server went through the ensembles once per image and model, but for the
    # formats DALI does not decode as Pillow (the AVIF photo here)
    through_dali = sum(image_format(data) is not None for data in images)
    for base, count in zip((CLIP, FACE), before):
        assert await success_count(client_stats, f"{base}__ensemble", count + through_dali) == count + through_dali


@requires_data
async def test_server_ocr_texts_are_identical_on_every_ocr_image(apps, client_stats) -> None:
    texts_seen = 0
    paths = sorted(OCR_IMAGES.glob("*"))
    before = await success_count(client_stats, f"{OCR}__ensemble")
    for path in paths:
        gpu, cpu = await predict_both(apps, ocr_entries(), path.read_bytes())
        assert gpu.keys() == cpu.keys() == {"ocr", "imageHeight", "imageWidth"}
        assert gpu["ocr"]["text"] == cpu["ocr"]["text"], path.name
        assert gpu == cpu, path.name
        texts_seen += len(cpu["ocr"]["text"])
    assert texts_seen >= 20
    # every RGB or greyscale image of 32 px or more on both sides went through the ensemble
    large = 0
    for path in paths:
        with Image.open(path) as image:
            large += min(image.size) >= 32 and image.mode in ("RGB", "L") and image_format(path.read_bytes()) is not None
    assert await success_count(client_stats, f"{OCR}__ensemble", before + large) - before == large


async def test_an_ensemble_missing_a_composing_model_fails_to_load_and_the_server_stays_up(apps, caplog) -> None:
    gpu, _ = apps
    with caplog.at_level(logging.ERROR):
        resp = await gpu.post("/predict", data=form(face_entries("buffalo_s"), squares_png()))
    assert resp.status == 500
    assert await resp.json() == {"detail": "Failed to load model 'buffalo_s'"}
    assert f"contains models that are not available or ambiguous: {BROKEN_FACE}__preprocess" in caplog.text
    assert (await gpu.get("/ping")).status == 200
    resp = await gpu.post("/predict", data=form(face_entries("buffalo_l"), squares_png()))
    assert resp.status == 200 and len((await resp.json())["facial-recognition"]) == 2


async def test_gpu_mode_through_a_launched_full_triton_never_rewrites_the_repository(
    aiohttp_client, cache: Path, tmp_path: Path, cpu_settings
) -> None:
    """The GPU image's set-up: no TRITON_URL; ``IMMICH_TRT_TRITON_SERVER`` makes the server
    launch the full installation over the prebuilt repository (``build-engines --target
    standin`` here, the tensorrt layout). Every model loads by name, nothing under the
    repository is rewritten, and the answers equal the CPU path's."""
    from immich_trt.cli import main
    from immich_trt.tools.testing import triton_installation_from_wheel

    repo = tmp_path / "engines"
    env = {"MACHINE_LEARNING_CACHE_FOLDER": str(cache), "IMMICH_TRT_ENGINES_DIR": str(repo)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["build-engines", "--target", "standin"]) == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    before = {p: p.read_bytes() for p in repo.rglob("config.pbtxt")}
    assert any("__ensemble" in str(p) for p in before)
    settings = dataclasses.replace(
        cpu_settings, preprocess="gpu", triton_url=None, engines_dir=repo,
        triton_server=triton_installation_from_wheel(tmp_path / "tritonserver"),
    )  # fmt: skip
    gpu = await aiohttp_client(create_app(settings))
    cpu = await aiohttp_client(create_app(cpu_settings))
    image = squares_png()
    for entries in (clip_visual_entries(), face_entries()):
        answers = []
        for client in (gpu, cpu):
            resp = await client.post("/predict", data=form(entries, image))
            assert resp.status == 200, await resp.text()
            answers.append(await resp.json())
        assert answers[0] == answers[1]
    launcher = gpu.app[STATE].runtime.launcher
    async with aiohttp.ClientSession() as session:
        for name in ("clip__ViT-B-32__openai__visual__ensemble", "facial-recognition__buffalo_l__detection__ensemble"):
            async with session.get(f"http://{launcher.http_url}/v2/models/{name}/stats") as r:
                stats = (await r.json())["model_stats"][0]
            assert stats["inference_stats"]["success"]["count"] == 1, name  # really the GPU path
    after = {p: p.read_bytes() for p in repo.rglob("config.pbtxt")}
    assert after == before


def test_only_rgb_and_greyscale_images_keep_their_bytes_for_the_gpu_path() -> None:
    """CMYK, palette, alpha and 16-bit images keep the CPU path: a GPU decoder's colour
    conversion need not match Pillow's ``convert("RGB")``."""
    base = Image.new("RGB", (40, 30), (200, 100, 50))
    cases = {"RGB": ("JPEG", True), "L": ("JPEG", True), "CMYK": ("JPEG", False), "P": ("PNG", False),
             "RGBA": ("PNG", False), "I;16": ("PNG", False)}  # fmt: skip
    for mode, (fmt, kept) in cases.items():
        buffer = io.BytesIO()
        (base.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 1000)).save(buffer, format=fmt)
        image = decode_pil(buffer.getvalue())
        assert image.mode == "RGB"
        assert (encoded_bytes(image) is not None) is kept, mode


# ------------------------------------------------------- decodes on the CPU (GPU mode)
# (counted by conftest's ``decodes`` fixture)


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


@requires_data
async def test_gpu_mode_never_decodes_on_the_cpu_when_every_model_runs_behind_an_ensemble(
    apps, decodes, client_stats
) -> None:
    """CLIP, faces (detection and recognition) and OCR (detection and recognition): the
    image reaches the server's models as its header only; the answers are the CPU
    server's (which decodes once, as before)."""
    photo = (PHOTOS / "portrait.jpg").read_bytes()
    text = (OCR_IMAGES / "en.jpg").read_bytes()
    faces = _jpeg(Image.open(io.BytesIO(squares_png())))
    cases = [(clip_visual_entries(), photo), (face_entries("buffalo_l"), faces), (ocr_entries(), text),
             ({**clip_visual_entries(), **face_entries("buffalo_l"), **ocr_entries()}, faces)]  # fmt: skip
    await predict_both(apps, {**face_entries("buffalo_l"), **ocr_entries()}, faces)  # load every model
    before = {b: await success_count(client_stats, gpu_path_names(b).ensemble) for b in (ARCFACE, OCR_REC)}
    for entries, data in cases:
        decodes.clear()
        gpu, cpu = await predict_both(apps, entries, data)
        assert decodes == [len(data)], "the CPU server decodes once"  # predict_both asks the GPU server first
        assert gpu == cpu
    face_answers = (await predict_both(apps, face_entries("buffalo_l"), faces))[0]["facial-recognition"]
    assert len(face_answers) == 2  # the recognizer really ran (two squares)
    # the recognizers ran through their ensembles: faces twice, lines at least twice
    assert await success_count(client_stats, gpu_path_names(ARCFACE).ensemble, before[ARCFACE] + 3) >= before[ARCFACE] + 3
    assert await success_count(client_stats, gpu_path_names(OCR_REC).ensemble, before[OCR_REC] + 1) > before[OCR_REC]


@pytest.mark.parametrize("case", ["tiff", "cmyk", "palette", "ensemble-refuses"])
async def test_gpu_mode_decodes_exactly_once_when_a_cpu_step_needs_pixels(
    apps, decodes, runtime, monkeypatch, case: str
) -> None:
    """A format DALI does not take (TIFF), a non-RGB source (CMYK JPEG, palette PNG) or
    every ensemble refusing (the CPU fallback of all five models): one decode for the
    whole request (CLIP, faces and OCR), and the CPU server's answer."""
    from immich_trt.runtime.base import InferenceError
    from immich_trt.runtime.triton import TritonRuntime as Triton

    base = Image.open(io.BytesIO(squares_png())).convert("RGB")
    data = {
        "tiff": lambda: _encode(base, "TIFF"),
        "cmyk": lambda: _jpeg(base.convert("CMYK")),
        "palette": lambda: _encode(base.convert("P"), "PNG"),
        "ensemble-refuses": lambda: _jpeg(base),
    }[case]()
    if case == "ensemble-refuses":
        real_infer = Triton.infer

        async def refusing(self, name, inputs, outputs=None):
            if name.endswith("__ensemble"):
                raise InferenceError(f"Triton failed on '{name}': refused by the test")
            return await real_infer(self, name, inputs, outputs)

        monkeypatch.setattr(Triton, "infer", refusing)
    entries = {**clip_visual_entries(), **face_entries("buffalo_l"), **ocr_entries()}
    gpu_client, cpu_client = apps
    decodes.clear()
    resp = await gpu_client.post("/predict", data=form(entries, data))
    assert resp.status == 200, await resp.text()
    assert decodes == [len(data)]
    gpu = await resp.json()
    cpu = await (await cpu_client.post("/predict", data=form(entries, data))).json()
    assert gpu == cpu and len(gpu["facial-recognition"]) == 2


async def test_gpu_mode_answers_pixels_pillow_cannot_decode_as_the_cpu_path_does(apps, decodes) -> None:
    """A valid header with truncated pixels: the stand-in ensemble refuses the bytes, the
    CPU fallback's decode fails: the plain 500 of the CPU path, the server stays up."""
    data = _jpeg(Image.open(io.BytesIO(squares_png())).convert("RGB"))
    truncated = data[: len(data) // 3]
    for client in apps:
        resp = await client.post("/predict", data=form(clip_visual_entries(), truncated))
        assert resp.status == 500 and await resp.text() == "Internal Server Error"
        assert (await client.get("/ping")).status == 200


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


async def test_batches_falling_back_together_load_the_base_once(tmp_path: Path) -> None:
    """A recognizer's batches are issued together (OCR lines); when its ensemble refuses
    them all, the base model for the CPU fallback is loaded once, not once per batch."""
    from immich_trt.runtime.base import Runtime

    class Recording(Runtime):
        def __init__(self) -> None:
            self.loads: list[str] = []

        async def load(self, spec: ModelSpec) -> None:
            await asyncio.sleep(0.01)  # a load takes a while: the other batches arrive meanwhile
            self.loads.append(spec.name)

        async def unload(self, name: str) -> None:
            return None

        async def infer(self, name, inputs, outputs=None):
            return {"y": np.asarray(inputs["x"]) + 1}

    settings = offline_settings(tmp_path, triton_url="localhost:1", preprocess="gpu")
    inner = Recording()
    runtime = with_ensembles(inner, settings)
    await runtime.load(ModelSpec("ocr_rec", tmp_path / "model.onnx", from_encoded_image=True))

    async def preprocess(i: int):
        return {"x": np.array([i])}

    outs = await asyncio.gather(
        *(runtime.infer_image("ocr_rec", None, lambda i=i: preprocess(i)) for i in range(4))
    )
    assert [int(out["y"][0]) for out in outs] == [1, 2, 3, 4]
    assert inner.loads == [gpu_path_names("ocr_rec").ensemble, "ocr_rec"]
