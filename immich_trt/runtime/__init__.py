"""Inference runtimes: Triton (default) and in-process ONNX Runtime."""

from __future__ import annotations

from ..config import Settings
from .base import Runtime


def make_runtime(settings: Settings) -> Runtime:
    """The runtime selected by ``IMMICH_TRT_RUNTIME`` (Triton's wrapped in the GPU
    target's ensemble client with ``IMMICH_TRT_PREPROCESS=gpu``). Raises ``ValueError``
    for settings the GPU path cannot serve."""
    inter, intra = settings.ort_threads
    if settings.runtime == "onnxruntime":
        from .onnxruntime import OnnxRuntime

        return OnnxRuntime(
            inter, intra, settings.model_arena, threads=max(2, settings.request_threads), spinning=settings.ort_spinning
        )
    from .ensemble import with_ensembles
    from .triton import TritonRuntime

    return with_ensembles(TritonRuntime(settings), settings)
