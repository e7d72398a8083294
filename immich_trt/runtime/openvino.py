"""An ONNX file compiled by OpenVINO's CPU plugin behind an ONNX Runtime session's
interface (``run(output_names, feeds)``, ``get_outputs()``), for fast mode (:mod:`.fast`).

Measured on the PP-OCRv5 mobile models (``docs/fast-mode.md``): OpenVINO's CPU kernels
run the detector and recognizer faster than ONNX Runtime on the same threads, with
outputs within about 1e-5. Precision is pinned to f32: on CPUs with AVX-512 BF16 or AMX
the plugin's default is bf16, which changes recognised text.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np


def openvino_available() -> bool:
    """Whether the ``openvino`` package (the ``[fast]`` extra) imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


@dataclass(frozen=True)
class OutputInfo:
    """What callers read of ONNX Runtime's ``NodeArg``: the output's name."""

    name: str


class OpenVinoSession:
    """``path`` compiled for OpenVINO's CPU plugin with ``threads`` inference threads.

    One stream and the latency hint: a call is computed by up to ``threads`` threads and
    the plugin starts no streams of its own, so the runtime's core budget still decides
    how many cores inference uses. Dynamic input shapes stay dynamic (OCR's widths and
    heights vary). Safe to call from several threads at once: each call takes an infer
    request of its own from a pool. ``run`` returns copies (numpy arrays), in the order
    of ``output_names``. Raises OpenVINO's ``RuntimeError`` for a file it cannot read or
    inputs it refuses.
    """

    def __init__(self, path: str | Path, threads: int) -> None:
        core = _core()
        model = core.read_model(str(path))
        config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,
        }
        self.threads = max(1, threads)
        self._compiled = core.compile_model(model, "CPU", config)
        self._outputs = [OutputInfo(port.get_any_name()) for port in self._compiled.outputs]
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def get_outputs(self) -> list[OutputInfo]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
            return [np.array(request.get_tensor(name).data, copy=True) for name in names]
        finally:
            self._requests.put(request)
