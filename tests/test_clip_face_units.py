"""CLIP and face pre/post-processing steps against hand-computed expectations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from immich_trt.models.base import ModelContext
from immich_trt.models.clip import (
    ClipTextualEncoder,
    clean_text,
    clip_preprocess,
    crop_pil,
    flores_code,
    resize_pil,
    serialize_np,
)
from immich_trt.models.face import (
    ARCFACE_DST,
    FaceRecognizer,
    anchor_centers,
    arcface_normalisation,
    distance2bbox,
    distance2kps,
    dynamic_batch_copy,
    estimate_norm,
    letterbox,
    nms,
    norm_crop,
    recognition_blob,
)
from immich_trt.runtime.onnxruntime import OnnxRuntime
from immich_trt.tools import testpack as tp
from immich_trt.tools.testing import offline_settings

# ---------------------------------------------------------------------------- CLIP


def test_serialize_np_is_shortest_float32() -> None:
    assert serialize_np(np.array([0.1, 690, -1 / 3], np.float32)) == "[0.1,690.0,-0.33333334]"


@pytest.mark.parametrize(
    ("size", "expected"),
    [((300, 200), (336, 224)), ((200, 300), (224, 336)), ((225, 1000), (224, 995)), ((224, 224), (224, 224))],
)
def test_resize_pil_truncates_the_longer_side(size, expected) -> None:
    assert resize_pil(Image.new("RGB", size), 224).size == expected


def test_crop_pil_is_centred_with_truncation() -> None:
    image = Image.fromarray(np.arange(336 * 224 * 3, dtype=np.uint32).reshape(224, 336, 3).astype(np.uint8))
    cropped = crop_pil(image, 224)
    assert cropped.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[:, 56:280])  # left = int(168 - 112)


def test_clip_preprocess_normalises_per_channel() -> None:
    mean = np.array([0.5, 0.25, 0.0], np.float32)
    std = np.array([0.5, 0.25, 1.0], np.float32)
    x = clip_preprocess(Image.new("RGB", (320, 240), (255, 0, 51)), 224, mean, std)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 100, 100], [1.0, -1.0, 0.2], rtol=1e-6)


def test_clean_text() -> None:
    assert clean_text("  a\n photo\tof  a cat ") == "a photo of a cat"
    assert clean_text("Hello, World! It's_me", canonicalize=True) == "hello world itsme"


@pytest.mark.parametrize(
    ("code", "flores"), [("de", "deu_Latn"), ("de-CH", "deu_Latn"), ("zh-TW", "zho_Hant"), ("en-null", "eng_Latn"), ("xx", "eng_Latn")]
)
def test_flores_code(code: str, flores: str) -> None:
    assert flores_code(code) == flores


@pytest.fixture(scope="module")
def clip_pack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip-pack")
    tp.make_test_pack(path, face_models=())
    return path


def textual(cache: Path, **settings_changes) -> ClipTextualEncoder:
    ctx = ModelContext(offline_settings(cache, **settings_changes), runtime=None)  # type: ignore[arg-type]
    encoder = ClipTextualEncoder("ViT-B-32__openai", ctx)
    encoder._read_config()
    return encoder


def test_openclip_tokenize_pads_to_the_context_length(clip_pack: Path) -> None:
    feed = textual(clip_pack).tokenize("a   photo of a cat")
    assert list(feed) == ["text"] and feed["text"].dtype == np.int32 and feed["text"].shape == (1, 77)
    assert feed["text"][0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_mclip_feed_has_ids_and_attention_mask(clip_pack: Path) -> None:
    encoder = textual(clip_pack)
    encoder.mclip = True
    feed = encoder.tokenize("hello world")
    assert list(feed) == ["input_ids", "attention_mask"]
    assert feed["attention_mask"][0].tolist() == [1] * 4 + [0] * 73


def test_nllb_language_prefix_and_the_upstream_parity_switch(clip_pack: Path) -> None:
    encoder = textual(clip_pack)
    encoder.model_name = "nllb-clip-base-siglip__v1"
    prefixed = encoder.tokenize("hund am strand", language="de")["text"]
    assert np.array_equal(prefixed, encoder.tokenize("deu_Latnhund am strand")["text"])
    assert not np.array_equal(prefixed, encoder.tokenize("hund am strand")["text"])
    parity = textual(clip_pack, clip_language_prefix=False)
    parity.model_name = "nllb-clip-base-siglip__v1"
    assert np.array_equal(parity.tokenize("hund am strand", language="de")["text"], encoder.tokenize("hund am strand")["text"])
    plain = textual(clip_pack)  # not an NLLB model: the language never changes the text
    assert np.array_equal(plain.tokenize("x", language="de")["text"], plain.tokenize("x")["text"])


# --------------------------------------------------------------------------- faces


def test_letterbox_top_left() -> None:
    canvas, scale = letterbox(np.full((960, 1280, 3), 200, np.uint8))
    assert scale == 0.5 and canvas.shape == (640, 640, 3)
    assert canvas[:480].min() == 200 and canvas[480:].max() == 0
    canvas, scale = letterbox(np.full((640, 480, 3), 200, np.uint8))
    assert scale == 1.0 and canvas[:, :480].min() == 200 and canvas[:, 480:].max() == 0


def test_anchor_centres_repeat_per_anchor_row_major() -> None:
    centres = anchor_centers(2, 3, 8)
    assert centres.tolist()[:8] == [[0, 0], [0, 0], [8, 0], [8, 0], [16, 0], [16, 0], [0, 8], [0, 8]]
    assert centres.shape == (12, 2)


def test_distance_decoding() -> None:
    points = np.array([[16.0, 32.0]], np.float32)
    assert distance2bbox(points, np.array([[1, 2, 3, 4]], np.float32)).tolist() == [[15, 30, 19, 36]]
    assert distance2kps(points, np.array([[1, 2, -1, -2, 0, 0, 5, 5, -5, 5]], np.float32)).tolist() == [
        [17, 34, 15, 30, 16, 32, 21, 37, 11, 37]
    ]


def test_nms_uses_plus_one_areas_and_keeps_iou_at_most_0_4() -> None:
    # areas 10x10 = 100; overlap 5x10 = 50 -> IoU 1/3 (kept); 6x10 = 60 -> 0.4286 (dropped)
    dets = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.8], [4, 0, 13, 9, 0.7], [100, 100, 109, 109, 0.6]], np.float32)
    assert nms(dets) == [0, 1, 3]


def test_estimate_norm_recovers_a_similarity_transform() -> None:
    np.testing.assert_allclose(estimate_norm(ARCFACE_DST.copy()), [[1, 0, 0], [0, 1, 0]], atol=1e-5)
    landmarks = (ARCFACE_DST * 2 + np.array([10, 20], np.float32)).astype(np.float32)
    np.testing.assert_allclose(estimate_norm(landmarks), [[0.5, 0, -5], [0, 0.5, -10]], atol=1e-5)


def test_norm_crop_with_template_landmarks_is_the_top_left_corner() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    crop = norm_crop(image, ARCFACE_DST.copy())
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - image[:112, :112]).max() <= 1


def test_recognition_blob_is_rgb_scaled_by_127_5() -> None:
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # blue in BGR
    blob = recognition_blob([crop, crop], 127.5, 127.5)
    assert blob.shape == (2, 3, 112, 112) and blob.dtype == np.float32
    assert blob[0, 2, 0, 0] == 1.0 and blob[0, 0, 0, 0] == -1.0  # blue lands in channel 2 (RGB)


def test_arcface_normalisation_from_the_first_node_names(tmp_path: Path) -> None:
    plain, mxnet = tmp_path / "plain.onnx", tmp_path / "mxnet.onnx"
    onnx.save(tp.arcface_model(), str(plain))
    onnx.save(tp.arcface_model(mxnet_normalisation=True), str(mxnet))
    assert arcface_normalisation(plain) == (127.5, 127.5)
    assert arcface_normalisation(mxnet) == (0.0, 1.0)


def test_dynamic_batch_copy_leaves_the_original_alone(tmp_path: Path) -> None:
    model = tp.arcface_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].ClearField("dim_param")
        value.type.tensor_type.shape.dim[0].dim_value = 1
    src, dest = tmp_path / "model.onnx", tmp_path / "engines" / "model.onnx"
    onnx.save(model, str(src))
    before = src.read_bytes()
    dynamic_batch_copy(src, dest)
    assert src.read_bytes() == before
    copy = onnx.load(str(dest))
    assert copy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert copy.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


class CountingRuntime(OnnxRuntime):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def infer(self, name, inputs, outputs=None):
        self.batches.append(len(next(iter(inputs.values()))))
        return await super().infer(name, inputs, outputs)


@pytest.mark.parametrize(("batch_size", "calls"), [(None, [3]), (2, [2, 1]), (1, [1, 1, 1])])
async def test_recognizer_batches_all_faces_or_chunks(tmp_path: Path, batch_size, calls) -> None:
    tp.make_test_pack(tmp_path, clip_models=())
    runtime = CountingRuntime()
    settings = dataclasses.replace(
        offline_settings(tmp_path), max_batch_size_facial_recognition=batch_size, engines_dir=tmp_path / "engines"
    )
    recognizer = FaceRecognizer("buffalo_l", ModelContext(settings, runtime))
    await recognizer.load()
    landmarks = np.stack([ARCFACE_DST + offset for offset in (0, 40, 80)]).astype(np.float32)
    faces = {
        "boxes": np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12]], np.float32),
        "scores": np.array([0.9, 0.8, 0.75], np.float32),
        "landmarks": landmarks,
    }
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 240, 3), dtype=np.uint8))
    out = await recognizer.predict(image, faces)
    assert runtime.batches == calls
    assert [f["boundingBox"] for f in out] == [
        {"x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0},
        {"x1": 1.0, "y1": 1.0, "x2": 11.0, "y2": 11.0},
        {"x1": 2.0, "y1": 2.0, "x2": 12.0, "y2": 12.0},
    ]
    assert all(len(json.loads(f["embedding"])) == 512 for f in out)
    await runtime.stop()


async def test_clip_model_with_the_wrong_dimension_fails_to_load(tmp_path: Path) -> None:
    """RN50__openai is 1024-d for Immich's server; a 512-d file under that name is refused."""
    from immich_trt.models.base import ModelLoadError
    from immich_trt.models.clip import ClipVisualEncoder

    tp.make_test_pack(tmp_path, face_models=())
    (tmp_path / "clip" / "ViT-B-32__openai").rename(tmp_path / "clip" / "RN50__openai")
    runtime = OnnxRuntime()
    encoder = ClipVisualEncoder("RN50__openai", ModelContext(offline_settings(tmp_path), runtime))
    with pytest.raises(ModelLoadError, match="512-d embeddings; Immich expects 1024"):
        await encoder.load()
    await runtime.stop()


