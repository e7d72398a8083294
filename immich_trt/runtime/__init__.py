"""Inference runtimes: in-process ONNX Runtime (the CPU default) and Triton (TensorRT
engines, ``TRITON_URL``); :mod:`.select` chooses between them."""

from __future__ import annotations

import logging

from ..config import Settings
from .allocator import limit_malloc_arenas
from .base import Runtime
from .cpu import CpuPlan, usable_cores
from .ensemble import with_ensembles
from .select import RuntimeChoice, choose_runtime

log = logging.getLogger(__name__)


def cpu_plan(settings: Settings) -> CpuPlan | None:
    """The in-process runtime's thread plan (:mod:`.cpu`); None with
    ``IMMICH_TRT_CPU_SCHEDULER=upstream`` (immich-ml's threads: ``ort_threads`` per session)."""
    if settings.cpu_scheduler == "upstream":
        return None
    cores = usable_cores()
    wide = settings.model_intra_op_threads if settings.model_intra_op_threads > 0 else cores
    return CpuPlan(cores, min(wide, cores), int(settings.cpu_narrow_max_mb * 2**20), settings.ort_spinning)


def make_runtime(settings: Settings, choice: RuntimeChoice | None = None) -> Runtime:
    """The runtime :func:`.select.choose_runtime` picks (or ``choice``, when the caller
    has chosen already; logged with its reason), wrapped in the GPU target's ensemble
    client with ``IMMICH_TRT_PREPROCESS=gpu`` (:mod:`.ensemble`)."""
    choice = choice if choice is not None else choose_runtime(settings)
    inter, intra = settings.ort_threads
    if choice.name == "onnxruntime":
        from .onnxruntime import OnnxRuntime, default_sessions

        plan = cpu_plan(settings)
        if limit_malloc_arenas(settings.malloc_arenas):
            log.info("malloc: at most %d glibc arenas (IMMICH_TRT_MALLOC_ARENAS)", settings.malloc_arenas)
        factory = default_sessions
        if settings.fast:
            from .fast import FastSessions

            factory = FastSessions(settings.engines_dir)
            log.info(
                "Fast mode (IMMICH_TRT_FAST): int8 CLIP visual and ArcFace files from %s where built, "
                "OCR in %s; answers differ slightly from immich-ml's",
                settings.engines_dir,
                "OpenVINO" if factory.openvino else "ONNX Runtime (openvino is not installed)",
            )
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
            session_factory=factory,
        )
    else:
        from .triton import TritonRuntime

        log.info("Runtime: Triton (%s)", choice.reason)
        if settings.fast:
            log.warning(
                "IMMICH_TRT_FAST applies to the in-process runtime only; Triton serves the fp32 models "
                "(IMMICH_TRT_RUNTIME=onnxruntime for fast mode)"
            )
        runtime = TritonRuntime(settings)
    served = with_ensembles(runtime, settings)
    served.choice = choice  # read by the log line and /v1/status: never probed again
    return served
