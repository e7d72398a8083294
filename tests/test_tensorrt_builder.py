"""The TensorRT engine builder: optimization profiles, profile selection, cache keys,
``config.pbtxt``, the build loop and ``build-engines --target tensorrt``.

Real ONNX files throughout (the ``model_cache`` fixture: PP-OCRv5 mobile and the test
pack). TensorRT itself cannot be installed here, so the build loop runs with a recording
builder passed as ``builder=`` (the one substitution); ``build_engine`` itself runs
against TensorRT-RTX when it is importable (it builds engines without a GPU).

Golden configs live in ``tests/golden/tensorrt/<model>.pbtxt``. After an intended change,
regenerate them and review the diff::

    IMMICH_TRT_UPDATE_GOLDEN=1 python -m pytest tests/test_tensorrt_builder.py -k golden
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from conftest import GOLDEN
from immich_trt.cli import main
from immich_trt.config import Settings
from immich_trt.models.ocr import DET_BUCKETS, REC_WIDTH_BUCKETS, bucket, det_resize_shape, rec_input_width
from immich_trt.runtime.base import ModelSpec
from immich_trt.runtime.repository import config_pbtxt, onnx_io
from immich_trt.tools.engines import cached_specs
from immich_trt.tools.gpu.tensorrt import (
    BUILD_INFO_NAME,
    PLAN_NAME,
    TIMING_CACHE_NAME,
    EngineBuildError,
    Int8CalibrationError,
    NoGPUError,
    Profile,
    ProfileShape,
    TensorRTUnavailableError,
    build_engine,
    build_tensorrt_models,
    cache_key,
    engine_layout,
    gpu_names,
    has_qdq,
    model_family,
    parse_device_ids,
    parse_gpu_query,
    select_profile,
    summary_table,
    tensorrt_config_pbtxt,
)
from immich_trt.tools.testing import UNREACHABLE, offline_settings

GOLDEN_TRT = GOLDEN / "tensorrt"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

CLIP_VISUAL = "clip__ViT-B-32__openai__visual"
CLIP_TEXTUAL = "clip__ViT-B-32__openai__textual"
SCRFD = "facial-recognition__buffalo_l__detection"
ARCFACE = "facial-recognition__buffalo_l__recognition"
OCR_DET = "ocr__PP-OCRv5_mobile__detection"
OCR_REC = "ocr__PP-OCRv5_mobile__recognition"
ALL_MODELS = [CLIP_TEXTUAL, CLIP_VISUAL, SCRFD, ARCFACE, OCR_DET, OCR_REC]


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Triton's own ModelConfig schema: an unknown field fails the parse."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def settings(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return offline_settings(model_cache, engines_dir=tmp_path_factory.mktemp("trt-layouts"))


@pytest.fixture(scope="module")
def specs(settings: Settings) -> dict[str, ModelSpec]:
    return {spec.name: spec for spec in cached_specs(settings)}


@pytest.fixture(scope="module")
def layouts(settings: Settings, specs: dict[str, ModelSpec]):
    return {name: engine_layout(spec, settings) for name, spec in specs.items()}


class RecordingBuilder:
    """Stands in for TensorRT in the build loop: returns bytes derived from what it is
    given and records every call; ``names`` maps served ONNX paths to model names."""

    def __init__(
        self, names: dict[Path, str], tensorrt_version: str = "10.9.0.34", gpu_name: str = "NVIDIA H100 80GB HBM3"
    ) -> None:
        self.names = names
        self.tensorrt_version = tensorrt_version
        self.gpu_name = gpu_name
        self.calls: list[dict] = []

    def build(self, onnx_path, profiles, precision, timing_cache_path, workspace_bytes) -> bytes:
        self.calls.append(
            {
                "name": self.names[Path(onnx_path)],
                "onnx": Path(onnx_path),
                "profiles": tuple(profiles),
                "precision": precision,
                "timing_cache": Path(timing_cache_path),
            }
        )
        payload = {"onnx": Path(onnx_path).name, "precision": precision, "profiles": [p.as_json() for p in profiles]}
        return json.dumps(payload).encode() + Path(onnx_path).read_bytes()[:64]

    def built(self) -> list[str]:
        """Names built since the last call, sorted."""
        names = sorted(call["name"] for call in self.calls)
        self.calls.clear()
        return names


def served_files(settings: Settings, repo: Path) -> dict[Path, str]:
    """Served ONNX path -> model name (derived copies written into ``repo``)."""
    return {spec.onnx_path: spec.name for spec in cached_specs(dataclasses.replace(settings, engines_dir=repo))}


# --------------------------------------------------------------------------- golden configs


@pytest.mark.parametrize("name", ALL_MODELS)
def test_golden_config(layouts, name: str) -> None:
    text = tensorrt_config_pbtxt(layouts[name], ["0"])
    golden = GOLDEN_TRT / f"{name}.pbtxt"
    if os.environ.get("IMMICH_TRT_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
    config = parse_config(text)
    assert config.platform == "tensorrt_plan" and config.name == name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_keeps_the_cpu_targets_tensor_contract(settings, specs, layouts, name: str) -> None:
    spec = specs[name]
    inputs, outputs = onnx_io(spec.onnx_path)
    cpu = parse_config(config_pbtxt(spec, inputs, outputs, settings))
    gpu = parse_config(tensorrt_config_pbtxt(layouts[name], ["0"]))
    assert gpu.name == cpu.name

    def full(config, tensor) -> list[int]:
        return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)

    for kind in ("input", "output"):
        cpu_tensors, gpu_tensors = getattr(cpu, kind), getattr(gpu, kind)
        assert [(t.name, t.data_type) for t in gpu_tensors] == [(t.name, t.data_type) for t in cpu_tensors]
        for c, g in zip(cpu_tensors, gpu_tensors):
            # the same full shape past the batch axis (a batch axis of 1 in the file
            # becomes Triton's batch axis where the engine takes one)
            assert full(cpu, c)[1:] == full(gpu, g)[1:], (c.name, list(c.dims), list(g.dims))
    assert [list(g.gpus) for g in gpu.instance_group] == [[0]]
    assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and g.count == 1 for g in gpu.instance_group)


# --------------------------------------------------------------------------- profiles per family


def shapes(profile: Profile, name: str) -> tuple:
    s = profile[name]
    return s.min, s.opt, s.max


def test_profiles_of_the_fixed_shape_models(layouts) -> None:
    visual = layouts[CLIP_VISUAL]
    assert visual.family == "clip-visual" and visual.max_batch_size == 1  # Immich's export: static batch 1
    assert [shapes(p, "image") for p in visual.profiles] == [((1, 3, 224, 224),) * 3]
    textual = layouts[CLIP_TEXTUAL]
    assert textual.max_batch_size == 1 and [shapes(p, "text") for p in textual.profiles] == [((1, 77),) * 3]
    scrfd = layouts[SCRFD]  # [N, C] outputs: no batch axis for Triton
    assert scrfd.family == "scrfd" and scrfd.max_batch_size == 0
    assert [shapes(p, "input.1") for p in scrfd.profiles] == [((1, 3, 640, 640),) * 3]
    arcface = layouts[ARCFACE]
    assert arcface.max_batch_size == 64 and arcface.preferred_batch_size == (8,)
    assert [shapes(p, "input.1") for p in arcface.profiles] == [((1, 3, 112, 112), (8, 3, 112, 112), (64, 3, 112, 112))]


def test_ocr_detection_profiles_follow_the_side_buckets(layouts) -> None:
    det = layouts[OCR_DET]
    # batch 1: each of the 9 contexts holds one image (the CPU target batches 4)
    assert det.family == "ocr-detection" and det.max_batch_size == 1
    assert len(det.profiles) == len(DET_BUCKETS) + 2
    for profile, side in zip(det.profiles, DET_BUCKETS):
        assert shapes(profile, "image_u8") == ((1, 32, 32, 3), (1, side, side, 3), (1, side, side, 3))
    wide, tall = det.profiles[-2:]
    assert shapes(wide, "image_u8") == ((1, 32, 2080, 3), (1, 768, 2560, 3), (1, 1024, 4096, 3))
    assert shapes(tall, "image_u8") == ((1, 2080, 32, 3), (1, 2560, 768, 3), (1, 4096, 1024, 3))
    assert det.preferred_batch_size == () and det.max_queue_delay_us == 0


def test_ocr_recognition_profiles_follow_the_width_buckets(settings, specs, layouts) -> None:
    rec = layouts[OCR_REC]
    assert rec.max_batch_size == max(8, settings.max_batch_size_ocr) == 8
    assert len(rec.profiles) == len(REC_WIDTH_BUCKETS) + 1
    low = 320
    for profile, width in zip(rec.profiles, REC_WIDTH_BUCKETS):
        assert shapes(profile, "x") == ((1, 3, 48, low), (6, 3, 48, width), (8, 3, 48, width))
        low = width + 1
    assert shapes(rec.profiles[-1], "x") == ((1, 3, 48, 2561), (6, 3, 48, 3200), (8, 3, 48, 5120))
    assert rec.preferred_batch_size == (6,) and rec.max_queue_delay_us == 1000
    # MAX_BATCH_SIZE__OCR=10: the server sends 10 lines, the engine batches up to 10
    bigger = dataclasses.replace(settings, max_batch_size_ocr=10)
    spec = dataclasses.replace(specs[OCR_REC], max_batch_size=10)
    rec10 = engine_layout(spec, bigger)
    assert rec10.profiles[0]["x"].opt[0] == rec10.profiles[0]["x"].max[0] == 10
    assert rec10.preferred_batch_size == ()  # the opt batch is the maximum: a full batch goes at once anyway


def test_batch_axis_follows_the_graph(settings, specs, tmp_path: Path) -> None:
    from immich_trt.tools.testpack import make_test_pack

    # SCRFD with [1, N, C] outputs: Triton batch axis, one image per run
    make_test_pack(tmp_path / "cache", clip_models=(), batched_detector=True)
    batched = offline_settings(tmp_path / "cache", engines_dir=tmp_path / "engines")
    detector = {s.name: s for s in cached_specs(batched)}[SCRFD]
    layout = engine_layout(detector, batched)
    assert layout.max_batch_size == 1 and layout.profiles[0]["input.1"].max == (1, 3, 640, 640)
    # MAX_BATCH_SIZE__FACIAL_RECOGNITION=1: the CPU target serves unbatched, the engine batch is 1
    one = dataclasses.replace(specs[ARCFACE], max_batch_size=0)
    layout = engine_layout(one, settings)
    assert layout.max_batch_size == 1 and layout.profiles[0]["input.1"].max == (1, 3, 112, 112)
    assert "dynamic_batching" not in tensorrt_config_pbtxt(layout, ["0"])


def test_mclip_textual_inputs_take_the_context_length(settings, tmp_path: Path) -> None:
    folder = tmp_path / "clip" / "XLM-Roberta-Large-Vit-B-16Plus" / "textual"
    folder.mkdir(parents=True)
    (folder.parent / "config.json").write_text(json.dumps({"text_cfg": {"context_length": 77}}))
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 640])
    node = helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT)
    reduce = helper.make_node("ReduceMean", ["ids_f"], ["m"], keepdims=1, axes=[1])
    expand = helper.make_node("Expand", ["m", "shape"], ["embedding"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 640])
    graph = helper.make_graph([node, reduce, expand], "mclip", inputs, [output], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder / "model.onnx")
    spec = ModelSpec("clip__XLM-Roberta-Large-Vit-B-16Plus__textual", folder / "model.onnx", 0)
    layout = engine_layout(spec, settings)
    assert layout.max_batch_size == 1
    assert [shapes(layout.profiles[0], n) for n in ("input_ids", "attention_mask")] == [((1, 77),) * 3] * 2
    # a symbolic image size with no preprocess_cfg.json cannot be resolved
    visual = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["embedding"])], "v", [visual], [visual])
    path = tmp_path / "visual.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(ValueError, match="symbolic dimension 2"):
        engine_layout(ModelSpec("clip__X__visual", path, 0), settings)


def test_selection_tie_goes_to_the_lowest_index() -> None:
    same = Profile((ProfileShape("x", (1, 4), (2, 4), (4, 4)),))
    nearer = Profile((ProfileShape("x", (1, 4), (3, 4), (4, 4)),))
    assert select_profile([same, same, nearer], {"x": (2, 4)}) == 0
    assert select_profile([same, same, nearer], {"x": (3, 4)}) == 2


def test_model_family_names() -> None:
    assert model_family(OCR_REC) == "ocr-recognition" and model_family(SCRFD) == "scrfd"
    assert model_family("ocr__EN__PP-OCRv5_mobile__recognition") == "ocr-recognition"
    with pytest.raises(ValueError, match="not a <task>__<model>__<type>"):
        model_family("ocr__PP-OCRv5_mobile__classifier")
    with pytest.raises(ValueError):
        ProfileShape("x", (1, 3), (2, 3), (1, 3))  # opt above max


# --------------------------------------------------------------------------- profile selection


def test_detection_bucket_selection_every_shape(layouts) -> None:
    profiles = layouts[OCR_DET].profiles
    # every multiple of 32 up to the ladder's end, batch 1 and 4: the profile of the longer side's bucket
    for h in range(32, DET_BUCKETS[-1] + 1, 32):
        for w in range(32, DET_BUCKETS[-1] + 1, 32):
            expected = DET_BUCKETS.index(bucket(max(h, w), DET_BUCKETS, 512))
            assert select_profile(profiles, {"image_u8": (1, h, w, 3)}) == expected, (h, w)
    for k, side in enumerate(DET_BUCKETS):  # the padded bucket shapes the server sends
        for other in DET_BUCKETS[: k + 1]:
            assert select_profile(profiles, {"image_u8": (1, side, other, 3)}) == k
            assert select_profile(profiles, {"image_u8": (1, other, side, 3)}) == k
    wide, tall = len(DET_BUCKETS), len(DET_BUCKETS) + 1
    assert select_profile(profiles, {"image_u8": (1, 736, 2208, 3)}) == wide
    assert select_profile(profiles, {"image_u8": (1, 768, 2560, 3)}) == wide
    assert select_profile(profiles, {"image_u8": (1, 1024, 4096, 3)}) == wide
    assert select_profile(profiles, {"image_u8": (1, 2560, 768, 3)}) == tall
    for uncovered in [(1, 2080, 2080, 3), (1, 736, 4128, 3), (1, 1056, 2560, 3), (2, 256, 256, 3), (1, 16, 256, 3)]:
        with pytest.raises(ValueError, match="no optimization profile holds image_u8"):
            select_profile(profiles, {"image_u8": uncovered})


def test_detection_profiles_hold_what_the_server_sends(layouts) -> None:
    """Shapes from ``det_resize_shape`` (maxResolution 736), with and without padding to
    the buckets, for photos and panoramas up to 5:1."""
    profiles = layouts[OCR_DET].profiles
    sizes = [(640, 480), (1920, 1080), (4032, 3024), (3024, 4032), (6000, 4000), (800, 800), (33, 33), (100, 3000)]
    sizes += [(int(1000 * r), 1000) for r in (1.5, 2.0, 3.0, 4.0, 5.0)] + [(8000, 1600), (1600, 8000)]
    for width, height in sizes:
        rw, rh = det_resize_shape(width, height, 736)
        for shape in ((1, rh, rw, 3), (1, bucket(rh, DET_BUCKETS, 512), bucket(rw, DET_BUCKETS, 512), 3)):
            index = select_profile(profiles, {"image_u8": shape})
            longer = max(shape[1:3])
            if longer <= DET_BUCKETS[-1]:
                assert index == DET_BUCKETS.index(bucket(longer, DET_BUCKETS, 512))
            else:
                assert index == (len(DET_BUCKETS) if shape[2] > shape[1] else len(DET_BUCKETS) + 1)
    rw, rh = det_resize_shape(6400, 800, 736)  # 8:1 is past what any profile holds
    with pytest.raises(ValueError):
        select_profile(profiles, {"image_u8": (1, rh, rw, 3)})


def test_recognition_bucket_selection_every_width(layouts) -> None:
    profiles = layouts[OCR_REC].profiles
    for width in range(320, 5121):
        expected = REC_WIDTH_BUCKETS.index(bucket(width, REC_WIDTH_BUCKETS, 640)) if width <= 2560 else 7
        assert select_profile(profiles, {"x": (6, 3, 48, width)}) == expected, width
    for k, width in enumerate(REC_WIDTH_BUCKETS):
        for batch in range(1, 9):
            assert select_profile(profiles, {"x": (batch, 3, 48, width)}) == k
    # the widths the server computes: int(48 * max_wh_ratio), bucketed or not
    for ratio in (320 / 48, 7.5, 10.0, 13.3, 20.0, 40.0, 53.3, 80.0, 106.0):
        for buckets in (False, True):
            width = rec_input_width(ratio, buckets)
            assert profiles[select_profile(profiles, {"x": (1, 3, 48, width)})]["x"].holds((1, 3, 48, width))
    for uncovered in [(1, 3, 48, 319), (1, 3, 48, 5121), (9, 3, 48, 640), (1, 3, 32, 640)]:
        with pytest.raises(ValueError, match=r"x \["):
            select_profile(profiles, {"x": uncovered})
    with pytest.raises(ValueError):
        select_profile(profiles, {"image": (1, 3, 48, 640)})  # not the model's input


# --------------------------------------------------------------------------- cache key


def test_cache_key_changes_with_each_ingredient(layouts) -> None:
    profiles = layouts[OCR_REC].profiles
    base = {
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.9.0.34",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "precision": "fp16",
        "profiles": profiles,
        "flags": {"builder_version": 1, "workspace_bytes": None},
    }
    changed = {
        "onnx_sha256": "b" * 64,
        "tensorrt_version": "10.10.0.31",
        "gpu_name": "NVIDIA L4",
        "precision": "fp32",
        "profiles": profiles[:-1],
        "flags": {"builder_version": 1, "workspace_bytes": 1 << 30},
    }
    keys = {cache_key(**base)}
    for field, value in changed.items():
        keys.add(cache_key(**{**base, field: value}))
    assert len(keys) == 1 + len(changed)
    # the same ingredients give the same key; descriptions and key order are not ingredients
    assert cache_key(**base) == cache_key(**base)
    reworded = tuple(dataclasses.replace(p, covers="") for p in profiles)
    assert cache_key(**{**base, "profiles": reworded}) == cache_key(**base)
    assert cache_key(**{**base, "flags": {"workspace_bytes": None, "builder_version": 1}}) == cache_key(**base)
    wider = (dataclasses.replace(profiles[0], shapes=(dataclasses.replace(profiles[0]["x"], opt=(8, 3, 48, 320)),)),)
    assert cache_key(**{**base, "profiles": wider + profiles[1:]}) != cache_key(**base)


# --------------------------------------------------------------------------- the build loop


@pytest.fixture
def cache_copy(model_cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_cache, tmp_path / "cache"))


def test_build_skips_cached_engines_and_rebuilds_what_changed(cache_copy: Path, tmp_path: Path) -> None:
    settings = offline_settings(cache_copy)
    repo = tmp_path / "engines"
    builder = RecordingBuilder(served_files(settings, repo))

    def run(**kwargs):
        return build_tensorrt_models(settings, repo, builder=builder, progress=False, **kwargs)

    results = run()
    assert sorted(c["name"] for c in builder.calls) == sorted(ALL_MODELS)
    calls = {c["name"]: c for c in builder.calls}
    assert calls[OCR_REC]["onnx"] == repo / OCR_REC / "1" / "model.onnx"  # the served, derived copy
    assert all(c["timing_cache"] == repo / TIMING_CACHE_NAME for c in calls.values())
    assert {n: c["precision"] for n, c in calls.items()} == {n: "fp32" if n == OCR_REC else "fp16" for n in calls}
    layouts = {
        s.name: engine_layout(s, dataclasses.replace(settings, engines_dir=repo)) for s in cached_specs(settings)
    }
    for result in results:
        folder = repo / result.name
        # the recognizer in FP32 whatever is asked (its LayerNorm overflows in FP16)
        assert result.status == "built" and result.precision == ("fp32" if result.name == OCR_REC else "fp16")
        assert calls[result.name]["profiles"] == layouts[result.name].profiles
        info = json.loads((folder / "1" / BUILD_INFO_NAME).read_text())
        assert info["key"] == result.key and info["plan_bytes"] == (folder / "1" / PLAN_NAME).stat().st_size
        assert info["tensorrt"] == "10.9.0.34" and info["gpu"] == "NVIDIA H100 80GB HBM3"
        assert (folder / "config.pbtxt").read_text() == tensorrt_config_pbtxt(layouts[result.name], ["0"])
    builder.calls.clear()

    again = run()
    assert builder.built() == [] and {r.status for r in again} == {"cached"}
    assert [r.key for r in again] == [r.key for r in results]
    table = summary_table(again)
    assert table.splitlines()[0].split() == ["model", "precision", "profiles", "build", "s", "size", "MB", "status"]
    assert all(name in table for name in ALL_MODELS) and table.count("cached") == 6

    run(precision="fp32")
    assert sorted(builder.built()) == sorted(set(ALL_MODELS) - {OCR_REC})  # the recognizer's engine is FP32 already
    run(precision="fp32")
    assert builder.built() == []
    run(force=True)
    assert sorted(builder.built()) == sorted(ALL_MODELS)
    builder.tensorrt_version = "10.10.0.31"
    run()
    assert sorted(builder.built()) == sorted(ALL_MODELS)
    builder.gpu_name = "NVIDIA L40S"
    run()
    assert sorted(builder.built()) == sorted(ALL_MODELS)

    # a changed ONNX file rebuilds that model only
    textual = cache_copy / "clip" / "ViT-B-32__openai" / "textual" / "model.onnx"
    model = onnx.load(str(textual))
    model.doc_string = "re-exported"
    onnx.save(model, str(textual))
    run()
    assert builder.built() == [CLIP_TEXTUAL]
    # MAX_BATCH_SIZE__OCR changes the recognizer's profiles only
    build_tensorrt_models(dataclasses.replace(settings, max_batch_size_ocr=10), repo, builder=builder, progress=False)
    assert builder.built() == [OCR_REC]
    run()
    assert builder.built() == [OCR_REC]
    # a missing or truncated plan is rebuilt
    (repo / SCRFD / "1" / PLAN_NAME).unlink()
    plan = repo / ARCFACE / "1" / PLAN_NAME
    plan.write_bytes(plan.read_bytes()[:10])
    run()
    assert builder.built() == sorted([SCRFD, ARCFACE])
    # --model
    only = run(only=[OCR_DET], force=True)
    assert [r.name for r in only] == [OCR_DET] and builder.built() == [OCR_DET]


def test_a_model_tensorrt_refuses_does_not_stop_the_others(cache_copy: Path, tmp_path: Path) -> None:
    settings = offline_settings(cache_copy)
    repo = tmp_path / "engines"
    builder = RecordingBuilder(served_files(settings, repo))
    build = builder.build

    def refuse_the_detector(onnx_path, *args):
        if builder.names[Path(onnx_path)] == OCR_DET:
            raise EngineBuildError("TensorRT could not build it")
        return build(onnx_path, *args)

    builder.build = refuse_the_detector
    results = {r.name: r for r in build_tensorrt_models(settings, repo, builder=builder, progress=False)}
    assert builder.built() == sorted(set(ALL_MODELS) - {OCR_DET})
    assert results[OCR_DET].status == "failed" and results[OCR_DET].error == "TensorRT could not build it"
    assert not (repo / OCR_DET / "config.pbtxt").exists() and not (repo / OCR_DET / "1" / PLAN_NAME).exists()
    assert {r.status for n, r in results.items() if n != OCR_DET} == {"built"}
    assert "failed" in summary_table(list(results.values()))
    builder.build = build  # fixed: only the failed model is built next time
    build_tensorrt_models(settings, repo, builder=builder, progress=False)
    assert builder.built() == [OCR_DET]


def test_instance_groups_per_device_id(cache_copy: Path, tmp_path: Path, monkeypatch) -> None:
    settings = Settings.from_env(
        {
            "MACHINE_LEARNING_CACHE_FOLDER": str(cache_copy),
            "MACHINE_LEARNING_DEVICE_IDS": "0,1,3",
            "IMMICH_TRT_PREPROCESS": "gpu",  # as the GPU image runs: the engines are the same models
            "IMMICH_TRT_RAPIDOCR_BASE_URL": UNREACHABLE,
            "HF_ENDPOINT": UNREACHABLE,
        }
    )
    repo = tmp_path / "engines"
    builder = RecordingBuilder(served_files(dataclasses.replace(settings, preprocess="cpu"), repo))
    results = build_tensorrt_models(settings, repo, builder=builder, progress=False)
    assert sorted(r.name for r in results) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        config = parse_config((repo / name / "config.pbtxt").read_text())
        assert [list(g.gpus) for g in config.instance_group] == [[0], [1], [3]]
        assert {(g.kind, g.count) for g in config.instance_group} == {(model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)}
        count = {OCR_DET: len(DET_BUCKETS) + 2, OCR_REC: len(REC_WIDTH_BUCKETS) + 1}.get(name, 1)
        expected = [str(i) for i in range(count)] if count > 1 else []
        assert all(list(g.profile) == expected for g in config.instance_group), name
        params = config.parameters.get("execution_context_allocation_strategy")
        assert (params.string_value if params else None) == ("ON_PROFILE_CHANGE" if count > 1 else None)
    # new GPU ids rewrite the configs, never the engines
    builder.calls.clear()
    build_tensorrt_models(settings, repo, gpus=["2"], builder=builder, progress=False)
    assert builder.calls == []
    assert [list(g.gpus) for g in parse_config((repo / OCR_DET / "config.pbtxt").read_text()).instance_group] == [[2]]
    assert parse_device_ids(["1", " 1", "0"]) == (1, 0)
    for bad in (["0", "x"], [], ["-1"]):
        with pytest.raises(ValueError):
            parse_device_ids(bad)


# --------------------------------------------------------------------------- without TensorRT / GPU


@pytest.fixture
def cli_env(monkeypatch, model_cache: Path, tmp_path: Path) -> Path:
    monkeypatch.setenv("MACHINE_LEARNING_CACHE_FOLDER", str(model_cache))
    monkeypatch.setenv("IMMICH_TRT_ENGINES_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("IMMICH_TRT_RAPIDOCR_BASE_URL", UNREACHABLE)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    return tmp_path / "engines"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT message cannot be shown")
def test_cli_without_tensorrt_fails_with_what_to_install(cli_env: Path, capsys) -> None:
    assert main(["build-engines", "--target", "tensorrt", "--precision", "fp32", "--gpus", "0,1"]) == 1
    err = capsys.readouterr().err
    assert "build-engines: TensorRT's Python package cannot be imported" in err
    assert "tritonserver" in err and "pip install tensorrt" in err and "Traceback" not in err
    assert not list(cli_env.glob("*/1/model.plan"))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "build_engines.py"), "--target", "tensorrt"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr and "TensorRT" in done.stderr
    # argument errors come first, without TensorRT too
    assert main(["build-engines", "--target", "tensorrt", "--gpus", "0,a"]) == 1
    assert "GPU ids are integers" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA driver is installed here")
def test_no_gpu_is_a_clear_error() -> None:
    with pytest.raises(NoGPUError, match="nvidia-smi is not on PATH"):
        gpu_names([0])


def test_gpu_query_parsing() -> None:
    text = "0, NVIDIA H100 80GB HBM3\n1, NVIDIA H100 80GB HBM3\n\n"
    assert parse_gpu_query(text) == {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H100 80GB HBM3"}


def test_int8_needs_calibration_or_qdq(layouts, tmp_path: Path) -> None:
    rec = layouts[OCR_REC]
    with pytest.raises(Int8CalibrationError, match="needs calibration data"):
        build_engine(rec.onnx_path, rec.profiles, "int8", tmp_path / "tc", None)
    with pytest.raises(ValueError, match="precision must be one of"):
        build_engine(rec.onnx_path, rec.profiles, "bf16", tmp_path / "tc", None)
    # an explicitly quantized graph passes that check and goes on to TensorRT
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
    ]
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], [scale])), path)
    assert has_qdq(path) and not has_qdq(rec.onnx_path)
    profile = Profile((ProfileShape("x", (1, 4), (2, 4), (4, 4)),))
    if not HAS_TENSORRT:
        with pytest.raises(TensorRTUnavailableError):
            build_engine(path, [profile], "int8", tmp_path / "tc", None)


# --------------------------------------------------------------------------- TensorRT-RTX smoke test

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu13 is not installed (it builds engines without a GPU)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_build_engine_with_tensorrt_rtx(layouts, cache_copy: Path, tmp_path: Path) -> None:
    import tensorrt_rtx

    timing = tmp_path / TIMING_CACHE_NAME
    for name in (CLIP_VISUAL, CLIP_TEXTUAL, SCRFD, ARCFACE):
        layout = layouts[name]
        plan = build_engine(layout.onnx_path, layout.profiles, "fp32", timing, None, trt_module=tensorrt_rtx)
        assert len(plan) > 100_000, name
    rec = layouts[OCR_REC]  # two width profiles keep it quick
    assert len(build_engine(rec.onnx_path, rec.profiles[:2], "fp32", timing, 1 << 28, trt_module=tensorrt_rtx)) > 0
    assert timing.is_file()

    arcface = layouts[ARCFACE]
    with pytest.raises(EngineBuildError, match="no shape for input 'input.1'"):
        build_engine(
            arcface.onnx_path,
            [Profile((ProfileShape("other", (1,), (1,), (1,)),))],
            "fp32",
            None,
            None,
            trt_module=tensorrt_rtx,
        )
    wrong = Profile((ProfileShape("input.1", (1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224)),))
    with pytest.raises(EngineBuildError, match="do not fit its dimensions"):
        build_engine(arcface.onnx_path, [wrong], "fp32", None, None, trt_module=tensorrt_rtx)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(EngineBuildError, match="cannot parse"):
        build_engine(broken, arcface.profiles, "fp32", None, None, trt_module=tensorrt_rtx)
    if importlib.util.find_spec("modelopt") is None:  # strongly typed: FP16 needs a converted graph
        with pytest.raises(EngineBuildError, match="nvidia-modelopt"):
            build_engine(arcface.onnx_path, arcface.profiles, "fp16", None, None, trt_module=tensorrt_rtx)

    class RtxBuilder:
        tensorrt_version = f"rtx-{tensorrt_rtx.__version__}"
        gpu_name = "none (TensorRT-RTX build on CPU)"

        def build(self, onnx_path, profiles, precision, timing_cache_path, workspace_bytes):
            return build_engine(
                onnx_path, profiles, precision, timing_cache_path, workspace_bytes, trt_module=tensorrt_rtx
            )

    repo = tmp_path / "engines"
    settings = offline_settings(cache_copy)
    results = build_tensorrt_models(
        settings, repo, only=[SCRFD, ARCFACE], precision="fp32", builder=RtxBuilder(), progress=False
    )
    assert [r.status for r in results] == ["built", "built"]
    assert all(round((repo / r.name / "1" / PLAN_NAME).stat().st_size / 1e6, 6) == round(r.size_mb, 6) for r in results)
    again = build_tensorrt_models(
        settings, repo, only=[SCRFD, ARCFACE], precision="fp32", builder=RtxBuilder(), progress=False
    )
    assert [r.status for r in again] == ["cached", "cached"]


# ------------------------------------------- the backend's profile distance (finding h)


def test_the_backends_distance_compares_each_opt_dimension_with_the_previous_one() -> None:
    """tensorrt_backend ranks holding profiles by |opt[0] - batch| + sum |opt[i] -
    shape[i - 1]| (instance_state.cc 1978-1982), not by the Manhattan distance it means:
    here the two pick different profiles."""
    from immich_trt.tools.gpu.tensorrt import backend_distance

    exact = Profile((ProfileShape("x", (1, 1), (4, 60), (8, 200)),))
    other = Profile((ProfileShape("x", (1, 1), (4, 5), (8, 200)),))
    shape = {"x": (4, 60)}
    assert (exact.distance(shape), other.distance(shape)) == (0, 55)  # Manhattan: the first
    assert (backend_distance(exact, shape), backend_distance(other, shape)) == (56, 1)  # the backend: the second
    assert select_profile([exact, other], shape) == 1


def _manhattan_choice(profiles, shapes) -> int:
    holding = [i for i, p in enumerate(profiles) if p.holds(shapes)]
    return min(holding, key=lambda i: (profiles[i].distance(shapes), i))


def test_our_profiles_get_the_same_choice_under_both_distances(layouts) -> None:
    """Nested square detector profiles (the smallest holding side wins either way) and
    disjoint recognizer width ranges (one profile holds a width): every shape the
    server can send picks the same profile with the backend's formula and Manhattan's."""
    det = layouts[OCR_DET].profiles
    checked = 0
    for h in range(32, 4097, 32):
        for w in range(32, 4097, 32):
            shapes = {"image_u8": (1, h, w, 3)}
            if any(p.holds(shapes) for p in det):
                assert select_profile(det, shapes) == _manhattan_choice(det, shapes), (h, w)
                checked += 1
    rec = layouts[OCR_REC].profiles
    for width in range(320, 5121, 7):
        for batch in (1, 3, 6, 8):
            shapes = {"x": (batch, 3, 48, width)}
            assert select_profile(rec, shapes) == _manhattan_choice(rec, shapes), (batch, width)
            checked += 1
    assert checked > 6000


# --------------------------------------------------- FP16 where it is safe (finding f)


def test_an_fp16_engine_that_disagrees_with_onnxruntime_is_rebuilt_in_fp32(cache_copy: Path, tmp_path: Path) -> None:
    settings = offline_settings(cache_copy)
    repo = tmp_path / "engines"
    builder = RecordingBuilder(served_files(settings, repo))
    seen: list[tuple[str, int]] = []

    def verify(layout, plan):
        precision = builder.calls[-1]["precision"]
        seen.append((layout.name, precision))
        if layout.name == SCRFD and precision == "fp16":
            return False, "score_8: cosine 0.410000"
        if layout.name == CLIP_TEXTUAL:
            return None, "CUDA's runtime library (libcudart) cannot be loaded"
        return True, "embedding: cosine 0.999990"

    results = {r.name: r for r in build_tensorrt_models(settings, repo, builder=builder, progress=False, verify=verify)}
    assert [c["precision"] for c in builder.calls if c["name"] == SCRFD] == ["fp16", "fp32"]
    assert results[SCRFD].precision == "fp32" and results[SCRFD].status == "built"
    info = json.loads((repo / SCRFD / "1" / BUILD_INFO_NAME).read_text())
    assert info["precision"] == "fp32" and info["requested_precision"] == "fp16"
    assert info["checked"].startswith("FP16 disagreed, FP32 built: embedding: cosine")
    assert results[OCR_REC].precision == "fp32"  # by policy: not built in FP16 at all
    assert "LayerNorm" in json.loads((repo / OCR_REC / "1" / BUILD_INFO_NAME).read_text())["fp32_because"]
    assert results[CLIP_TEXTUAL].checked.startswith("not checked: CUDA")
    assert results[ARCFACE].precision == "fp16" and results[ARCFACE].checked == "embedding: cosine 0.999990"
    # cached: the FP32 engine stays, nothing is built or checked again
    builder.calls.clear()
    seen.clear()
    again = {r.name: r for r in build_tensorrt_models(settings, repo, builder=builder, progress=False, verify=verify)}
    assert builder.calls == [] and seen == [] and again[SCRFD].precision == "fp32"

    def fp32_disagrees_too(layout, plan):
        return (False, "collapsed") if layout.name == OCR_DET else (True, "ok")

    results = build_tensorrt_models(settings, repo, builder=builder, progress=False, verify=fp32_disagrees_too,
                                    force=True)  # fmt: skip
    failed = {r.name: r for r in results if r.status == "failed"}
    assert list(failed) == [OCR_DET] and "disagrees with ONNX Runtime: FP16 disagreed, FP32 built: collapsed" in (
        failed[OCR_DET].error
    )


def test_reference_inputs_and_agreement(layouts) -> None:
    import numpy as np

    from immich_trt.tools.gpu.verify import agreement, reference_inputs

    shapes = {name: {k: (v.shape, v.dtype.name) for k, v in reference_inputs(layout).items()} for name, layout in layouts.items()}
    assert shapes[CLIP_VISUAL] == {"image": ((1, 3, 224, 224), "float32")}
    assert shapes[ARCFACE] == {"input.1": ((8, 3, 112, 112), "float32")}  # the opt batch
    assert shapes[OCR_DET]["image_u8"] == ((1, 256, 256, 3), "uint8")
    assert shapes[OCR_REC]["x"][1] == "float32" and shapes[OCR_REC]["x"][0][1:3] == (3, 48)
    text = reference_inputs(layouts[CLIP_TEXTUAL])["text"]
    assert text[0, 0] == 49406 and (text[0, 1:] < 1000).all()
    page = reference_inputs(layouts[OCR_DET])["image_u8"]
    assert set(np.unique(page)) == {20, 235}  # dark bars on white
    rng = np.random.default_rng(1)
    ref = {"e": rng.normal(size=(4, 512)).astype(np.float32), "i": rng.integers(0, 100, (6, 40))}
    close = {"e": ref["e"] + 1e-3, "i": ref["i"].copy()}
    assert agreement(ref, close)[0]
    overflow = {"e": np.where(ref["e"] > 1, np.inf, ref["e"]), "i": ref["i"]}
    assert agreement(ref, overflow) == (False, "e: not finite")
    wrong = {"e": rng.normal(size=(4, 512)).astype(np.float32), "i": rng.integers(0, 100, (6, 40))}
    ok, measured = agreement(ref, wrong)
    assert not ok and "cosine" in measured and "% equal" in measured


# ---------------------------------------------- the build's GPU is the one asked for (d)


def test_the_builder_points_cuda_at_the_first_gpu_in_pci_order(tmp_path: Path, monkeypatch) -> None:
    from immich_trt.tools.gpu import tensorrt as trt_module

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA A10'\necho '1, NVIDIA H100 80GB HBM3'\necho '2, NVIDIA H100 80GB HBM3'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    class FakeTensorRT:
        __version__ = "10.13.3.9"

    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: FakeTensorRT)
    builder = trt_module.TensorRTBuilder([2, 1])
    assert builder.gpu_name == "NVIDIA H100 80GB HBM3"
    # TensorRT builds on CUDA device 0: the H100 number 2, not the A10 nvidia-smi lists first
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(NoGPUError, match="different models"):
        trt_module.TensorRTBuilder([0, 1])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # refused before touching it


def test_the_launched_triton_numbers_gpus_as_nvidia_smi(tmp_path: Path, monkeypatch) -> None:
    from immich_trt.runtime.launcher import TritonLauncher
    from immich_trt.tools.testing import triton_installation_from_wheel

    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    launcher = TritonLauncher(tmp_path / "repo", tmp_path / "work", server_root=triton_installation_from_wheel(tmp_path / "t"))
    from immich_trt.runtime.launcher import TritonInstallation

    env = launcher._environment(TritonInstallation.at(tmp_path / "t"))
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
