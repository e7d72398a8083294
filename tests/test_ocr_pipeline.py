"""Pre/post-processing steps of the OCR pipeline, each on inputs with known answers."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from immich_trt.models.base import ModelLoadError
from immich_trt.models.ocr import (
    DET_BUCKETS,
    CTCLabelDecode,
    DBPostProcess,
    bucket,
    crop_text_lines,
    det_preprocess,
    det_resize_shape,
    filter_det_res,
    order_points_clockwise,
    pad_to_bucket,
    read_characters,
    rec_batches,
    resize_norm_img,
    sorted_boxes,
)


@pytest.mark.parametrize(
    ("size", "max_res", "expected"),
    [
        ((1920, 1440), 736, (992, 736)),  # landscape preview: shorter side bounded
        ((1440, 1920), 736, (736, 992)),
        ((323, 430), 736, (320, 416)),  # never upscaled; /32 rounding half-to-even
        ((3000, 40), 736, (3008, 32)),  # 93.75 -> 94, 1.25 -> 1
        ((80, 80), 736, (64, 64)),  # round(2.5) == 2: Python rounds half to even
        ((4000, 3000), 100, (128, 96)),  # shorter side 3000 -> 100, longer 133 -> 128
    ],
)
def test_det_resize_shape(size, max_res, expected) -> None:
    assert det_resize_shape(*size, max_res) == expected


def test_det_preprocess_is_immichs_normalisation() -> None:
    image = Image.new("RGB", (64, 32), (255, 0, 128))
    tensor = det_preprocess(image, 736)
    assert tensor.shape == (1, 3, 32, 64) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    scale = np.float32(1.0) / np.float32(127.5)
    # BGR order; (x - 0.5) * float32(1/127.5), Immich's quirk (not (x - 127.5) / 127.5)
    assert tensor[0, 0, 0, 0] == (np.float32(128) - np.float32(0.5)) * scale
    assert tensor[0, 1, 0, 0] == (np.float32(0) - np.float32(0.5)) * scale
    assert tensor[0, 2, 0, 0] == (np.float32(255) - np.float32(0.5)) * scale


def test_bucket_ladder() -> None:
    assert bucket(320, DET_BUCKETS, 512) == 512
    assert bucket(736, DET_BUCKETS, 512) == 768
    assert bucket(2048, DET_BUCKETS, 512) == 2048
    assert bucket(2049, DET_BUCKETS, 512) == 2560
    padded = pad_to_bucket(np.ones((1, 736, 992, 3), np.uint8))
    assert padded.shape == (1, 768, 1024, 3)
    assert padded[:, :736, :992].min() == 1 and padded[:, 736:].max() == 0 and padded[:, :, 992:].max() == 0


def test_db_postprocess_finds_a_rectangle() -> None:
    """A 20x60 block of probability 0.9 at (x=40, y=30) in a 100x200 map, original
    image 200x400 (scale 2): one box, unclipped, in original pixel coordinates."""
    pred = np.zeros((1, 1, 100, 200), np.float32)
    pred[0, 0, 30:50, 40:100] = 0.9
    boxes, scores = DBPostProcess(box_thresh=0.5)(pred, (200, 400))
    assert boxes.shape == (1, 4, 2) and boxes.dtype == np.float32
    (tl, tr, br, bl) = boxes[0]
    assert tl[0] == bl[0] and tr[0] == br[0] and tl[1] == tr[1] and bl[1] == br[1]  # axis-aligned, clockwise
    # unclip by area*1.6/perimeter grows the (dilated 21x61) box on every side
    assert tl[0] < 80 and tl[1] < 60 and br[0] > 200 and br[1] > 100
    # fast score: mean over the 21x61 dilated rectangle, whose last row/column is 0
    assert scores[0] == pytest.approx(0.9 * (20 * 60) / (21 * 61), rel=1e-6)


def test_db_postprocess_threshold_and_min_size() -> None:
    pred = np.zeros((1, 1, 100, 200), np.float32)
    pred[0, 0, 10:30, 10:80] = 0.4  # above thresh 0.3, mean 0.4 < box_thresh
    pred[0, 0, 60:62, 100:180] = 0.95  # 2 px tall (3 after dilation): dropped as too small
    boxes, scores = DBPostProcess(box_thresh=0.5)(pred, (100, 200))
    assert len(boxes) == 0 and scores == []
    boxes, _ = DBPostProcess(box_thresh=0.35)(pred, (100, 200))
    assert len(boxes) == 1


def test_order_points_clockwise() -> None:
    pts = np.array([[10, 50], [90, 10], [10, 10], [90, 50]], np.int32)
    assert order_points_clockwise(pts).tolist() == [[10, 10], [90, 10], [90, 50], [10, 50]]


def test_filter_det_res_clips_and_drops_thin_boxes() -> None:
    boxes = np.array(
        [[[-5, -5], [120, -5], [120, 30], [-5, 30]], [[0, 0], [3, 0], [3, 40], [0, 40]]], np.int32
    )
    kept, scores = filter_det_res(boxes, [0.9, 0.8], img_h=20, img_w=100)
    assert kept.tolist() == [[[0, 0], [99, 0], [99, 19], [0, 19]]]
    assert scores == [0.9]


def test_sorted_boxes_reproduces_upstream_line_indexing() -> None:
    """Upstream indexes line ids by the y order twice; with boxes A(y=100), B(y=0),
    C(y=105) the sort keys become A: line0, B: line1, C: line1 -> A first, then B, C
    by x, although B is the top line."""

    def box(x, y):
        return [[x, y], [x + 10, y], [x + 10, y + 5], [x, y + 5]]

    boxes = np.array([box(50, 100), box(5, 0), box(0, 105)], np.float32)
    out = sorted_boxes(boxes)
    assert [b[0].tolist() for b in out] == [[50, 100], [0, 105], [5, 0]]


def test_crop_of_an_axis_aligned_box_is_exact_and_tall_crops_rotate() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    wide = np.array([[[10, 20], [50, 20], [50, 30], [10, 30]]], np.float32)
    tall = np.array([[[5, 5], [15, 5], [15, 45], [5, 45]]], np.float32)
    (crop,) = crop_text_lines(image, wide)
    assert crop.shape == (10, 40, 3)
    # float32 SVD homography + PIL truncation: within one grey level of the exact slice
    assert np.abs(crop.astype(int) - pixels[20:30, 10:50, ::-1]).max() <= 1  # BGR
    (rotated,) = crop_text_lines(image, tall)
    assert rotated.shape == (10, 40, 3)  # 10x40 crop rotated 90 degrees counter-clockwise
    assert np.abs(rotated.astype(int) - np.rot90(pixels[5:45, 5:15, ::-1])).max() <= 1


def test_resize_norm_img_pads_with_zero_on_the_right() -> None:
    img = np.full((24, 48, 3), 255, np.uint8)  # ratio 2 -> 96 px wide at height 48
    out = resize_norm_img(img, 320 / 48)
    assert out.shape == (3, 48, 320) and out.dtype == np.float32
    assert np.all(out[:, :, :96] == 1.0) and np.all(out[:, :, 96:] == 0.0)
    assert resize_norm_img(img, 320 / 48, width=480).shape == (3, 48, 480)


def test_rec_batches_sort_by_aspect_and_pad_to_the_widest() -> None:
    crops = [np.zeros((48, w, 3), np.uint8) for w in (480, 100, 960, 200)]  # ratios 10, 2.1, 20, 4.2
    batches = rec_batches(crops, batch_size=2)
    assert [idx.tolist() for idx, _ in batches] == [[1, 3], [0, 2]]
    assert batches[0][1].shape == (2, 3, 48, 320)
    assert batches[1][1].shape == (2, 3, 48, 960)
    bucketed = rec_batches(crops, batch_size=2, buckets=True)
    assert [b.shape[-1] for _, b in bucketed] == [320, 960]
    assert rec_batches([np.zeros((48, 700, 3), np.uint8)], 6, buckets=True)[0][1].shape[-1] == 960


def test_ctc_decode_collapses_repeats_and_blanks() -> None:
    vocab = ["a", "b"]  # indices: 0 blank, 1 a, 2 b, 3 space
    steps = [1, 1, 0, 1, 2, 2, 3, 0]  # a a - a b b _ -  -> "aab "
    probs = [0.9, 0.8, 0.99, 0.7, 0.6, 0.5, 0.123456, 0.9]
    preds = np.zeros((1, len(steps), 4), np.float32)
    for t, (k, p) in enumerate(zip(steps, probs)):
        preds[0, t, k] = p
    ((text, score),) = CTCLabelDecode(vocab)(preds)
    assert text == "aab "
    kept = [0.9, 0.7, 0.6, 0.12346]  # first of each run, blanks dropped, 5 decimals
    assert score == round(float(np.mean(kept)), 5)


def test_ctc_decode_of_only_blanks_is_empty_with_zero_score() -> None:
    preds = np.zeros((1, 5, 4), np.float32)
    preds[0, :, 0] = 1.0
    assert CTCLabelDecode(["a", "b"])(preds) == [("", 0.0)]


def _tiny_onnx(path: Path, metadata: dict[str, str] | None = None) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def test_characters_from_onnx_metadata_or_dict_file(tmp_path: Path) -> None:
    with_meta = tmp_path / "a" / "model.onnx"
    with_meta.parent.mkdir()
    _tiny_onnx(with_meta, {"character": "甲\n乙\nc"})
    assert read_characters(with_meta) == ["甲", "乙", "c"]

    with_dict = tmp_path / "b" / "model.onnx"
    with_dict.parent.mkdir()
    _tiny_onnx(with_dict)
    (with_dict.parent / "characters.txt").write_text("x\ny\n", encoding="utf-8")
    assert read_characters(with_dict) == ["x", "y"]

    bare = tmp_path / "c" / "model.onnx"
    bare.parent.mkdir()
    _tiny_onnx(bare)
    with pytest.raises(ModelLoadError, match="no 'character' metadata"):
        read_characters(bare)

    corrupt = tmp_path / "d" / "model.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError) as info:
        read_characters(corrupt)
    assert info.value.corrupt


def test_ctc_reduced_model_decodes_exactly_like_the_full_softmax(ocr_cache: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from immich_trt.models.ocr import CTC_INDEX, CTC_PROB, ctc_reduced_model

    src = ocr_cache / "ocr" / "PP-OCRv5_mobile" / "recognition" / "model.onnx"
    reduced = ctc_reduced_model(src, tmp_path / "model.onnx")
    x = np.random.default_rng(3).uniform(-1, 1, (3, 3, 48, 480)).astype(np.float32)
    full = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    index, prob = ort.InferenceSession(str(reduced), providers=["CPUExecutionProvider"]).run(
        [CTC_INDEX, CTC_PROB], {"x": x}
    )
    np.testing.assert_array_equal(index, full.argmax(axis=2))
    np.testing.assert_array_equal(prob, full.max(axis=2))
    decoder = CTCLabelDecode(read_characters(src))
    assert decoder.decode(index, prob) == decoder(full)
    assert ctc_reduced_model(src, tmp_path / "model.onnx") == reduced  # reused while up to date


def test_uint8_detector_graph_normalises_exactly_like_numpy(ocr_cache: Path, tmp_path: Path) -> None:
    """The served detector (uint8 RGB NHWC in, normalisation inside) gives bit-identical
    probabilities to the original graph fed with det_preprocess's float32 tensor."""
    import onnxruntime as ort

    from immich_trt.models.ocr import DET_INPUT_U8, det_normalise, det_uint8_model

    src = ocr_cache / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx"
    served = det_uint8_model(src, tmp_path / "model.onnx")
    pixels = np.random.default_rng(5).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    full = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": det_normalise(pixels)})[0]
    ours = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"]).run(None, {DET_INPUT_U8: pixels})[0]
    np.testing.assert_array_equal(ours, full)
    assert det_uint8_model(src, tmp_path / "model.onnx") == served
    assert (tmp_path / "model.onnx.source").read_text().startswith(str(src.resolve()))


