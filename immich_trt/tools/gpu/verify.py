"""A built TensorRT engine checked against ONNX Runtime on the same inputs.

FP16 is not safe for every graph: PP-OCR's recognizers (opset 14) spell LayerNorm as
ReduceMean/Pow/Sqrt, the pattern TensorRT warns may overflow in FP16
(NVIDIA/TensorRT#2781), and RapidOCR reports a PP-OCRv4 detector whose FP16 engine finds
almost nothing. So after each build the engine runs on inputs made here
(:func:`reference_inputs`: fixed seeds, the shape of its first profile's ``opt``, values in
the range the preprocessing gives) and its outputs are compared with ONNX Runtime's on the
served ONNX file (:func:`agreement`); :func:`immich_trt.tools.gpu.tensorrt.build_tensorrt_models`
rebuilds a model in FP32 when its FP16 engine disagrees.

Running an engine needs the GPU host: TensorRT's runtime and CUDA's runtime library
(``libcudart``, loaded with ctypes: NVIDIA's Triton image has it, no extra Python
package is needed). Where either is missing, :func:`verify_engine` says so and the
build records the engine as unverified.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Smallest cosine similarity between an engine's float outputs and ONNX Runtime's
#: (FP16 engines of these models agree to 0.9999 and more; an overflow gives far less).
MIN_COSINE = 0.999
#: Smallest share of equal integer outputs (the OCR recognizer's CTC indices).
MIN_EQUAL_SHARE = 0.98


class VerificationUnavailable(RuntimeError):
    """The engine cannot be run here (no CUDA runtime, no GPU, no TensorRT runtime)."""


def reference_inputs(layout: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``layout`` (:class:`~immich_trt.tools.gpu.tensorrt.EngineLayout`) at
    its first profile's ``opt`` shapes (or the fixed shapes), by name: images as their
    preprocessing leaves them (normalised floats around 0, or uint8 pages of dark bars on
    white for the OCR detector, whose input is uint8), token ids below 1000 led by CLIP's
    start token for text models, ones for attention masks."""
    from ...runtime.repository import triton_data_type

    rng = np.random.default_rng(seed)
    profile = layout.profiles[0] if layout.profiles else None
    out = {}
    for name, elem, dims in layout.inputs:
        try:
            shape = tuple(profile[name].opt) if profile is not None else tuple(int(d) for d in dims)
        except KeyError:
            shape = tuple(int(d) if isinstance(d, int) and d > 0 else 1 for d in dims)
        dtype = triton_data_type(elem)
        if dtype == "TYPE_UINT8":
            page = np.full(shape, 235, np.uint8)
            for _ in range(12):  # dark bars: text lines for the detector
                y, x = rng.integers(0, max(1, shape[1] - 12)), rng.integers(0, max(1, shape[2] // 2))
                page[:, y : y + int(rng.integers(6, 12)), x : x + int(rng.integers(20, shape[2] // 2 + 21))] = 20
            out[name] = page
        elif dtype in ("TYPE_INT32", "TYPE_INT64"):
            np_type = np.int64 if dtype == "TYPE_INT64" else np.int32
            if "mask" in name.lower():
                out[name] = np.ones(shape, np_type)
            else:
                ids = rng.integers(1, 1000, shape).astype(np_type)
                ids[..., 0] = 49406 if layout.family == "clip-textual" else ids[..., 0]
                out[name] = ids
        else:
            out[name] = rng.normal(0.0, 0.5, shape).astype(np.float32)
    return out


def agreement(reference: Mapping[str, np.ndarray], engine: Mapping[str, np.ndarray]) -> tuple[bool, str]:
    """Whether an engine's outputs agree with ONNX Runtime's: every float output within
    cosine :data:`MIN_COSINE` (and finite), every integer output equal in
    :data:`MIN_EQUAL_SHARE` of its elements. Returns ``(ok, what was measured)``."""
    parts, ok = [], True
    for name, ref in reference.items():
        got = np.asarray(engine[name])
        if got.shape != ref.shape:
            return False, f"{name}: shape {got.shape}, ONNX Runtime {ref.shape}"
        if np.issubdtype(ref.dtype, np.integer):
            share = float(np.mean(got == ref)) if ref.size else 1.0
            parts.append(f"{name}: {100 * share:.1f}% equal")
            ok &= share >= MIN_EQUAL_SHARE
            continue
        a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        if not np.isfinite(b).all():
            return False, f"{name}: not finite"
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(a @ b / norm) if norm > 0 else float(np.allclose(a, b, atol=1e-3))
        parts.append(f"{name}: cosine {cosine:.6f}, max |diff| {float(np.abs(a - b).max(initial=0)):.4g}")
        ok &= cosine >= MIN_COSINE
    return bool(ok), "; ".join(parts)


def onnxruntime_outputs(onnx_path, inputs: Mapping[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """ONNX Runtime (CPU) on ``inputs``: the reference."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(list(names), dict(inputs))))


class _Cuda:
    """The few CUDA runtime calls an engine run needs, through ctypes."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("cudart")
        candidates = [path] if path else []
        candidates += ["libcudart.so", "libcudart.so.12", "libcudart.so.13"]
        for name in candidates:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise VerificationUnavailable("CUDA's runtime library (libcudart) cannot be loaded")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise VerificationUnavailable(f"{what} failed with CUDA error {status}")

    def malloc(self, size: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(1, size))), "cudaMalloc")
        return int(pointer.value or 0)

    def copy(self, dst: int, src: int, size: int, kind: int) -> None:
        self.check(
            self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(size), ctypes.c_int(kind)),
            "cudaMemcpy",
        )

    def free(self, pointer: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(pointer))

    def synchronize(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


def run_engine(plan: bytes, inputs: Mapping[str, np.ndarray], trt: Any) -> dict[str, np.ndarray]:
    """Run a serialized engine once on ``inputs`` (host arrays, by name) with its first
    profile, in ``trt`` (the ``tensorrt`` module that built it); returns every output, by
    name. Raises :class:`VerificationUnavailable` without CUDA or a GPU, or when the
    engine cannot be deserialized or run here."""
    cuda = _Cuda()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise VerificationUnavailable("TensorRT could not deserialize the engine here")
    context = engine.create_execution_context()
    buffers: list[int] = []
    outputs: dict[str, np.ndarray] = {}
    try:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                array = np.ascontiguousarray(inputs[name].astype(trt.nptype(engine.get_tensor_dtype(name)), copy=False))
                context.set_input_shape(name, array.shape)
                pointer = cuda.malloc(array.nbytes)
                buffers.append(pointer)
                cuda.copy(pointer, array.ctypes.data, array.nbytes, 1)  # host to device
                context.set_tensor_address(name, pointer)
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                array = np.empty(tuple(context.get_tensor_shape(name)), trt.nptype(engine.get_tensor_dtype(name)))
                pointer = cuda.malloc(array.nbytes)
                buffers.append(pointer)
                context.set_tensor_address(name, pointer)
                outputs[name] = array
        if not context.execute_async_v3(0):
            raise VerificationUnavailable("TensorRT could not run the engine")
        cuda.synchronize()
        for name, array in outputs.items():
            cuda.copy(array.ctypes.data, context.get_tensor_address(name), array.nbytes, 2)  # device to host
    finally:
        for pointer in buffers:
            cuda.free(pointer)
    return outputs


def verify_engine(layout: Any, plan: bytes, trt: Any) -> tuple[bool | None, str]:
    """Run ``plan`` (in ``trt``, the ``tensorrt`` module that built it) and ONNX Runtime on :func:`reference_inputs` of ``layout`` and compare
    (:func:`agreement`). Returns ``(True or False, what was measured)``, or ``(None,
    why)`` when the engine cannot be run here."""
    inputs = reference_inputs(layout)
    try:
        engine = run_engine(plan, inputs, trt)
    except VerificationUnavailable as exc:
        return None, str(exc)
    names = [name for name, _, _ in layout.outputs]
    reference = onnxruntime_outputs(layout.onnx_path, inputs, names)
    ok, measured = agreement(reference, engine)
    return ok, measured
