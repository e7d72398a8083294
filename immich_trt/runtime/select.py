"""Which runtime serves when ``IMMICH_TRT_RUNTIME=auto`` (the default), and why.

Triton where it is what makes the host fast: a ``TRITON_URL`` to use, GPU preprocessing,
or an NVIDIA GPU with TensorRT engines built for it. Everywhere else (most Immich servers:
no GPU) the in-process ONNX Runtime with the core budget of :mod:`.cpu`, measured faster
and lighter on CPU than Triton's python-backend models (``bench/NOTES.md``: each
python-backend model is a process of its own, about +0.9 GB for Immich's four models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Settings


@dataclass(frozen=True)
class RuntimeChoice:
    """``name``: ``"triton"`` or ``"onnxruntime"``; ``reason``: one sentence for the log."""

    name: str
    reason: str


def nvidia_gpus(dev: Path = Path("/dev"), proc: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """How many NVIDIA GPUs this host's driver exposes (``/proc/driver/nvidia/gpus/*``,
    else ``/dev/nvidia<N>`` device files); 0 without the driver."""
    try:
        found = sum(1 for _ in proc.iterdir())
        if found:
            return found
    except OSError:
        pass
    try:
        return sum(1 for p in dev.glob("nvidia[0-9]*"))
    except OSError:
        return 0


def tensorrt_engines(engines_dir: Path) -> int:
    """How many TensorRT engines (``<model>/<version>/model.plan``) the repository holds."""
    try:
        return sum(1 for _ in engines_dir.glob("*/*/model.plan"))
    except OSError:
        return 0


def choose_runtime(settings: Settings, gpus: int | None = None) -> RuntimeChoice:
    """The runtime for ``settings`` (``gpus`` overrides the detection, for tests).

    An explicit ``IMMICH_TRT_RUNTIME`` wins. ``auto``: Triton with ``TRITON_URL``, with
    ``IMMICH_TRT_PREPROCESS=gpu``, or with an NVIDIA GPU and TensorRT engines in
    ``IMMICH_TRT_ENGINES_DIR``; otherwise in-process ONNX Runtime.
    """
    if settings.runtime in {"triton", "onnxruntime"}:
        return RuntimeChoice(settings.runtime, f"IMMICH_TRT_RUNTIME={settings.runtime}")
    if settings.triton_url:
        return RuntimeChoice("triton", "TRITON_URL is set")
    if settings.preprocess == "gpu":
        return RuntimeChoice("triton", "IMMICH_TRT_PREPROCESS=gpu runs in Triton ensembles")
    gpus = nvidia_gpus() if gpus is None else gpus
    engines = tensorrt_engines(settings.engines_dir)
    if gpus and engines:
        return RuntimeChoice("triton", f"{gpus} NVIDIA GPU(s) and {engines} TensorRT engines in {settings.engines_dir}")
    if gpus:
        return RuntimeChoice(
            "onnxruntime",
            f"{gpus} NVIDIA GPU(s) but no TensorRT engines in {settings.engines_dir}: in-process ONNX Runtime on "
            "the CPU until `immich-trt build-engines --target tensorrt` has built them",
        )
    return RuntimeChoice(
        "onnxruntime", "no NVIDIA GPU and no TRITON_URL: in-process ONNX Runtime, the fastest and lightest on CPU"
    )