def test_line_batches_follow_the_processing_and_other_heights_keep_lines_on_the_cpu(tmp_path: Path) -> None:
    """``line_batches`` (the GPU path's grouping) and ``rec_batches`` (the CPU path's)
    agree for a recognizer of another line height and minimum width; such a recognizer
    asks for no ensemble, since the device pipeline makes 48 px lines only."""
    from immich_trt.models.base import ModelContext
    from immich_trt.models.ocr import RecognitionProcessing, TextRecognizer, line_batches
    from immich_trt.tools.testing import offline_settings

    crops = [np.zeros((h, w, 3), np.uint8) for h, w in ((20, 50), (30, 400), (10, 15))]
    processing = RecognitionProcessing(32, 100)
    lines = line_batches(np.array([crop.shape[:2] for crop in crops]), 2, processing=processing)
    tensors = rec_batches(crops, 2, processing=processing)
    assert [list(b.indices) for b in lines] == [list(indices) for indices, _ in tensors] == [[2, 0], [1]]
    assert [b.width for b in lines] == [100, 426]  # min_width 100; int(32 * 400 / 30)
    assert [t.shape for _, t in tensors] == [(2, 3, 32, 100), (1, 3, 32, 426)]

    recognizer = TextRecognizer("PP-OCRv5_mobile", ModelContext(settings=offline_settings(tmp_path)))
    assert recognizer.gpu_lines and recognizer._spec().from_encoded_image
    recognizer.processing = processing
    assert not recognizer.gpu_lines and not recognizer._spec().from_encoded_image
