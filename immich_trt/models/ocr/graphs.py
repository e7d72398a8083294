"""ONNX rewrites of the PP-OCR files for the runtime: the detector with its
normalisation inside the graph (uint8 input), the recognizer with its CTC argmax/max
reduced inside the graph. The arithmetic is immich-ml's ``TextDetector._transform``
and RapidOCR 3.8.1 ``CTCLabelDecode`` input; the cached files are never modified."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..onnxfile import is_up_to_date, load_onnx, save_onnx_atomic

#: Immich's detector normalisation: ``(x - DET_MEAN) * DET_SCALE`` on 0..255 values.
DET_MEAN = np.float32(0.5)
DET_SCALE = np.float32(1.0) / np.float32(0.5 * 255.0)
#: Input of the served detector graph: the resized image as uint8 RGB ``[N, H, W, 3]``.
DET_INPUT_U8 = "image_u8"


def det_uint8_model(
    src: Path, dest: Path, subtract: np.ndarray | None = None, multiply: np.ndarray | None = None
) -> Path:
    """Write a copy of the detector that takes :data:`DET_INPUT_U8` (uint8 RGB NHWC) and
    normalises inside the graph (Cast, channel flip, ``Sub``, ``Mul``, NHWC->NCHW): 4x
    fewer bytes per request between the server and the runtime, the same float32
    arithmetic. ``subtract``/``multiply``: ``float32[3]`` per BGR channel on 0..255
    values; by default Immich's scalars ``0.5`` and ``float32(1/127.5)``. The cached
    file is never modified; an up-to-date copy is reused."""
    import onnx
    from onnx import helper, numpy_helper

    per_channel = subtract is not None and multiply is not None
    if per_channel and np.array_equal(subtract, [DET_MEAN] * 3) and np.array_equal(multiply, [DET_SCALE] * 3):
        per_channel = False  # Immich's constants: the scalar graph, bit for bit
    mean = np.asarray(subtract, np.float32).reshape(3) if per_channel else np.array(DET_MEAN, np.float32)
    scale = np.asarray(multiply, np.float32).reshape(3) if per_channel else np.array(DET_SCALE, np.float32)
    variant = f"sub={mean.tolist()} mul={scale.tolist()}" if per_channel else ""
    if is_up_to_date(dest, src, variant):
        return dest
    model = load_onnx(src)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    original = [i for i in graph.input if i.name not in initializers][0]
    name = original.name
    dims = original.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2, 1, 0], np.int64), "det_bgr_order"),
            numpy_helper.from_array(mean, "det_mean"),
            numpy_helper.from_array(scale, "det_scale"),
        ]
    )
    prologue = [
        helper.make_node("Cast", [DET_INPUT_U8], ["det_f32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Gather", ["det_f32", "det_bgr_order"], ["det_bgr"], axis=3),
        helper.make_node("Sub", ["det_bgr", "det_mean"], ["det_centred"]),
        helper.make_node("Mul", ["det_centred", "det_scale"], ["det_scaled"]),
        helper.make_node("Transpose", ["det_scaled"], [name], perm=[0, 3, 1, 2]),
    ]
    for node in reversed(prologue):
        graph.node.insert(0, node)
    graph.input.remove(original)
    graph.input.insert(
        0, helper.make_tensor_value_info(DET_INPUT_U8, onnx.TensorProto.UINT8, [shape[0], shape[2], shape[3], 3])
    )
    return save_onnx_atomic(model, dest, source=src, variant=variant)


CTC_INDEX = "ctc_index"
CTC_PROB = "ctc_prob"


def ctc_reduced_model(src: Path, dest: Path) -> Path:
    """Write a copy of a recognizer whose outputs are the per-step argmax (``ctc_index``,
    int64[B, T]) and max (``ctc_prob``, float32[B, T]) of its softmax, instead of the
    whole ``float32[B, T, C]`` (C = 18385 for PP-OCRv5: ~70 KB per step saved between
    the runtime and the server). ONNX ``ArgMax`` keeps the first maximum on ties as
    ``numpy.argmax``, and ``ReduceMax`` returns the same float32 values, so decoding is
    unchanged. Reuses an up-to-date copy; the cached file is never modified."""
    import onnx
    from onnx import helper

    if is_up_to_date(dest, src):
        return dest
    model = load_onnx(src)
    graph = model.graph
    probs = graph.output[0].name
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph.node.append(helper.make_node("ArgMax", [probs], [CTC_INDEX], axis=2, keepdims=0))
    if opset >= 18:
        graph.initializer.append(helper.make_tensor("ctc_axes", onnx.TensorProto.INT64, [1], [2]))
        graph.node.append(helper.make_node("ReduceMax", [probs, "ctc_axes"], [CTC_PROB], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceMax", [probs], [CTC_PROB], axes=[2], keepdims=0))
    dims = [d for d in graph.output[0].type.tensor_type.shape.dim][:2]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(CTC_INDEX, onnx.TensorProto.INT64, shape),
            helper.make_tensor_value_info(CTC_PROB, onnx.TensorProto.FLOAT, shape),
        ]
    )
    return save_onnx_atomic(model, dest, source=src)
