"""Inference runtimes: in-process ONNX Runtime (the CPU default) and Triton (TensorRT
engines, ``TRITON_URL``); :mod:`.select` chooses between them."""

from __future__ import annotations

import logging

from ..config import Settings
from .allocator import limit_malloc_arenas
from .base import Runtime
from .cpu import CpuPlan, usable_cores
from .ensemble import with_ensembles
from .select import choose_runtime

log = logging.getLogger(__name__)


def cpu_plan(settings: Settings) -> CpuPlan | None:
    """The in-process runtime's thread plan (:mod:`.cpu`); None with
    ``IMMICH_TRT_CPU_SCHEDULER=upstream`` (immich-ml's threads: ``ort_threads`` per session)."""
    if settings.cpu_scheduler == "upstream":
        return None
    cores = usable_cores()
    wide = settings.model_intra_op_threads if settings.model_intra_op_threads > 0 else cores
    return CpuPlan(cores, min(wide, cores), int(settings.cpu_narrow_max_mb * 2**20), settings.ort_spinning)


def make_runtime(settings: Settings) -> Runtime:
    """The runtime :func:`.select.choose_runtime` picks (logged with its reason), wrapped
    in the GPU target's ensemble client with ``IMMICH_TRT_PREPROCESS=gpu`` (:mod:`.ensemble`)."""
    choice = choose_runtime(settings)
    inter, intra = settings.ort_threads
    if choice.name == "onnxruntime":
        from .onnxruntime import OnnxRuntime

        plan = cpu_plan(settings)
        if limit_malloc_arenas(settings.malloc_arenas):
            log.info("malloc: at most %d glibc arenas (IMMICH_TRT_MALLOC_ARENAS)", settings.malloc_arenas)
        log.info(
            "Runtime: in-process ONNX Runtime (%s); %s",
            choice.reason,
            plan.describe() if plan is not None else f"immich-ml's threads ({intra} intra-op per model)",
        )
        runtime: Runtime = OnnxRuntime(
            inter,
            intra,
            settings.model_arena,
            threads=max(2, settings.request_threads),
            spinning=settings.ort_spinning,
            plan=plan,
        )
    else:
        from .triton import TritonRuntime

        log.info("Runtime: Triton (%s)", choice.reason)
        runtime = TritonRuntime(settings)
    return with_ensembles(runtime, settings)
