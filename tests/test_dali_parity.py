"""DALI preprocessing pipelines (CPU mode) against the reference preprocessing.

Tensor level: each pipeline on every image of ``../shared/data/{photos,ocr}`` that DALI
decodes (31 of 33; HEIC and AVIF stay on the CPU path), max/mean absolute difference
within the tolerances measured for ``immich_trt.tools.gpu.dali`` (see its docstring); the
geometry (resize sizes, crop anchors, letterbox size, ``det_scale``) exactly equal.
Model level: the served ONNX models (test-pack CLIP and SCRFD, PP-OCRv5 mobile) run
through the model classes with the DALI tensor where their own preprocessing goes.
Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import NO_DATA_REASON, SHARED_DATA, requires_data
from immich_trt.runtime.ensemble import image_format
from immich_trt.tools.gpu import dali as D

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except ImportError:
    HAS_DALI = False

needs_dali = pytest.mark.skipif(
    not HAS_DALI, reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120==2.4.0): pipelines not checked"
)

# Tolerances (measured maxima in brackets, over the 31 images).
#: CLIP ``image``: 12 grey levels in units of the smallest std (9 levels, 0.135, at image
#: borders, where PIL renormalises its truncated kernel and DALI repeats the edge pixel).
CLIP_MAX_ABS = 12 / 255 / 0.26130258
CLIP_MEAN_ABS = 0.001  # [0.0005]
#: CLIP ``image`` 4 px or more from the crop's borders, in grey levels [2].
CLIP_INNER_MAX_LEVELS = 3
#: SCRFD ``input.1``: one grey level of cv2's fixed-point bilinear rounding [exactly 1/128].
SCRFD_MAX_ABS = 1 / 128 + 1e-6
SCRFD_MEAN_ABS = 0.0015  # [0.0007]
#: OCR ``image_u8``: grey levels [5, at borders]; mean [0.0135].
OCR_MAX_ABS = 8
OCR_MEAN_ABS = 0.03
CLIP_MIN_COSINE = 0.995
#: ``ocr.minRecognitionScore`` the Immich server sends by default.
IMMICH_MIN_TEXT_SCORE = 0.8
FACE_MAX_BOX_DIFF = 2.0


#: ``PIL.Image.info`` key of the file bytes an image was decoded from (the DALI side of
#: each comparison decodes the same bytes; the server keeps them only for RGB/grey images).
FILE_BYTES = "test.file_bytes"


def decoded(data: bytes) -> Image.Image:
    """``decode_pil(data)`` as the server decodes, with the file bytes kept."""
    from immich_trt.models.transforms import decode_pil

    image = decode_pil(data)
    image.info[FILE_BYTES] = data
    return image


def _images(folder: str) -> list[tuple[str, bytes]]:
    """``(folder/name, encoded)`` of the images of ``../shared/data/<folder>``."""
    paths = sorted((SHARED_DATA / folder).iterdir())
    return [(f"{folder}/{p.name}", p.read_bytes()) for p in paths if p.is_file() and p.suffix != ".md"]


@pytest.fixture(scope="module")
def real_images():
    """``(name, encoded, PIL RGB image as the server decodes it)`` of every image DALI decodes."""

    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA_REASON)
    items = [(name, data) for name, data in _images("photos") + _images("ocr") if image_format(data)]
    return [(name, data, decoded(data)) for name, data in items]


def _report(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{title}: max |diff| {max(r[1] for r in rows):.6g}, mean |diff| <= {max(r[2] for r in rows):.6g}")
    for name, mx, mean in rows:
        print(f"  {name:32s} max {mx:.6g} mean {mean:.6g}")


def _ocr_sizes(images) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    from immich_trt.models.ocr import DET_BUCKETS, bucket, det_resize_shape

    resize_hw = [det_resize_shape(im.width, im.height, 736)[::-1] for im in images]
    bucket_hw = [(bucket(h, DET_BUCKETS, 512), bucket(w, DET_BUCKETS, 512)) for h, w in resize_hw]
    return resize_hw, bucket_hw


# ------------------------------------------------------------------ without DALI


def test_module_imports_without_loading_dali() -> None:
    code = "import sys, immich_trt.tools.gpu.dali; sys.exit(any(m.startswith('nvidia.dali') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_without_dali_running_a_pipeline_says_so() -> None:
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"  # as if the package were absent
        "from immich_trt.tools.gpu import dali\n"
        "try:\n    dali.run_cpu('face_detection', {}, [b'x'])\n"
        "except RuntimeError as exc:\n    print(exc)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert "NVIDIA DALI is not installed" in result.stdout


@requires_data
def test_image_format_admits_only_formats_decoded_like_pillow() -> None:
    formats = {name.split("/")[1]: image_format(data) for name, data in _images("photos")}
    assert formats["portrait.jpg"] == "jpeg"
    assert formats["density_plot.png"] == "png"
    assert formats["denali.webp"] == "webp"
    assert formats["IMG_2682.heic"] is None and formats["8bit-sRGB.avif"] is None


def test_io_specs_follow_the_gpu_contract() -> None:
    clip = D.clip_params(224, [0.5] * 3, [0.25] * 3)
    assert D.io_specs(D.CLIP_VISUAL, clip) == (
        [D.TensorSpec("encoded", "TYPE_UINT8", (-1,))],
        [D.TensorSpec("image", "TYPE_FP32", (3, 224, 224))],
    )
    assert D.io_specs(D.FACE_DETECTION, {})[1] == [
        D.TensorSpec("input.1", "TYPE_FP32", (3, 640, 640)),
        D.TensorSpec("det_scale", "TYPE_FP32", (1,)),
    ]
    inputs, outputs = D.io_specs(D.OCR_DETECTION, {})
    assert [(s.name, s.data_type, s.dims) for s in inputs] == [
        ("encoded", "TYPE_UINT8", (-1,)),
        ("resize_hw", "TYPE_INT32", (2,)),
        ("bucket_hw", "TYPE_INT32", (2,)),
    ]
    assert outputs == [D.TensorSpec("image_u8", "TYPE_UINT8", (-1, -1, 3))]
    with pytest.raises(ValueError, match="unknown DALI pipeline kind"):
        D.io_specs("clip_textual", {})


def test_config_pbtxt_for_two_gpus_parses_as_a_triton_model_config() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = D.dali_config_pbtxt(
        "facial-recognition__buffalo_l__detection__preprocess",
        D.FACE_DETECTION,
        {},
        max_batch_size=8,
        device_ids=("0", "1"),
        preferred_batch_sizes=(8, 4, 16),
        max_queue_delay_us=200,
    )
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config == text_format.Parse(
        'name: "facial-recognition__buffalo_l__detection__preprocess"\n'
        'backend: "dali"\n'
        "max_batch_size: 8\n"
        "input [\n"
        '  { name: "encoded" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true }\n'
        "]\n"
        "output [\n"
        '  { name: "input.1" data_type: TYPE_FP32 dims: [ 3, 640, 640 ] },\n'
        '  { name: "det_scale" data_type: TYPE_FP32 dims: [ 1 ] }\n'
        "]\n"
        "dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 200 }\n"
        "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 0 ] }, { kind: KIND_GPU count: 1 gpus: [ 1 ] } ]\n"
        'parameters: { key: "num_threads" value: { string_value: "4" } }\n',
        model_config_pb2.ModelConfig(),
    )
    assert config.backend == "dali" and config.max_batch_size == 8
    assert [(o.name, list(o.dims)) for o in config.output] == [("input.1", [3, 640, 640]), ("det_scale", [1])]
    assert [list(g.gpus) for g in config.instance_group] == [[0], [1]]
    assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    assert config.input[0].allow_ragged_batch
    with pytest.raises(ValueError, match="max_batch_size"):
        D.dali_config_pbtxt("x", D.FACE_DETECTION, {}, max_batch_size=0)


def _landmarks(width: int, height: int, count: int, seed: int) -> np.ndarray:
    """``float32[count, 5, 2]`` face landmarks: the ArcFace template scaled (faces of 34
    to 670 px), turned up to 35 degrees, jittered by 2 px and placed anywhere in (and
    partly outside) a ``width x height`` image, as a detector reports them."""
    from immich_trt.models.face import ARCFACE_DST

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scale, angle = rng.uniform(0.3, 6.0), rng.uniform(-0.6, 0.6)
        turn = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = np.array([rng.uniform(-50, width + 50), rng.uniform(-50, height + 50)])
        out.append((ARCFACE_DST - ARCFACE_DST.mean(0)) @ turn.T + centre + rng.normal(0, 2, (5, 2)))
    return np.array(out, np.float32)


def _sequence_inputs(kind: str, images) -> list[dict[str, np.ndarray]] | None:
    """Inputs of the recognizers' pipelines for ``images`` (the first batch of lines
    of two synthetic boxes; four faces), ``None`` for the other kinds."""
    from immich_trt.models.ocr import LineGeometry, line_batches, line_inputs

    if kind == D.FACE_RECOGNITION:
        return [{"face_landmarks": _landmarks(im.width, im.height, 4, i)} for i, im in enumerate(images)]
    if kind == D.OCR_RECOGNITION:
        rows = []
        for image in images:
            w, h = image.size
            boxes = np.array([[[10, 10], [w * 0.6, 14], [w * 0.6, 60], [10, 56]], [[20, 30], [60, 30], [60, 200], [20, 200]]],
                             np.float32)  # fmt: skip
            geometry = LineGeometry.of(boxes)
            rows.append({k: v[0] for k, v in line_inputs(geometry, line_batches(geometry.shapes, 6)[0]).items()})
        return rows
    return None


# ------------------------------------------------------------------- geometry


def _geometry(kind: str, sizes: list[tuple[int, int]], param) -> list[np.ndarray]:
    """Run ``clip_geometry``/``letterbox_geometry`` on (height, width) pairs."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    pipe = Pipeline(batch_size=len(sizes), num_threads=1, device_id=None, **D.SYNCHRONOUS)
    with pipe:
        hw = fn.external_source(name="hw", dtype=types.FLOAT64, ndim=1)
        geometry = D.clip_geometry if kind == D.CLIP_VISUAL else D.letterbox_geometry
        pipe.set_outputs(*geometry(hw[0], hw[1], param))
    pipe.build()
    pipe.feed_input("hw", [np.array(s, np.float64) for s in sizes])
    outputs = pipe.run()
    return [np.array([float(np.array(out[i])) for out in outputs]) for i in range(len(sizes))]


