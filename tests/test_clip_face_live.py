"""CLIP and faces over HTTP through `immich-trt serve` and the real Triton server, with
the test pack: boxes and landmarks equal the detector's analytic truth, embeddings
equal a direct onnxruntime run of the same model on the same preprocessed tensor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import SHARED_DATA, requires_data
from immich_trt.contract import (
    CLIP_MODEL,
    clip_textual_entries,
    clip_visual_entries,
    face_detection_entries,
    face_entries,
    ocr_entries,
    predict,
)
from immich_trt.models.clip import clip_preprocess
from immich_trt.models.face import norm_crop, recognition_blob
from immich_trt.models.transforms import serialize_np
from immich_trt.tools import testpack as tp

CLIP = CLIP_MODEL
FACES = "buffalo_l"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
FACE_ENTRIES = face_entries(FACES)


async def post(url: str, entries: dict, image: bytes | None = None, text: str | None = None) -> tuple[int, dict]:
    status, _, body = await predict(None, url, entries, image=image, text=text)
    return status, json.loads(body) if status == 200 else {"raw": body}


def png(array_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def run(model: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def squares_image(width: int, height: int, squares: list[tuple[int, int, int]], side: int = 32) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for x0, y0, value in squares:
        image[y0 : y0 + side, x0 : x0 + side] = value
    return image


@requires_data
async def test_clip_visual_equals_direct_onnxruntime(live_server, model_cache: Path) -> None:
    data = (SHARED_DATA / "photos" / "silver_fir.jpg").read_bytes()
    status, body = await post(live_server.url, clip_visual_entries(CLIP), data)
    assert status == 200
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert (body["imageWidth"], body["imageHeight"]) == image.size
    expected = run(model_cache / "clip" / CLIP / "visual" / "model.onnx", {"image": clip_preprocess(image, 224, MEAN, STD)})[0]
    assert body["clip"] == serialize_np(expected)
    embedding = np.array(json.loads(body["clip"]), np.float32)
    assert embedding.shape == (512,) and abs(np.linalg.norm(embedding) - 1) < 1e-5


async def test_clip_textual_equals_direct_onnxruntime(live_server, model_cache: Path) -> None:
    status, body = await post(live_server.url, clip_textual_entries(CLIP), text="  a photo\n of a   cat ")
    assert status == 200
    assert set(body) == {"clip"}  # no image dimensions for text
    ids = np.full((1, 77), 49407, np.int32)
    ids[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" (whitespace collapsed)
    expected = run(model_cache / "clip" / CLIP / "textual" / "model.onnx", {"text": ids})[0]
    assert body["clip"] == serialize_np(expected)


async def test_faces_match_the_constructed_truth(live_server, model_cache: Path) -> None:
    """Three 64 px squares on a 1280x960 image: letterboxed to 640x480 (det_scale 0.5,
    an exact 2x2 average), padded to 640x640, then scaled back."""
    squares = [(640, 384, 255), (128, 832, 245), (1152, 64, 240)]
    rgb = squares_image(1280, 960, squares, side=64)
    status, body = await post(live_server.url, FACE_ENTRIES, png(rgb))
    assert status == 200
    assert (body["imageWidth"], body["imageHeight"]) == (1280, 960)
    faces = body["facial-recognition"]
    assert len(faces) == 3
    bgr = rgb[:, :, ::-1].copy()
    recognizer = model_cache / "facial-recognition" / FACES / "recognition" / "model.onnx"
    for face, (x0, y0, value) in zip(faces, squares):
        assert list(face) == ["boundingBox", "embedding", "score"]
        # the letterboxed square sits at (x0, y0) / 2 in the detector input
        box, score, landmarks = tp.square_face(x0 // 2, y0 // 2, value)
        expected_box = np.round(box / np.float32(0.5))
        assert [face["boundingBox"][k] for k in ("x1", "y1", "x2", "y2")] == expected_box.tolist()
        assert face["score"] == pytest.approx(score, abs=1e-5)
        crop = norm_crop(bgr, (landmarks / np.float32(0.5)).astype(np.float32))
        expected = run(recognizer, {"input.1": recognition_blob([crop], 127.5, 127.5)})[0]
        got = np.array(json.loads(face["embedding"]), np.float32)
        assert got.shape == (512,)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


async def test_no_face_gives_an_empty_list(live_server) -> None:
    status, body = await post(live_server.url, FACE_ENTRIES, png(np.zeros((300, 400, 3), np.uint8)))
    assert status == 200
    assert body == {"facial-recognition": [], "imageHeight": 300, "imageWidth": 400}


async def test_face_detection_only_output_shape(live_server) -> None:
    entries = face_detection_entries(FACES)
    status, body = await post(live_server.url, entries, png(squares_image(640, 640, [(320, 192, 255), (64, 448, 245)])))
    assert status == 200
    det = body["facial-recognition"]
    assert list(det) == ["boxes", "scores", "landmarks"]
    assert det["boxes"] == [[288.0, 160.0, 384.0, 256.0], [32.0, 416.0, 128.0, 512.0]]
    assert len(det["scores"]) == 2 and np.array(det["landmarks"]).shape == (2, 5, 2)


@requires_data
async def test_three_tasks_in_one_request(live_server) -> None:
    entries = {**clip_visual_entries(CLIP), **FACE_ENTRIES, **ocr_entries()}
    status, body = await post(live_server.url, entries, (SHARED_DATA / "ocr" / "text_rec.jpg").read_bytes())
    assert status == 200
    assert set(body) == {"clip", "facial-recognition", "ocr", "imageHeight", "imageWidth"}
    assert body["ocr"]["text"] == ["韩国小馆"]
    assert isinstance(body["clip"], str) and len(json.loads(body["clip"])) == 512
    assert body["facial-recognition"] == []
