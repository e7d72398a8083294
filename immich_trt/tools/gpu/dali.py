"""DALI preprocessing pipelines of the GPU target, served by Triton's DALI backend.

Three pipelines take the encoded request bytes (JPEG, PNG, WebP) and produce the tensor
the CPU path computes with Pillow/OpenCV, for the TensorRT model behind them in an
ensemble (per sample; Triton adds the batch axis):

- ``clip_visual``: ``encoded`` UINT8 [-1] -> ``image`` FP32 [3, S, S];
- ``face_detection``: ``encoded`` -> ``input.1`` FP32 [3, 640, 640] and
  ``det_scale`` FP32 [1];
- ``ocr_detection``: ``encoded``, ``resize_hw`` INT32 [2] and ``bucket_hw`` INT32 [2]
  (height, width; computed by the server) -> ``image_u8`` UINT8 [H, W, 3];
- ``face_recognition``: ``encoded`` and ``face_landmarks`` FP32 [N, 5, 2] -> the aligned
  faces ``aligned_faces`` FP32 [N, 3, 112, 112] (:func:`face_recognition_graph`);
- ``ocr_recognition``: ``encoded``, ``line_coefficients`` FP32 [N, 8] and
  ``line_geometry`` INT32 [N, 8] of one recognizer batch -> ``text_lines`` FP32
  [N, 3, 48, W] (:func:`ocr_recognition_graph`).

The recognizers' pipelines decode the image once and cut every face or line from a
sequence of N references to it (``sequence_rearrange``), one sample per request.

Each graph exists for two devices: ``"gpu"`` decodes with nvJPEG (``decoders.image``
on ``device="mixed"``) and resizes/normalises on the GPU, for Triton; ``"cpu"`` is the
same graph on the CPU, which checks it against the reference on machines without a GPU
(:func:`run_cpu`). Geometry (sizes, crop anchors, ``det_scale``) is computed on the CPU
from the file header (``peek_image_shape``) with the reference's float64 operations in
the reference's order, so it is exact.

Reference reproduced (``immich_trt.models``) and how:

- decode: RGB, EXIF orientation not applied (as ``decode_pil``).
- CLIP, ``clip_preprocess``: ``resize_pil`` (shorter side to S, the other
  ``int(long / short * S)``, PIL BICUBIC) done as Pillow does it, a horizontal pass
  rounded to uint8 then a vertical pass (``INTERP_CUBIC`` with antialiasing is Pillow's
  Keys a = -0.5 kernel widened by the downscale factor; one 2-D pass instead differs by
  up to 16 grey levels); ``crop_pil``'s anchor ``int(W/2 - S/2)`` (``slice``);
  ``(x/255 - mean)/std`` as ``(x - 255 mean)/(255 std)``; CHW.
- SCRFD, ``letterbox`` + ``detection_blob``: the new size as ``letterbox``; bilinear
  without antialiasing in one 2-D pass (``cv2.resize`` INTER_LINEAR keeps a
  fixed-point intermediate); zeros at the bottom/right up to the input size;
  ``(x - 127.5)/128``, RGB, CHW; ``det_scale = new_height / height`` as float32.
- OCR, ``det_resize`` + ``pad_to_bucket``: PIL LANCZOS to ``resize_hw``, horizontal then
  vertical pass (``INTERP_LANCZOS3``, antialiased); zeros up to ``bucket_hw``.

Measured (DALI 2.4.0 CPU operators against the reference on the 33 images of the
project's photo and OCR sets that DALI decodes; ``tests/test_dali_parity.py``):

- decode: bit-exact against Pillow for JPEG, PNG and WebP; HEIC/AVIF are not decoded
  (:func:`image_format` tells which bytes to keep on the CPU path).
- CLIP ``image``: max |diff| 0.135 (9 grey levels, at image borders, where Pillow
  renormalises its truncated kernel and DALI repeats the edge pixel; 4 px in, <= 2),
  mean |diff| <= 0.0005; test-model embeddings: cosine >= 0.9999995.
- SCRFD ``input.1``: max |diff| 1/128 (one grey level of cv2's fixed-point rounding),
  mean <= 0.0007; ``det_scale`` and letterbox geometry exact; test-model boxes equal
  on photos and bright-square JPEGs.
- OCR ``image_u8``: max |diff| 5 grey levels (borders), mean <= 0.014; PP-OCRv5 texts
  identical on all 16 OCR images at Immich's recognition score 0.8 (two images differ
  in one line read below it), box corners within 2 px.
- ``aligned_faces`` against ``norm_crop`` + ``recognition_blob``: max 6 grey levels,
  mean <= 0.2 (cv2's warpAffine quantizes coordinates to 1/32 px); test-pack ArcFace
  embeddings cosine >= 0.9999992 over 132 faces (synthetic landmarks on the photos).
- ``text_lines`` against ``crop_text_line`` + ``line_tensor``: max 18 grey levels, mean
  <= 1.35, on slanted lines: Pillow's perspective BICUBIC is Keys' cubic with a = -1,
  ``warp_perspective``'s OpenCV's a = -0.75, and no DALI operator has Pillow's kernel
  (docs/gpu.md); texts identical on 12 of the 13 OCR images with text, japan.jpg
  reading one character differently in two of its lines.

Not measurable without a GPU: nvJPEG's decode may differ from libjpeg-turbo by a grey
level or two (IDCT, chroma upsampling) and the GPU resampling kernels are separate
code; the same tests' tolerances apply there. Serialising a "gpu" pipeline needs CUDA
(:func:`serialize`). DALI is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...models.face import ARCFACE_DST, DET_INPUT_SIZE
from ...models.ocr import DET_INPUT_U8, REC_HEIGHT
from ...runtime.ensemble import (
    BUCKET_HW,
    DET_SCALE_OUTPUT,
    ENCODED_INPUT,
    FACE_LANDMARKS,
    LINE_COEFFICIENTS,
    LINE_GEOMETRY,
    LINE_GEOMETRY_COLUMNS,
    RESIZE_HW,
)
from ...runtime.repository import (
    add_instance_group,
    add_parameters,
    add_tensor,
    config_text,
    model_config,
    write_if_changed,
)

CLIP_VISUAL = "clip_visual"
FACE_DETECTION = "face_detection"
OCR_DETECTION = "ocr_detection"
FACE_RECOGNITION = "face_recognition"
OCR_RECOGNITION = "ocr_recognition"
KINDS = (CLIP_VISUAL, FACE_DETECTION, OCR_DETECTION, FACE_RECOGNITION, OCR_RECOGNITION)
#: Kinds whose one sample (one request) carries several model inputs (faces, text
#: lines) as a sequence: the model behind them takes that sequence as its batch.
SEQUENCE_KINDS = (FACE_RECOGNITION, OCR_RECOGNITION)

#: Tensor names of the GPU contract (the ensembles' own inputs and outputs, shared with
#: the serving side, are those of :mod:`immich_trt.runtime.ensemble`).
CLIP_IMAGE = "image"
SCRFD_INPUT = "input.1"
ALIGNED_FACES = "aligned_faces"
TEXT_LINES = "text_lines"
#: Output names per kind, in pipeline order (the DALI backend maps outputs by position).
OUTPUT_NAMES = {
    CLIP_VISUAL: (CLIP_IMAGE,),
    FACE_DETECTION: (SCRFD_INPUT, DET_SCALE_OUTPUT),
    OCR_DETECTION: (DET_INPUT_U8,),
    FACE_RECOGNITION: (ALIGNED_FACES,),
    OCR_RECOGNITION: (TEXT_LINES,),
}
#: The aligned face's side (insightface ``norm_crop``'s ``image_size``).
ARCFACE_SIZE = 112

#: insightface's detector blob: ``(x - 127.5) / 128`` (``cv2.dnn.blobFromImage`` in
#: :func:`immich_trt.models.face.detection_blob`).
SCRFD_MEAN = 127.5
SCRFD_STD = 128.0

_DALI_MISSING = "NVIDIA DALI is not installed (pip install nvidia-dali-cuda120==2.4.0)"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a DALI model: Triton ``data_type`` and per-sample ``dims``
    (no batch axis; -1 = variable)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown DALI pipeline kind {kind!r}; known: {', '.join(KINDS)}")


def clip_params(size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """Parameters of the ``clip_visual`` pipeline: crop side ``size`` and the per-channel
    ``mean``/``std`` of 0..1 values (``preprocess_cfg.json``, as ``ClipVisualEncoder``)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (RGB)")
    return {"size": int(size), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def arcface_params(mean: float, std: float) -> dict[str, Any]:
    """Parameters of the ``face_recognition`` pipeline: the recognizer's blob
    ``(x - mean) / std`` (``arcface_normalisation``: 127.5/127.5, or 0/1 when the graph
    normalises itself)."""
    return {"mean": float(mean), "std": float(std)}


def _face_input_size(params: Mapping[str, Any]) -> tuple[int, int]:
    width, height = params.get("input_size", DET_INPUT_SIZE)
    return int(width), int(height)


def io_specs(kind: str, params: Mapping[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a pipeline, in the order of the pipeline's outputs.

    ``params``: ``clip_visual`` needs :func:`clip_params`; ``face_detection`` takes
    ``input_size`` (width, height), default :data:`DET_INPUT_SIZE`;
    ``face_recognition`` :func:`arcface_params`; ``ocr_detection`` and
    ``ocr_recognition`` none. Raises ``ValueError`` for an unknown kind."""
    _check_kind(kind)
    encoded = TensorSpec(ENCODED_INPUT, "TYPE_UINT8", (-1,))
    if kind == FACE_RECOGNITION:
        side = ARCFACE_SIZE
        return [encoded, TensorSpec(FACE_LANDMARKS, "TYPE_FP32", (-1, 5, 2))], [
            TensorSpec(ALIGNED_FACES, "TYPE_FP32", (-1, 3, side, side))
        ]
    if kind == OCR_RECOGNITION:
        columns = len(LINE_GEOMETRY_COLUMNS)
        return [
            encoded,
            TensorSpec(LINE_COEFFICIENTS, "TYPE_FP32", (-1, 8)),
            TensorSpec(LINE_GEOMETRY, "TYPE_INT32", (-1, columns)),
        ], [TensorSpec(TEXT_LINES, "TYPE_FP32", (-1, 3, REC_HEIGHT, -1))]
    if kind == CLIP_VISUAL:
        size = int(params["size"])
        return [encoded], [TensorSpec(CLIP_IMAGE, "TYPE_FP32", (3, size, size))]
    if kind == FACE_DETECTION:
        width, height = _face_input_size(params)
        return [encoded], [
            TensorSpec(SCRFD_INPUT, "TYPE_FP32", (3, height, width)),
            TensorSpec(DET_SCALE_OUTPUT, "TYPE_FP32", (1,)),
        ]
    return (
        [encoded, TensorSpec(RESIZE_HW, "TYPE_INT32", (2,)), TensorSpec(BUCKET_HW, "TYPE_INT32", (2,))],
        [TensorSpec(DET_INPUT_U8, "TYPE_UINT8", (-1, -1, 3))],
    )


# ------------------------------------------------------------------------- graphs


def _dali():
    try:
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, types
    except ImportError as exc:
        raise RuntimeError(_DALI_MISSING) from exc
    return fn, types, dmath


def _check_device(device: str) -> None:
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', not {device!r}")


def _encoded_image(device: str, bgr: bool = False):
    """External input ``encoded`` -> (RGB, or BGR, uint8 HWC image on ``device``, its
    height and width as float64 CPU scalars read from the header)."""
    fn, types, _ = _dali()
    encoded = fn.external_source(name=ENCODED_INPUT, device="cpu", dtype=types.UINT8, ndim=1)
    shape = fn.peek_image_shape(encoded, adjust_orientation=False)
    image = fn.decoders.image(
        encoded,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.BGR if bgr else types.RGB,
        adjust_orientation=False,
    )
    height = fn.cast(shape[0], dtype=types.FLOAT64)
    width = fn.cast(shape[1], dtype=types.FLOAT64)
    return image, height, width


def _f64(value: float):
    _, types, _ = _dali()
    return types.Constant(float(value), dtype=types.FLOAT64)


def _as_f64(node):
    """A boolean or integer DALI node as float64 (0.0/1.0 for booleans)."""
    fn, types, _ = _dali()
    return fn.cast(node, dtype=types.FLOAT64)


def _to_f32(node):
    fn, types, _ = _dali()
    return fn.cast(node, dtype=types.FLOAT)


def _pil_resize(image, new_width, new_height, height, interp):
    """Resize as Pillow's ``Image.resize``: horizontal pass to ``new_width`` rounded to
    uint8, then vertical pass to ``new_height`` (antialiased, filter support widened by
    the downscale factor). Sizes are float CPU scalars."""
    fn, _, _ = _dali()
    wide = fn.resize(image, resize_x=new_width, resize_y=height, interp_type=interp, antialias=True)
    return fn.resize(wide, resize_x=new_width, resize_y=new_height, interp_type=interp, antialias=True)


def clip_geometry(height, width, size: int):
    """``(new_width, new_height, left, top)`` float64 DALI scalars of
    ``crop_pil(resize_pil(image, size), size)`` for an image ``height x width``
    (float64 DALI scalars): the same float64 operations as the reference, so exact."""
    _, _, dmath = _dali()
    size64 = _f64(size)
    portrait = _as_f64(width < height)
    landscape = _f64(1.0) - portrait
    new_width = portrait * size64 + landscape * dmath.floor(width / height * size64)
    new_height = portrait * dmath.floor(height / width * size64) + landscape * size64
    half = _f64(size / 2)
    left = dmath.floor(new_width / _f64(2.0) - half)
    top = dmath.floor(new_height / _f64(2.0) - half)
    return new_width, new_height, left, top


def letterbox_geometry(height, width, input_size: tuple[int, int]):
    """``(new_width, new_height, det_scale)`` float64 DALI scalars of
    :func:`immich_trt.models.face.letterbox` into ``input_size`` (width, height), with
    its float64 operations in its order, so exact."""
    _, _, dmath = _dali()
    in_w, in_h = input_size
    im_ratio = height / width
    taller = _as_f64(im_ratio > _f64(float(in_h) / in_w))
    wider = _f64(1.0) - taller
    new_height = taller * _f64(in_h) + wider * dmath.floor(_f64(in_w) * im_ratio)
    new_width = taller * dmath.floor(_f64(in_h) / im_ratio) + wider * _f64(in_w)
    return new_width, new_height, new_height / height


def clip_visual_graph(device: str, params: Mapping[str, Any]) -> list:
    """``encoded`` -> ``image`` float32 [3, S, S], as ``clip_preprocess`` (module docstring)."""
    fn, types, _ = _dali()
    size = int(params["size"])
    mean = np.asarray(params["mean"], dtype=np.float64) * 255.0
    std = np.asarray(params["std"], dtype=np.float64) * 255.0
    image, height, width = _encoded_image(device)
    new_width, new_height, left, top = clip_geometry(height, width, size)
    resized = _pil_resize(image, _to_f32(new_width), _to_f32(new_height), _to_f32(height), types.INTERP_CUBIC)
    anchor = fn.cast(fn.stack(top, left), dtype=types.INT32)
    crop = fn.slice(
        resized,
        anchor,
        types.Constant(np.array([size, size], dtype=np.int32)),
        axes=[0, 1],
        normalized_anchor=False,
        normalized_shape=False,
    )
    normalised = fn.crop_mirror_normalize(
        crop, dtype=types.FLOAT, output_layout="CHW", mean=mean.tolist(), std=std.tolist()
    )
    return [normalised]


def face_detection_graph(device: str, params: Mapping[str, Any]) -> list:
    """``encoded`` -> ``input.1`` float32 [3, h, w] and ``det_scale`` float32 [1], as
    ``letterbox`` + ``detection_blob`` (module docstring)."""
    fn, types, _ = _dali()
    in_w, in_h = _face_input_size(params)
    image, height, width = _encoded_image(device)
    new_width, new_height, det_scale = letterbox_geometry(height, width, (in_w, in_h))
    resized = fn.resize(
        image,
        resize_x=_to_f32(new_width),
        resize_y=_to_f32(new_height),
        interp_type=types.INTERP_LINEAR,
        antialias=False,
    )
    canvas = fn.pad(resized, axes=[0, 1], shape=[in_h, in_w], fill_value=0)
    blob = fn.crop_mirror_normalize(
        canvas, dtype=types.FLOAT, output_layout="CHW", mean=[SCRFD_MEAN] * 3, std=[SCRFD_STD] * 3
    )
    return [blob, fn.reshape(_to_f32(det_scale), shape=[1])]


def ocr_detection_graph(device: str, params: Mapping[str, Any]) -> list:
    """``encoded``, ``resize_hw``, ``bucket_hw`` -> ``image_u8`` uint8 [H, W, 3], as
    ``det_resize`` (to ``resize_hw``) + zero padding to ``bucket_hw``."""
    fn, types, _ = _dali()
    image, height, _ = _encoded_image(device)
    resize_hw = fn.external_source(name=RESIZE_HW, device="cpu", dtype=types.INT32, ndim=1)
    bucket_hw = fn.external_source(name=BUCKET_HW, device="cpu", dtype=types.INT32, ndim=1)
    resized = _pil_resize(image, _to_f32(resize_hw[1]), _to_f32(resize_hw[0]), _to_f32(height), types.INTERP_LANCZOS3)
    return [fn.pad(resized, axes=[0, 1], shape=bucket_hw, fill_value=0)]


def _repeat_frames(image, per_frame):
    """``image`` (HWC, on its device) as a sequence (FHWC) of ``len(per_frame)`` copies,
    one per face or text line: ``sequence_rearrange`` with a ``new_order`` of zeros, so
    the image is decoded once however many frames are cut from it."""
    fn, types, _ = _dali()
    zeros = fn.cast(per_frame * 0, dtype=types.INT32)
    return fn.sequence_rearrange(fn.expand_dims(image, axes=[0], new_axis_names="F"), new_order=zeros)


def _stack_matrices(rows, cols: int):
    """``rows`` (lists of ``cols`` float64 [N] DALI vectors) -> float32 [N, rows, cols]."""
    fn, types, _ = _dali()
    flat = [entry for row in rows for entry in row]
    return fn.cast(fn.reshape(fn.stack(*flat, axis=1), shape=[-1, len(rows), cols]), dtype=types.FLOAT)


def alignment_matrices(landmarks):
    """``float32 [N, 5, 2]`` landmarks (image pixels) -> ``float32 [N, 2, 3]`` inverse
    maps (aligned-face pixel -> image pixel, pixel-corner origin as DALI's
    ``warp_affine`` takes them), in float64 DALI arithmetic:

    insightface ``estimate_norm`` (scikit-image ``SimilarityTransform``, Umeyama) is the
    least-squares similarity ``[[a, -b], [b, a]] p + t`` from the landmarks ``p`` to
    :data:`~immich_trt.models.face.ARCFACE_DST`; for 2-D points it has the closed form
    ``a = sum(p'.q') / sum(|p'|^2)``, ``b = sum(p'_x q'_y - p'_y q'_x) / sum(|p'|^2)``
    over the centred points (the rotation without reflection Umeyama picks), ``t`` from
    the centroids. ``cv2.warpAffine`` inverts it and samples with pixel centres at
    integer coordinates; DALI puts them at +0.5, hence the shift of the translation.
    DALI's reductions take no float64, so the five points are summed term by term."""
    fn, types, _ = _dali()
    points = fn.cast(landmarks, dtype=types.FLOAT64)
    xs = [points[:, k, 0] for k in range(5)]
    ys = [points[:, k, 1] for k in range(5)]
    dst = ARCFACE_DST.astype(np.float64)
    centred = dst - dst.mean(axis=0)
    mean_x = (xs[0] + xs[1] + xs[2] + xs[3] + xs[4]) / 5.0
    mean_y = (ys[0] + ys[1] + ys[2] + ys[3] + ys[4]) / 5.0
    dot = cross = norm = None
    for k in range(5):
        px, py = xs[k] - mean_x, ys[k] - mean_y
        qx, qy = float(centred[k, 0]), float(centred[k, 1])
        terms = (px * qx + py * qy, px * qy - py * qx, px * px + py * py)
        dot, cross, norm = terms if dot is None else (dot + terms[0], cross + terms[1], norm + terms[2])
    a, b = dot / norm, cross / norm
    tx = float(dst[:, 0].mean()) - (a * mean_x - b * mean_y)
    ty = float(dst[:, 1].mean()) - (b * mean_x + a * mean_y)
    det = a * a + b * b
    ia, ib = a / det, b / det  # inverse linear part [[ia, ib], [-ib, ia]]
    ix = -(ia * tx + ib * ty)
    iy = -(-ib * tx + ia * ty)
    # centres at +0.5: src = A (dst - 0.5) + t' + 0.5
    ix = ix + 0.5 - 0.5 * (ia + ib)
    iy = iy + 0.5 - 0.5 * (ia - ib)
    return _stack_matrices([[ia, ib, ix], [-ib, ia, iy]], 3)


def face_recognition_graph(device: str, params: Mapping[str, Any]) -> list:
    """``encoded``, ``face_landmarks`` [N, 5, 2] -> ``aligned_faces`` float32
    [N, 3, 112, 112], as ``norm_crop`` (``cv2.warpAffine`` bilinear, black border) on
    the RGB image + ``recognition_blob`` (``(x - mean) / std``, RGB, CHW); the image is
    decoded once and each face warped from it (:func:`_repeat_frames`)."""
    fn, types, _ = _dali()
    image, _, _ = _encoded_image(device)
    landmarks = fn.external_source(name=FACE_LANDMARKS, device="cpu", dtype=types.FLOAT, ndim=3)
    frames = _repeat_frames(image, landmarks[:, 0, 0])
    aligned = fn.warp_affine(
        frames,
        matrix=fn.per_frame(alignment_matrices(landmarks)),
        size=[ARCFACE_SIZE, ARCFACE_SIZE],
        fill_value=0,
        interp_type=types.INTERP_LINEAR,
        inverse_map=True,
    )
    mean, std = float(params["mean"]), float(params["std"])
    return [
        fn.crop_mirror_normalize(aligned, dtype=types.FLOAT, output_layout="FCHW", mean=[mean] * 3, std=[std] * 3)
    ]


def _geometry_column(geometry, name: str):
    return geometry[:, LINE_GEOMETRY_COLUMNS.index(name)]


def _erase_regions(geometry, frame_axis_start: str, extent):
    """Flat ``(anchor, shape)`` of one ``fn.erase`` region per frame, from column
    ``frame_axis_start`` to ``extent`` (a scalar or per-frame vector) along one axis."""
    fn, types, _ = _dali()
    index = _geometry_column(geometry, "index")
    start = _geometry_column(geometry, frame_axis_start)
    anchor = fn.reshape(fn.cast(fn.stack(index, start, axis=1), dtype=types.FLOAT), shape=[-1])
    shape = fn.reshape(fn.cast(fn.stack(index * 0 + 1, extent - start, axis=1), dtype=types.FLOAT), shape=[-1])
    return anchor, shape


def ocr_recognition_graph(device: str, params: Mapping[str, Any]) -> list:
    """``encoded``, ``line_coefficients`` [N, 8], ``line_geometry`` [N, 8] ->
    ``text_lines`` float32 [N, 3, 48, W], as ``crop_text_line`` + ``line_tensor`` of
    each line of one recognizer batch (module docstring): the BGR image decoded once,

    1. each crop by ``experimental.warp_perspective`` (bicubic, edge pixels repeated as
       PIL clamps its taps) from the float image to a canvas of the batch's largest
       crop, the 90-degree turn folded into the homography, truncated as PIL stores it;
    2. ``cv2.resize`` to ``resized_width x 48`` as a bilinear warp of that canvas (scale
       ``w / resized_width``), with the columns and rows past the crop's last one (where
       cv2 clamps, and the wider canvas would blend its neighbour) taken from warps
       pinned to that last column or row; rounded as cv2's fixed point does;
    3. ``(x - 127.5) / 127.5``, CHW, zeros right of each line's resized width."""
    fn, types, dmath = _dali()
    image, _, _ = _encoded_image(device, bgr=True)
    coefficients = fn.external_source(name=LINE_COEFFICIENTS, device="cpu", dtype=types.FLOAT, ndim=2)
    geometry = fn.external_source(name=LINE_GEOMETRY, device="cpu", dtype=types.INT32, ndim=2)
    frames = _repeat_frames(fn.cast(image, dtype=types.FLOAT), _geometry_column(geometry, "index"))

    def f64(node):
        return fn.cast(node, dtype=types.FLOAT64)

    c = [f64(coefficients[:, k]) for k in range(8)]
    one = c[0] * 0.0 + 1.0
    zero = c[0] * 0.0
    homography = [[c[0], c[1], c[2]], [c[3], c[4], c[5]], [c[6], c[7], one]]
    turned = f64(_geometry_column(geometry, "rotated"))
    kept = one - turned
    width = f64(_geometry_column(geometry, "width"))
    # rotate(90, expand=True) of a w x h crop: rotated pixel (x, y) is crop pixel (w - y, x)
    crop = [
        [turned * row[1] + kept * row[0], turned * (zero - row[0]) + kept * row[1], turned * (row[0] * width + row[2]) + kept * row[2]]
        for row in homography
    ]
    w_int, h_int = _geometry_column(geometry, "width"), _geometry_column(geometry, "height")
    r_int = _geometry_column(geometry, "rotated")
    crop_h = r_int * w_int + (1 - r_int) * h_int  # the rotated crop's height and width
    crop_w = r_int * h_int + (1 - r_int) * w_int
    canvas = fn.cast(fn.stack(fn.reductions.max(crop_h, axes=[0]), fn.reductions.max(crop_w, axes=[0])), dtype=types.FLOAT)
    cropped = fn.experimental.warp_perspective(
        frames,
        matrix=fn.per_frame(_stack_matrices(crop, 3)),
        size=canvas,
        interp_type=types.INTERP_CUBIC,
        border_mode="replicate",
        inverse_map=True,
    )
    cropped = dmath.clamp(dmath.floor(cropped), 0.0, 255.0)  # PIL stores (UINT8)v

    batch_width = _geometry_column(geometry, "batch_width")
    size = fn.cast(fn.stack(batch_width[0] * 0 + REC_HEIGHT, batch_width[0]), dtype=types.FLOAT)
    sx = f64(crop_w) / f64(_geometry_column(geometry, "resized_width"))
    sy = f64(crop_h) / float(REC_HEIGHT)
    last_x, last_y = f64(crop_w) - 0.5, f64(crop_h) - 0.5  # centres of the last column and row

    def resize(x_row, y_row):
        return fn.experimental.warp_perspective(
            cropped,
            matrix=fn.per_frame(_stack_matrices([x_row, y_row, [zero, zero, one]], 3)),
            size=size,
            interp_type=types.INTERP_LINEAR,
            border_mode="replicate",
            inverse_map=True,
        )

    inside = resize([sx, zero, zero], [zero, sy, zero])
    last_column = resize([zero, zero, last_x], [zero, sy, zero])
    last_row = resize([sx, zero, zero], [zero, zero, last_y])
    corner = resize([zero, zero, last_x], [zero, zero, last_y])
    ones = inside * 0.0 + 1.0
    anchor, shape = _erase_regions(geometry, "clamp_column", batch_width)
    before_column = fn.erase(ones, anchor=anchor, shape=shape, axis_names="FW", fill_value=0)
    anchor, shape = _erase_regions(geometry, "clamp_row", batch_width * 0 + REC_HEIGHT)
    before_row = fn.erase(ones, anchor=anchor, shape=shape, axis_names="FH", fill_value=0)
    after_column, after_row = ones - before_column, ones - before_row
    resized = before_row * (before_column * inside + after_column * last_column) + after_row * (
        before_column * last_row + after_column * corner
    )
    resized = dmath.floor(resized + 0.5)  # cv2's fixed point rounds to nearest
    normalised = fn.crop_mirror_normalize(
        resized, dtype=types.FLOAT, output_layout="FCHW", mean=[127.5] * 3, std=[127.5] * 3
    )
    anchor, shape = _erase_regions(geometry, "resized_width", batch_width)
    return [fn.erase(normalised, anchor=anchor, shape=shape, axis_names="FW", fill_value=0)]


GRAPHS = {
    CLIP_VISUAL: clip_visual_graph,
    FACE_DETECTION: face_detection_graph,
    OCR_DETECTION: ocr_detection_graph,
    FACE_RECOGNITION: face_recognition_graph,
    OCR_RECOGNITION: ocr_recognition_graph,
}


def build_pipeline(
    kind: str,
    params: Mapping[str, Any],
    device: str = "gpu",
    batch_size: int = 8,
    num_threads: int = 4,
    device_id: int = 0,
    **pipeline_options: Any,
):
    """The (unbuilt) ``nvidia.dali.Pipeline`` of ``kind`` for ``device`` ("gpu" or
    "cpu"; "cpu" pipelines have ``device_id=None``). Output dtypes and ranks are
    declared, so DALI and Triton's DALI backend check them. Defining the graph needs no
    GPU; building or serialising a "gpu" pipeline does.

    Raises ``ValueError`` for an unknown kind or device, ``RuntimeError`` without DALI."""
    _check_kind(kind)
    _check_device(device)
    _dali()
    from nvidia.dali import Pipeline

    _, outputs = io_specs(kind, params)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        output_dtype=[_dali_type(spec.data_type) for spec in outputs],
        output_ndim=[len(spec.dims) for spec in outputs],
        **pipeline_options,
    )
    with pipe:
        pipe.set_outputs(*GRAPHS[kind](device, params))
    return pipe


def _dali_type(triton_type: str):
    _, types, _ = _dali()
    return {"TYPE_UINT8": types.UINT8, "TYPE_FP32": types.FLOAT, "TYPE_INT32": types.INT32}[triton_type]


def cuda_device_count() -> int:
    """GPUs DALI can use here (0 without CUDA or without DALI)."""
    try:
        from nvidia.dali import backend

        return int(backend.GetCUDADeviceCount())
    except Exception:  # noqa: BLE001 - no CUDA, no DALI, or a driver error: no GPU for DALI
        return 0


# -------------------------------------------------------------------- Triton model


def serialize(
    kind: str,
    params: Mapping[str, Any],
    device: str = "gpu",
    max_batch_size: int = 8,
    num_threads: int = 4,
    device_id: int = 0,
) -> bytes:
    """The pipeline serialised for Triton's DALI backend (``1/model.dali``).

    DALI instantiates the pipeline to serialise it, so a "gpu" pipeline needs CUDA and a
    GPU (run it where the engines are built); a "cpu" one serialises anywhere. The
    backend runs each instance on its own GPU whatever ``device_id`` says here.
    Raises ``RuntimeError`` without DALI or, for "gpu", without a usable GPU."""
    pipe = build_pipeline(kind, params, device, max_batch_size, num_threads, device_id)
    try:
        return pipe.serialize()
    except RuntimeError as exc:
        if device == "gpu" and cuda_device_count() == 0:
            raise RuntimeError(
                "serialising a GPU DALI pipeline needs CUDA and a GPU (DALI builds the pipeline to serialise it); "
                "build the GPU repository on the GPU host"
            ) from exc
        raise


def dali_config_pbtxt(
    name: str,
    kind: str,
    params: Mapping[str, Any],
    max_batch_size: int,
    device: str = "gpu",
    device_ids: Sequence[str | int] = ("0",),
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    num_threads: int = 4,
) -> str:
    """``config.pbtxt`` of a DALI-backend model: the tensors of :func:`io_specs` (outputs
    in pipeline order, which is how the backend maps them), ``encoded`` and every input
    of variable length with ``allow_ragged_batch`` (encoded images of different lengths,
    requests with different numbers of faces or lines, batch together),
    ``dynamic_batching``, one ``KIND_GPU`` instance group per device id ("gpu") or one
    ``KIND_CPU`` group ("cpu"), and the pipeline's ``num_threads``.
    Raises ``ValueError`` if ``max_batch_size < 1``."""
    _check_device(device)
    if max_batch_size < 1:
        raise ValueError("a DALI model needs max_batch_size >= 1 (the batch axis is the sample axis)")
    inputs, outputs = io_specs(kind, params)
    config = model_config(name, backend="dali", max_batch_size=max_batch_size)
    for tensors, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            # encoded files, and a request's faces or text lines, vary in length between requests
            ragged = tensors is config.input and (spec.name == ENCODED_INPUT or -1 in spec.dims)
            ragged = {"allow_ragged_batch": True} if ragged else {}
            add_tensor(tensors, spec.name, spec.data_type, spec.dims, **ragged)
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.SetInParent()
    if device == "gpu":
        for device_id in device_ids:
            add_instance_group(config, "KIND_GPU", 1, [int(device_id)])
    else:
        add_instance_group(config, "KIND_CPU", 1)
    add_parameters(config, {"num_threads": str(num_threads)})
    return config_text(config)


def write_dali_model(
    folder: Path,
    kind: str,
    params: Mapping[str, Any],
    max_batch_size: int,
    device: str = "gpu",
    device_ids: Sequence[str | int] = ("0",),
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    num_threads: int = 4,
) -> Path:
    """Write ``<folder>/1/model.dali`` (:func:`serialize`) and ``<folder>/config.pbtxt``
    (:func:`dali_config_pbtxt`); the model name is ``folder.name``. Returns ``folder``.
    Raises as :func:`serialize` (a "gpu" model needs a GPU to be written)."""
    folder = Path(folder)
    # serialised on CUDA device 0: the build's GPU (build_environment makes the first id
    # the only one visible); the backend runs each instance on its own group's GPU
    data = serialize(kind, params, device, max_batch_size, num_threads, 0)
    write_if_changed(folder / "1" / "model.dali", data)
    config = dali_config_pbtxt(
        folder.name,
        kind,
        params,
        max_batch_size,
        device=device,
        device_ids=device_ids,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        num_threads=num_threads,
    )
    write_if_changed(folder / "config.pbtxt", config)
    return folder


# ----------------------------------------------------------------------- CPU runs

#: Pipeline options for step-by-step runs: no prefetching, no asynchronous executor.
SYNCHRONOUS = {"prefetch_queue_depth": 1, "exec_async": False, "exec_pipelined": False}


def cpu_pipeline(kind: str, params: Mapping[str, Any], batch_size: int = 1, num_threads: int = 2):
    """A built "cpu" pipeline for :func:`feed_and_run`, synchronous and without
    prefetching (each run consumes exactly the batch fed before it; batches of up to
    ``batch_size`` images). Raises ``RuntimeError`` without DALI."""
    pipe = build_pipeline(kind, params, "cpu", batch_size, num_threads, **SYNCHRONOUS)
    pipe.build()
    return pipe


def feed_and_run(
    pipe,
    kind: str,
    encoded: Sequence[bytes],
    resize_hw: Sequence[tuple[int, int]] | None = None,
    bucket_hw: Sequence[tuple[int, int]] | None = None,
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run a built pipeline (:func:`cpu_pipeline`, or a deserialised "cpu" one) on one
    batch of ``len(encoded)`` images; see :func:`run_cpu` for the arguments and result.
    A file DALI cannot decode fails the whole batch (``RuntimeError``) and leaves the
    pipeline unusable: check :func:`image_format` first."""
    if not encoded:
        return []
    if kind in SEQUENCE_KINDS:
        names = [spec.name for spec in io_specs(kind, {"mean": 0.0, "std": 1.0})[0] if spec.name != ENCODED_INPUT]
        if inputs is None or len(inputs) != len(encoded) or any(set(names) - set(row) for row in inputs):
            raise ValueError(f"{kind} needs {', '.join(names)} per image")
        if any(len(row[names[0]]) == 0 for row in inputs):
            raise ValueError(f"{kind} needs at least one face or line per image")
        for name in names:
            pipe.feed_input(name, [np.ascontiguousarray(row[name]) for row in inputs])
    if kind == OCR_DETECTION:
        if resize_hw is None or len(resize_hw) != len(encoded):
            raise ValueError("ocr_detection needs one resize_hw (height, width) per image")
        bucket_hw = resize_hw if bucket_hw is None else bucket_hw
        if len(bucket_hw) != len(encoded):
            raise ValueError("ocr_detection needs one bucket_hw (height, width) per image")
        sizes = np.asarray(resize_hw, dtype=np.int32).reshape(-1, 2)
        buckets = np.asarray(bucket_hw, dtype=np.int32).reshape(-1, 2)
        if (sizes < 1).any() or (buckets < sizes).any():
            raise ValueError("resize_hw must be >= 1 and bucket_hw >= resize_hw")
        pipe.feed_input(RESIZE_HW, list(sizes))
        pipe.feed_input(BUCKET_HW, list(buckets))
    pipe.feed_input(ENCODED_INPUT, [np.frombuffer(data, dtype=np.uint8) for data in encoded])
    outputs = pipe.run()
    names = OUTPUT_NAMES[kind]
    return [{name: np.array(out[i]) for name, out in zip(names, outputs)} for i in range(len(encoded))]


def run_cpu(
    kind: str,
    params: Mapping[str, Any],
    encoded: Sequence[bytes],
    resize_hw: Sequence[tuple[int, int]] | None = None,
    bucket_hw: Sequence[tuple[int, int]] | None = None,
    num_threads: int = 2,
    inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run the "cpu" variant of a pipeline on encoded images (one batch) and return, per
    image, ``{output name: numpy array}`` without the batch axis (``image`` float32
    [3, S, S]; ``input.1`` float32 [3, h, w] and ``det_scale`` float32 [1];
    ``image_u8`` uint8 [H, W, 3]; ``aligned_faces`` float32 [N, 3, 112, 112];
    ``text_lines`` float32 [N, 3, 48, W]).

    ``ocr_detection`` needs ``resize_hw`` per image ((height, width), as the server's
    :func:`immich_trt.models.ocr.det_resize_shape` swapped) and takes ``bucket_hw``
    (default: ``resize_hw``, no padding). ``face_recognition`` and ``ocr_recognition``
    need ``inputs``, per image ``{face_landmarks: float32[N, 5, 2]}`` or
    ``line_inputs``' ``{line_coefficients, line_geometry}`` without their batch axis.
    Raises ``RuntimeError`` without DALI or when an image cannot be decoded,
    ``ValueError`` for missing or invalid sizes or inputs."""
    if not encoded:
        return []
    pipe = cpu_pipeline(kind, params, len(encoded), num_threads)
    return feed_and_run(pipe, kind, encoded, resize_hw, bucket_hw, inputs)