def _sizes(seed: int, count: int, low: int, high: int, max_aspect: float) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < count:
        h, w = (int(v) for v in rng.integers(low, high, 2))
        if max(h, w) / min(h, w) <= max_aspect:
            sizes.append((h, w))
    return sizes


@needs_dali
def test_clip_geometry_is_exactly_resize_pil_and_crop_pil() -> None:
    from immich_trt.models.clip import crop_pil, resize_pil

    size = 224
    sizes = [(224, 224), (223, 225), (225, 223), (1, 3), (3, 1), (300, 200), (1000, 225)]
    sizes += _sizes(1, 250, 1, 1500, 8.0)
    got = _geometry(D.CLIP_VISUAL, sizes, size)
    for (h, w), (new_w, new_h, left, top) in zip(sizes, got):
        resized = resize_pil(Image.new("L", (w, h)), size)
        assert (new_w, new_h) == resized.size, (h, w)
        # crop_pil's anchor: the crop of an image whose pixel (x, y) holds x (resp. y)
        xs = Image.fromarray(np.tile(np.arange(resized.width, dtype=np.int32), (resized.height, 1)), mode="I")
        ys = Image.fromarray(np.tile(np.arange(resized.height, dtype=np.int32)[:, None], (1, resized.width)), mode="I")
        assert (left, top) == (crop_pil(xs, size).getpixel((0, 0)), crop_pil(ys, size).getpixel((0, 0))), (h, w)