def test_batched_and_unbatched_detector_layouts_agree(tmp_path: Path) -> None:
    import onnxruntime as ort

    from immich_trt.models.face import ScrfdLayout, scrfd_postprocess

    image = np.zeros((640, 640, 3), np.uint8)
    image[192:224, 320:352] = 255
    blob = tp.scrfd_blob(image)
    results = []
    for batched in (False, True):
        session = ort.InferenceSession(tp.scrfd_model(batched=batched).SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"input.1": blob})
        layout = ScrfdLayout([o.name for o in session.get_outputs()], batched=batched)
        results.append(scrfd_postprocess(outputs, layout, (640, 640), 1.0, 0.7))
    for key in ("boxes", "scores", "landmarks"):
        np.testing.assert_array_equal(results[0][key], results[1][key])
    assert results[0]["boxes"].tolist() == [[288.0, 160.0, 384.0, 256.0]]


@pytest.mark.parametrize("name", ["buffalo_s", "buffalo_m", "antelopev2"])
async def test_every_insightface_pack_loads_and_detects(tmp_path: Path, name: str) -> None:
    from immich_trt.models.face import FaceDetector

    tp.make_test_pack(tmp_path, clip_models=(), face_models=(name,))
    runtime = OnnxRuntime()
    detector = FaceDetector(name, ModelContext(offline_settings(tmp_path), runtime), minScore=0.7)
    await detector.load()
    image = np.zeros((640, 640, 3), np.uint8)
    image[192:224, 320:352] = 255
    faces = await detector.predict(Image.fromarray(image))
    assert faces["boxes"].tolist() == [[288.0, 160.0, 384.0, 256.0]]
    await runtime.stop()
