"""Inference runtimes: Triton (default) and in-process ONNX Runtime."""

from __future__ import annotations

from ..config import Settings
from .base import Runtime
from .ensemble import with_ensembles


def make_runtime(settings: Settings) -> Runtime:
    """The runtime selected by ``IMMICH_TRT_RUNTIME``, wrapped in the GPU target's
    ensemble client with ``IMMICH_TRT_PREPROCESS=gpu`` (:mod:`.ensemble`)."""
    inter, intra = settings.ort_threads
    if settings.runtime == "onnxruntime":
        from .onnxruntime import OnnxRuntime

        runtime: Runtime = OnnxRuntime(
            inter, intra, settings.model_arena, threads=max(2, settings.request_threads), spinning=settings.ort_spinning
        )
    else:
        from .triton import TritonRuntime

        runtime = TritonRuntime(settings)
    return with_ensembles(runtime, settings)