@needs_dali
@pytest.mark.parametrize("input_size", [(640, 640), (608, 640)])
def test_letterbox_geometry_is_exactly_letterbox(input_size) -> None:
    from immich_trt.models.face import letterbox

    sizes = [(640, 640), (480, 640), (640, 480), (1, 1), (2, 640), (640, 2), (641, 640), (959, 1279)]
    sizes += _sizes(2, 300, 1, 2500, 50.0)
    got = _geometry(D.FACE_DETECTION, sizes, input_size)
    for (h, w), (new_w, new_h, det_scale) in zip(sizes, got):
        canvas, ref_scale = letterbox(np.ones((h, w, 3), np.uint8), input_size)
        rows, cols = np.nonzero(canvas[:, :, 0])
        assert (new_w, new_h) == (cols.max() + 1, rows.max() + 1), (h, w)
        assert det_scale == ref_scale, (h, w)


# ------------------------------------------------------------- tensor parity


@needs_dali
def test_clip_tensor_parity(real_images) -> None:
    from immich_trt.models.clip import clip_preprocess

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    outputs = D.run_cpu(D.CLIP_VISUAL, D.clip_params(224, mean, std), [data for _, data, _ in real_images])
    rows, inner = [], []
    for (name, _, image), out in zip(real_images, outputs):
        ref = clip_preprocess(image, 224, np.array(mean, np.float32), np.array(std, np.float32))[0]
        assert out["image"].shape == ref.shape and out["image"].dtype == np.float32
        diff = np.abs(out["image"] - ref)
        rows.append((name, float(diff.max()), float(diff.mean())))
        levels = diff * 255 * np.array(std, np.float32)[:, None, None]
        inner.append(float(levels[:, 4:-4, 4:-4].max()))
    _report("CLIP image", rows)
    print(f"  4 px or more from the borders: max {max(inner):.3f} grey levels")
    assert max(r[1] for r in rows) <= CLIP_MAX_ABS
    assert max(r[2] for r in rows) <= CLIP_MEAN_ABS
    assert max(inner) <= CLIP_INNER_MAX_LEVELS


@needs_dali
def test_scrfd_letterbox_parity_and_exact_det_scale(real_images) -> None:
    from immich_trt.models.face import detection_blob, letterbox
    from immich_trt.models.transforms import to_bgr

    outputs = D.run_cpu(D.FACE_DETECTION, {}, [data for _, data, _ in real_images])
    rows = []
    for (name, _, image), out in zip(real_images, outputs):
        canvas, det_scale = letterbox(to_bgr(image))
        ref = detection_blob(canvas)[0]
        blob = out["input.1"]
        assert blob.shape == ref.shape == (3, 640, 640) and blob.dtype == np.float32
        assert out["det_scale"].dtype == np.float32 and out["det_scale"].tolist() == [np.float32(det_scale)]
        # geometry: the padding is the same region, at exactly the blob value of 0
        new_h = round(image.height * det_scale)
        pad = np.float32((0 - 127.5) / 128)
        assert np.all(blob[:, new_h:, :] == pad) and np.all(ref[:, new_h:, :] == pad)
        diff = np.abs(blob - ref)
        rows.append((name, float(diff.max()), float(diff.mean())))
    _report("SCRFD input.1", rows)
    assert max(r[1] for r in rows) <= SCRFD_MAX_ABS
    assert max(r[2] for r in rows) <= SCRFD_MEAN_ABS


@needs_dali
@pytest.mark.parametrize("buckets", [False, True], ids=["exact", "buckets"])
def test_ocr_detection_input_parity(real_images, buckets) -> None:
    from immich_trt.models.ocr import det_resize, pad_to_bucket

    images = [item for item in real_images if min(item[2].size) >= 32]  # TextDetector skips smaller ones
    resize_hw, bucket_hw = _ocr_sizes([image for _, _, image in images])
    outputs = D.run_cpu(
        D.OCR_DETECTION, {}, [data for _, data, _ in images], resize_hw, bucket_hw if buckets else None
    )
    rows = []
    for (name, _, image), out in zip(images, outputs):
        ref = det_resize(image, 736)
        ref = (pad_to_bucket(ref) if buckets else ref)[0]
        got = out["image_u8"]
        assert got.shape == ref.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - ref)
        rows.append((name, float(diff.max()), float(diff.mean())))
    _report(f"OCR image_u8 ({'buckets' if buckets else 'exact sizes'})", rows)
    assert max(r[1] for r in rows) <= OCR_MAX_ABS
    assert max(r[2] for r in rows) <= OCR_MEAN_ABS


@needs_dali
@requires_data
def test_ocr_sizes_are_checked_before_anything_runs() -> None:
    data = [(SHARED_DATA / "ocr" / "en.jpg").read_bytes()]
    with pytest.raises(ValueError, match="one resize_hw"):
        D.run_cpu(D.OCR_DETECTION, {}, data)
    with pytest.raises(ValueError, match="bucket_hw >= resize_hw"):
        D.run_cpu(D.OCR_DETECTION, {}, data, [(128, 704)], [(128, 512)])
    (out,) = D.run_cpu(D.OCR_DETECTION, {}, data, [(128, 704)], [(256, 768)])
    assert out["image_u8"].shape == (256, 768, 3) and not out["image_u8"][128:].any()


# ------------------------------------------------------- serialised pipelines


@needs_dali
@requires_data
@pytest.mark.parametrize("kind", D.KINDS)
def test_written_cpu_model_deserialises_and_gives_the_same_tensors(tmp_path: Path, kind: str) -> None:
    from google.protobuf import text_format
    from nvidia.dali import Pipeline
    from tritonclient.grpc import model_config_pb2

    params = {D.CLIP_VISUAL: D.clip_params(224, [0.5] * 3, [0.25] * 3), D.FACE_RECOGNITION: D.arcface_params(127.5, 127.5)}
    params = params.get(kind, {})
    folder = D.write_dali_model(tmp_path / f"{kind}__preprocess", kind, params, max_batch_size=4, device="cpu")
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name and config.backend == "dali"
    assert [o.name for o in config.output] == list(D.OUTPUT_NAMES[kind])
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    data = [(SHARED_DATA / "photos" / n).read_bytes() for n in ("portrait.jpg", "denali.webp")]
    sizes = [(704, 832), (320, 608)] if kind == D.OCR_DETECTION else None
    pipe = Pipeline.deserialize(filename=str(folder / "1" / "model.dali"), device_id=None, **D.SYNCHRONOUS)
    pipe.build()
    inputs = _sequence_inputs(kind, [decoded(d) for d in data])
    got = D.feed_and_run(pipe, kind, data, sizes, inputs=inputs)
    expected = D.run_cpu(kind, params, data, sizes, inputs=inputs)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for name in e:
            np.testing.assert_array_equal(g[name], e[name])


@needs_dali
@pytest.mark.parametrize("kind", D.KINDS)
def test_gpu_graph_decodes_with_nvjpeg_and_keeps_the_image_on_the_gpu(kind: str) -> None:
    """The "gpu" graph is defined without a GPU: the image leaves the CPU at the decoder
    (``mixed``) and every image op after it runs on the GPU; the geometry stays on the CPU."""
    from nvidia.dali import Pipeline

    params = D.arcface_params(127.5, 128.0) if kind == D.FACE_RECOGNITION else D.clip_params(224, [0.5] * 3, [0.25] * 3)
    with Pipeline(batch_size=2, num_threads=1, device_id=0):
        outputs = D.GRAPHS[kind]("gpu", params)
    devices = {}

    def walk(node) -> None:
        if node.source is not None and node.name not in devices:
            devices[node.name] = (node.device, [i.name for i in node.source.inputs])
            for parent in node.source.inputs:
                walk(parent)

    for out in outputs:
        walk(out)
    decoders = [name for name, (device, parents) in devices.items() if "encoded" in parents and device == "gpu"]
    assert len(decoders) == 1  # decoders.image(device="mixed"): CPU bytes in, GPU image out
    assert outputs[0].device == "gpu"
    # nothing between the decoder and the image output runs on the CPU
    image_path = set()

    def down(name) -> None:
        for child, (device, parents) in devices.items():
            if name in parents and child not in image_path:
                image_path.add(child)
                down(child)

    down(decoders[0])
    assert image_path and all(devices[n][0] == "gpu" for n in image_path)
    if kind == D.FACE_DETECTION:
        assert outputs[1].device == "cpu"  # det_scale, computed from the header


@needs_dali
def test_gpu_model_serialises_only_with_a_gpu(tmp_path: Path) -> None:
    params = D.clip_params(224, [0.5] * 3, [0.25] * 3)
    if D.cuda_device_count() == 0:
        with pytest.raises(RuntimeError, match="needs CUDA and a GPU"):
            D.write_dali_model(tmp_path / "m", D.CLIP_VISUAL, params, 8)
        assert not (tmp_path / "m" / "config.pbtxt").exists()
    else:
        folder = D.write_dali_model(tmp_path / "m", D.CLIP_VISUAL, params, 8)
        assert b"encoded" in (folder / "1" / "model.dali").read_bytes()


# ---------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def cpu_pipelines():
    pipes: dict[tuple, object] = {}

    def run(kind: str, params: dict, encoded: bytes, resize_hw=None) -> dict[str, np.ndarray]:
        key = (kind, repr(sorted(params.items())))
        if key not in pipes:
            pipes[key] = D.cpu_pipeline(kind, params, batch_size=1)
        (out,) = D.feed_and_run(pipes[key], kind, [encoded], None if resize_hw is None else [resize_hw])
        return out

    return run


def _context(cache: Path, tmp_path: Path):
    from immich_trt.models.base import ModelContext
    from immich_trt.runtime.onnxruntime import OnnxRuntime
    from immich_trt.tools.testing import offline_settings

    runtime = OnnxRuntime()
    settings = dataclasses.replace(offline_settings(cache), engines_dir=tmp_path / "engines")
    return ModelContext(settings, runtime), runtime


@needs_dali
async def test_clip_embeddings_agree(
    real_images, model_cache: Path, tmp_path: Path, cpu_pipelines, monkeypatch
) -> None:
    import orjson

    from immich_trt.models.clip import ClipVisualEncoder

    ctx, runtime = _context(model_cache, tmp_path)
    encoder = ClipVisualEncoder("ViT-B-32__openai", ctx)
    await encoder.load()
    params = D.clip_params(encoder.size, encoder.mean, encoder.std)

    def dali_image(image) -> np.ndarray:
        return cpu_pipelines(D.CLIP_VISUAL, params, image.info[FILE_BYTES])["image"][None]

    cosines = []
    for name, _, image in real_images:
        reference = np.array(orjson.loads(await encoder.predict(image)), np.float64)
        with monkeypatch.context() as m:
            m.setattr(encoder, "preprocess", lambda im: {"image": dali_image(im)})
            dali = np.array(orjson.loads(await encoder.predict(image)), np.float64)
        cosines.append((name, float(reference @ dali / np.linalg.norm(reference) / np.linalg.norm(dali))))
    await runtime.stop()
    print(f"\nCLIP embedding cosine: min {min(c for _, c in cosines):.7f} over {len(cosines)} images")
    assert min(c for _, c in cosines) >= CLIP_MIN_COSINE


def _square_jpegs() -> list[tuple[str, bytes]]:
    """Bright squares on black, JPEG-encoded, sized so that each lands on one 32-px
    stride cell of the 640x640 letterbox (det_scale 0.64, 0.5, 4/3; portrait too)."""
    import cv2

    from immich_trt.tools import testpack as tp

    layouts = {
        "1000x750": (1000, 750, 50, [(100, 100), (400, 300), (700, 550)]),
        "1280x960": (1280, 960, 64, [(128, 64), (640, 512), (1024, 768)]),
        "480x360": (480, 360, 24, [(48, 48), (240, 144), (384, 288)]),
        "750x1000": (750, 1000, 50, [(50, 100), (400, 500), (600, 850)]),
    }
    out = []
    for name, (w, h, side, corners) in layouts.items():
        image = tp.bright_square_image(w, h, [(x, y, side) for x, y in corners])
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        out.append((name, encoded.tobytes()))
    return out


@needs_dali
async def test_scrfd_boxes_agree(real_images, model_cache: Path, tmp_path: Path, cpu_pipelines, monkeypatch) -> None:
    from immich_trt.models.face import FaceDetector

    ctx, runtime = _context(model_cache, tmp_path)
    detector = FaceDetector("buffalo_l", ctx, minScore=0.7)
    await detector.load()

    def dali_preprocess(image):
        out = cpu_pipelines(D.FACE_DETECTION, {}, image.info[FILE_BYTES])
        return out["input.1"][None], float(out["det_scale"][0])

    # Photos only: on text pages the test detector answers clusters of near-equal scores
    # (uniform white paper, told apart by a 1e-4 tie-breaker), where NMS's winner flips
    # with any pixel change; a real face detector has no such ties.
    photos = [item for item in real_images if item[0].startswith("photos/")]
    squares = [(name, data, decoded(data)) for name, data in _square_jpegs()]
    worst, found = 0.0, {}
    for name, _, image in squares + photos:
        reference = await detector.predict(image)
        with monkeypatch.context() as m:
            m.setattr(detector, "_preprocess", dali_preprocess)
            dali = await detector.predict(image)
        assert dali["boxes"].shape == reference["boxes"].shape, name
        if len(reference["boxes"]):
            worst = max(worst, float(np.abs(dali["boxes"] - reference["boxes"]).max()))
            found[name] = len(reference["boxes"])
    await runtime.stop()
    print(f"\nSCRFD boxes: max |diff| {worst} px; faces found {found}")
    assert all(found.get(name) == 3 for name, _, _ in squares)  # the detector did find the squares
    assert sum(found.values()) > 12  # and answered on photos too
    assert worst <= FACE_MAX_BOX_DIFF


@needs_dali
async def test_ocr_texts_identical(model_cache: Path, tmp_path: Path, cpu_pipelines, monkeypatch) -> None:
    from immich_trt.models.ocr import DET_INPUT_U8, TextDetector, TextRecognizer, det_resize_shape

    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA_REASON)
    ctx, runtime = _context(model_cache, tmp_path)
    detector = TextDetector("PP-OCRv5_mobile", ctx)
    # every line read (minScore 0), then filtered at the score the Immich server sends (0.8)
    recognizer = TextRecognizer("PP-OCRv5_mobile", ctx, minScore=0.0)
    await detector.load()
    await recognizer.load()

    def dali_preprocess(image):
        if image.width < 32 or image.height < 32:
            return None  # TextDetector._preprocess's early exit for tiny images
        width, height = det_resize_shape(image.width, image.height, detector.max_resolution)
        return cpu_pipelines(D.OCR_DETECTION, {}, image.info[FILE_BYTES], (height, width))[DET_INPUT_U8][None]

    def texts(result) -> list[str]:
        return [t for t, score in zip(result["text"], result["textScore"]) if score > IMMICH_MIN_TEXT_SCORE]

    results = {}
    for name, data in _images("ocr"):
        image = decoded(data)
        reference = await recognizer.predict(image, await detector.predict(image))
        with monkeypatch.context() as m:
            m.setattr(detector, "_preprocess", dali_preprocess)
            dali = await recognizer.predict(image, await detector.predict(image))
        results[name] = (reference, dali, image.size)
    await runtime.stop()

    same = [name for name, (ref, dali, _) in results.items() if texts(dali) == texts(ref)]
    all_lines = [name for name, (ref, dali, _) in results.items() if dali["text"] == ref["text"]]
    boxes = [
        float(np.abs((dali["box"] - ref["box"]).reshape(-1, 2) * size).max())
        for ref, dali, size in results.values()
        if len(ref["box"]) and dali["box"].shape == ref["box"].shape
    ]
    lines = sum(len(texts(ref)) for ref, _, _ in results.values())
    print(
        f"\nOCR: texts (score > {IMMICH_MIN_TEXT_SCORE}) identical on {len(same)}/{len(results)} images "
        f"({lines} lines); "
        f"every line read, whatever its score, identical on {len(all_lines)}/{len(results)}; "
        f"max box corner diff {max(boxes):.0f} px"
    )
    assert lines > 0
    assert len(same) == len(results), sorted(set(results) - set(same))


# --------------------------------------------------- face alignment and text lines

#: ``aligned_faces`` against ``norm_crop`` + ``recognition_blob``, in grey levels: cv2's
#: warpAffine quantizes source coordinates to 1/32 px and weights to 15 bits, DALI's
#: warp_affine interpolates in float [max 6, mean 0.20].
FACE_ALIGN_MAX_LEVELS = 8
FACE_ALIGN_MEAN_LEVELS = 0.3
FACE_MIN_COSINE = 0.995
#: ``text_lines`` against ``crop_text_line`` + ``line_tensor``, in grey levels: Pillow's
#: perspective transform interpolates with Keys' cubic at a = -1, DALI's
#: warp_perspective at a = -0.75 (OpenCV's), which differ on slanted lines [max 18,
#: mean 1.35, on a slanted line of th_rec.jpg].
TEXT_LINE_MAX_LEVELS = 24
TEXT_LINE_MEAN_LEVELS = 2.0


@needs_dali
def test_face_alignment_parity(real_images) -> None:
    from immich_trt.models.face import norm_crop, recognition_blob
    from immich_trt.models.transforms import to_bgr

    pipe = D.cpu_pipeline(D.FACE_RECOGNITION, D.arcface_params(127.5, 127.5))
    rows = []
    for index, (name, data, image) in enumerate(real_images):
        landmarks = _landmarks(image.width, image.height, 6, index)
        (out,) = D.feed_and_run(pipe, D.FACE_RECOGNITION, [data], inputs=[{"face_landmarks": landmarks}])
        bgr = to_bgr(image)
        reference = recognition_blob([norm_crop(bgr, lmk) for lmk in landmarks], 127.5, 127.5)
        assert out["aligned_faces"].shape == reference.shape == (6, 3, 112, 112)
        diff = np.abs(out["aligned_faces"] - reference) * 127.5
        rows.append((name, float(diff.max()), float(diff.mean())))
    _report("aligned faces (grey levels)", rows)
    assert max(r[1] for r in rows) <= FACE_ALIGN_MAX_LEVELS
    assert max(r[2] for r in rows) <= FACE_ALIGN_MEAN_LEVELS


@needs_dali
def test_alignment_matrices_are_estimate_norms_inverse_in_dali_coordinates() -> None:
    """The closed form in DALI arithmetic against scikit-image's Umeyama (float32
    inputs there), mapped back to cv2's coordinates: equal within float32 precision."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    from immich_trt.models.face import estimate_norm

    landmarks = _landmarks(4000, 3000, 64, 7)
    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None, **D.SYNCHRONOUS)
    with pipe:
        pipe.set_outputs(D.alignment_matrices(fn.external_source(name="lm", dtype=types.FLOAT, ndim=3)))
    pipe.build()
    pipe.feed_input("lm", [landmarks])
    inverse = np.array(pipe.run()[0][0], np.float64)
    for matrix, landmark in zip(inverse, landmarks):
        forward = np.vstack([estimate_norm(landmark), [0, 0, 1]])
        expected = np.linalg.inv(forward)[:2]
        expected[:, 2] += 0.5 - expected[:, :2] @ [0.5, 0.5]  # pixel centres at +0.5
        np.testing.assert_allclose(matrix, expected, rtol=2e-5, atol=2e-3)


@needs_dali
async def test_face_embeddings_agree(real_images, model_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """The test pack's ArcFace on DALI-aligned faces against the CPU path's, through
    ``FaceRecognizer`` (its CPU preprocessing replaced by the pipeline's tensor)."""
    import orjson

    from immich_trt.models.face import FaceRecognizer

    ctx, runtime = _context(model_cache, tmp_path)
    recognizer = FaceRecognizer("buffalo_l", ctx)
    await recognizer.load()
    params = D.arcface_params(recognizer.mean, recognizer.std)
    pipe = D.cpu_pipeline(D.FACE_RECOGNITION, params)

    def dali_crops(image, landmarks):
        inputs = [{"face_landmarks": np.asarray(landmarks, np.float32)}]
        (out,) = D.feed_and_run(pipe, D.FACE_RECOGNITION, [image.info[FILE_BYTES]], inputs=inputs)
        return {recognizer.input_name: out["aligned_faces"]}

    cosines = []
    for index, (name, _, image) in enumerate(real_images):
        landmarks = _landmarks(image.width, image.height, 4, 100 + index)
        faces = {"boxes": np.zeros((4, 4), np.float32), "scores": np.ones(4, np.float32), "landmarks": landmarks}
        reference = await recognizer.predict(image, faces)
        with monkeypatch.context() as m:
            m.setattr(recognizer, "_crops", dali_crops)
            dali = await recognizer.predict(image, faces)
        for ref, got in zip(reference, dali):
            a, b = (np.array(orjson.loads(x["embedding"]), np.float64) for x in (ref, got))
            cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    await runtime.stop()
    print(f"\nArcFace embedding cosine: min {min(cosines):.7f} over {len(cosines)} faces")
    assert len(cosines) >= 100
    assert min(cosines) >= FACE_MIN_COSINE


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@needs_dali
async def test_ocr_text_lines_and_texts_agree(model_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """PP-OCRv5 on every OCR image, the recognizer's input made by the pipeline from
    the CPU path's boxes: tensors within the tolerances; texts (score > 0.8) identical
    on all images but japan.jpg, where two of its 11 lines differ by one character (an
    ideographic space read between two words, a final full stop dropped), at
    scores 0.96-0.99 on both paths: the bicubic kernels differ (see the tolerances)."""
    from immich_trt.models.ocr import TextDetector, TextRecognizer, line_inputs

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    ctx, runtime = _context(model_cache, tmp_path)
    detector = TextDetector("PP-OCRv5_mobile", ctx)
    recognizer = TextRecognizer("PP-OCRv5_mobile", ctx, minScore=0.0)
    await detector.load()
    await recognizer.load()
    pipe = D.cpu_pipeline(D.OCR_RECOGNITION, {})
    reference_input = recognizer._batch_input
    rows: list[tuple[str, float, float]] = []

    def dali_input(image, geometry, batch):
        inputs = [{k: v[0] for k, v in line_inputs(geometry, batch).items()}]
        (out,) = D.feed_and_run(pipe, D.OCR_RECOGNITION, [image.info[FILE_BYTES]], inputs=inputs)
        reference = reference_input(image, geometry, batch)["x"]
        assert out["text_lines"].shape == reference.shape
        diff = np.abs(out["text_lines"] - reference) * 127.5
        rows.append((f"{image.info['test.name']} ({len(batch.indices)} lines)", float(diff.max()), float(diff.mean())))
        return {"x": out["text_lines"]}

    def texts(result) -> list[str]:
        return [t for t, score in zip(result["text"], result["textScore"]) if score > IMMICH_MIN_TEXT_SCORE]

    differing: dict[str, list[tuple[str, str]]] = {}
    images = 0
    for name, data in _images("ocr"):
        image = decoded(data)
        image.info["test.name"] = name
        detection = await detector.predict(image)
        reference = await recognizer.predict(image, detection)
        with monkeypatch.context() as m:
            m.setattr(recognizer, "_batch_input", dali_input)
            dali = await recognizer.predict(image, detection)
        images += len(detection["boxes"]) > 0
        if texts(dali) != texts(reference):
            differing[name] = [(a, b) for a, b in zip(texts(reference), texts(dali)) if a != b]
            assert len(texts(dali)) == len(texts(reference)), name
    await runtime.stop()
    _report("text lines (grey levels)", rows)
    print(f"OCR texts identical on {images - len(differing)}/{images} images; differing lines: {differing}")
    assert images >= 13
    assert max(r[1] for r in rows) <= TEXT_LINE_MAX_LEVELS
    assert max(r[2] for r in rows) <= TEXT_LINE_MEAN_LEVELS
    assert set(differing) <= {"ocr/japan.jpg"}
    assert all(_edit_distance(a, b) <= 1 for lines in differing.values() for a, b in lines)
