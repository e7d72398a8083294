"""``immich-trt models quantize``: int8 files for fast mode (:mod:`immich_trt.runtime.fast`).

For each CLIP visual encoder and ArcFace recognizer in the model cache, static int8
quantization with ONNX Runtime's quantizer (``onnxruntime.quantization.quantize_static``),
calibrated on what the model really sees when it serves Immich: the user's photos are
made into Immich previews (:func:`immich_trt.tools.bench.make_preview`), sent through the
server's own pipelines (CLIP preprocessing; face detection, alignment and crops) on an
fp32 in-process runtime, and the input tensors of every call to the model are recorded.

The format, chosen by measuring on the models and CPUs of ``docs/fast-mode.md``: QDQ
(quantize/dequantize pairs that ONNX Runtime fuses into int8 kernels), unsigned 8-bit
activations and signed 8-bit per-channel weights (the u8 x s8 products of AVX2/AVX-512
VNNI), ranges from the 99.999th percentile of each tensor's calibration histogram (min/max
ranges let rare outliers cost CLIP's resolution: cosine to fp32 0.986 instead of 0.999);
only the weight-heavy operators are quantized (:data:`OP_TYPES`; matrix products with a
constant weight), so the normalisations, attention, softmax and activations stay in float.

The int8 file is written beside the other generated files,
``<IMMICH_TRT_ENGINES_DIR>/<model>/model.int8.onnx`` (:func:`..runtime.fast.int8_file`),
never into the Immich model cache, with a record of the file it was made from: fast
mode serves it only while that file is unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import contract
from ..config import Settings
from ..runtime.base import ModelSpec, Runtime
from ..runtime.derived import record_source
from ..runtime.fast import QUANTIZED, int8_file

log = logging.getLogger(__name__)

#: ONNX operators quantized, per model task (the rest stays float).
OP_TYPES: dict[str, tuple[str, ...]] = {
    "clip": ("MatMul", "Gemm", "Conv"),
    "facial-recognition": ("Conv", "Gemm", "MatMul"),
}
#: Images made into previews by default (evenly spaced over a sorted folder): calibration
#: needs variety, not volume, and a photo library may hold hundreds of thousands.
DEFAULT_MAX_IMAGES = 200
#: Calibration inputs per model at most (evenly spaced over those recorded).
MAX_CALIBRATION_INPUTS = 256
#: Tasks ``--task`` accepts.
TASKS = tuple(sorted({task for task, _ in QUANTIZED}))


class QuantizeError(Exception):
    """A model could not be quantized (no calibration input, a file the quantizer refuses)."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (see the module docstring for the defaults' reasons).

    ``quant_format``: ``"qdq"`` or ``"qoperator"``; ``activation``/``weight``: ``"u8"``
    or ``"s8"``; ``per_channel``: per output-channel weight scales; ``op_types``: the
    operators to quantize (None: :data:`OP_TYPES` of the task); ``method``: calibration,
    ``"minmax"``, ``"entropy"`` or ``"percentile"``; ``reduce_range``: 7-bit weights (for
    CPUs without VNNI whose u8 x s8 sums may saturate); ``const_weights_only``: quantize
    only matrix products whose second operand is a constant (not attention's Q·Kᵀ)."""

    quant_format: str = "qdq"
    activation: str = "u8"
    weight: str = "s8"
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None
    method: str = "percentile"
    reduce_range: bool = False
    const_weights_only: bool = True


@dataclasses.dataclass
class Quantized:
    """One model's result: its runtime name, the fp32 file it was made from, the int8
    file written, how many calibration inputs (tensors fed to the model) were used, how
    long it took in seconds, and both files' sizes in bytes."""

    name: str
    source: Path
    dest: Path
    samples: int
    seconds: float
    source_bytes: int
    dest_bytes: int


class RecordingRuntime(Runtime):
    """Runs every call on ``inner`` and keeps a copy of the inputs of the calls to the
    models named in ``record``, in call order (``recorded[name]``)."""

    def __init__(self, inner: Runtime, record: set[str]) -> None:
        self.inner = inner
        self.record = record
        self.recorded: dict[str, list[dict[str, np.ndarray]]] = {}
        self.specs: dict[str, ModelSpec] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def load(self, spec: ModelSpec) -> None:
        self.specs[spec.name] = spec
        await self.inner.load(spec)

    async def unload(self, name: str) -> None:
        await self.inner.unload(name)

    async def infer(self, name, inputs, outputs=None):
        if name in self.record:
            self.recorded.setdefault(name, []).append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return await self.inner.infer(name, inputs, outputs)


def evenly(items: Sequence, limit: int) -> list:
    """At most ``limit`` of ``items`` (all when ``limit <= 0``), evenly spaced, in order."""
    items = list(items)
    if limit <= 0 or len(items) <= limit:
        return items
    return [items[int(k * len(items) / limit)] for k in range(limit)]


def calibration_previews(folder: Path, max_images: int = DEFAULT_MAX_IMAGES) -> tuple[list[bytes], list[str]]:
    """Immich previews (:func:`.bench.make_preview`) of at most ``max_images`` images of
    ``folder`` (recursive, evenly spaced over the sorted names; 0: all), and the names
    of the files that could not be read as images."""
    from .bench import IMAGE_SUFFIXES, make_preview

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    previews, skipped = [], []
    for path in evenly(paths, max_images):
        try:
            previews.append(make_preview(path.read_bytes()))
        except Exception:  # noqa: BLE001 - any decoding failure: the image is left out
            skipped.append(path.relative_to(folder).as_posix())
    return previews, skipped


def cached_quantizable(settings: Settings, tasks: Sequence[str] = TASKS) -> list[tuple[str, str, str]]:
    """``(task, model name, type)`` of every model in the Immich model cache that fast
    mode serves from an int8 file, for the given tasks."""
    found = []
    for path in sorted(Path(settings.cache_folder).glob("*/*/*/model.onnx")):
        model_type, name, task = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        if task in tasks and (task, model_type) in QUANTIZED:
            found.append((task, name, model_type))
    return found


def _entries(task: str, name: str) -> dict:
    """Immich's own request for a model of ``task`` (faces: detection at Immich's 0.7)."""
    if task == "clip":
        return contract.clip_visual_entries(name)
    return contract.face_entries(name)


async def calibration_inputs(
    settings: Settings, previews: Sequence[bytes], models: Sequence[tuple[str, str, str]]
) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, ModelSpec]]:
    """Send every preview through Immich's request for each model on an fp32 in-process
    runtime; returns the inputs each quantizable runtime model received (by runtime
    name) and the specs it was loaded with (the file that fast mode's int8 file replaces)."""
    import orjson

    from ..models import build_model
    from ..models.base import ModelContext
    from ..models.cache import ModelCache
    from ..models.entries import parse_entries
    from ..models.inference import run_inference
    from ..models.transforms import decode_pil
    from ..runtime import cpu_plan
    from ..runtime.onnxruntime import OnnxRuntime

    wanted = {f"{task}__{name}__{model_type}" for task, name, model_type in models}
    runtime = RecordingRuntime(OnnxRuntime(arena=False, plan=cpu_plan(settings)), wanted)
    ctx = ModelContext(settings=settings, runtime=runtime)
    cache = ModelCache(ctx, build_model, ttl=0)
    requests = {(task, name): parse_entries(orjson.dumps(_entries(task, name)).decode()) for task, name, _ in models}
    try:
        for data in previews:
            image = decode_pil(data, settings.max_image_pixels)
            for without, with_deps in requests.values():
                await run_inference(cache, image, without, with_deps)
    finally:
        await runtime.stop()
    return runtime.recorded, {n: s for n, s in runtime.specs.items() if n in wanted}


#: Calibration inputs run and folded into the ranges at a time: the intermediate tensors of
#: an iresnet50 are about 100 MB per face crop, so they are never all held at once.
CALIBRATION_CHUNK = 4


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds, read in
    chunks of :data:`CALIBRATION_CHUNK` (the quantizer's ``CalibStridedMinMax``, which
    needs a length divisible by the chunk: the last chunk is shorter)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = 0
        self._end = len(self._feeds)

    def __len__(self) -> int:
        return -(-len(self._feeds) // CALIBRATION_CHUNK) * CALIBRATION_CHUNK

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._feeds))

    def get_next(self):
        if self._next >= self._end:
            return None
        self._next += 1
        return dict(self._feeds[self._next - 1])


def split_batches(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each recorded call's inputs split into batches of one (a recognizer called with 7
    face crops gives 7 inputs), so that every calibration input has the same shape."""
    out = []
    for feed in feeds:
        n = min(len(v) for v in feed.values())
        out.extend({k: v[i : i + 1] for k, v in feed.items()} for i in range(n))
    return out


def quantize_file(source: Path, dest: Path, feeds: Sequence[Mapping[str, np.ndarray]], task: str,
                  config: QuantConfig = QuantConfig()) -> Path:  # fmt: skip
    """Static int8 quantization of ``source`` calibrated on ``feeds`` (the model's inputs),
    written atomically to ``dest`` with the record of its source. Raises
    :class:`QuantizeError` without feeds, ``ValueError`` for an unknown option, and what
    the quantizer raises for a model it cannot take."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise QuantizeError(f"no calibration input for {source}")
    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if config.activation not in types or config.weight not in types:
        raise ValueError(f"activation and weight types are 'u8' or 's8', not {config.activation}/{config.weight}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.int8.", suffix=".onnx", dir=dest.parent)
    os.close(fd)
    try:
        quantize_static(
            str(source),
            tmp,
            _Reader(split_batches(feeds)),
            quant_format=formats[config.quant_format],
            activation_type=types[config.activation],
            weight_type=types[config.weight],
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types_to_quantize=list(config.op_types or OP_TYPES[task]),
            calibrate_method=methods[config.method],
            calibration_providers=["CPUExecutionProvider"],
            extra_options={
                "CalibStridedMinMax": CALIBRATION_CHUNK,  # any method, despite the name: chunked collection
                "CalibMaxIntermediateOutputs": CALIBRATION_CHUNK,
                "MatMulConstBOnly": config.const_weights_only,
            },
        )
        os.chmod(tmp, 0o644)  # as readable as the files it sits beside (mkstemp makes 0600)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record_source(dest, source)
    return dest


def quantize_models(
    settings: Settings,
    previews: Sequence[bytes],
    tasks: Sequence[str] | None = None,
    config: QuantConfig = QuantConfig(),
    progress=None,
) -> tuple[list[Quantized], list[str]]:
    """Quantize every cached model of ``tasks`` (None: all) that fast mode serves from an int8 file,
    calibrated on ``previews`` (encoded Immich previews). Returns the results and one
    message per model that could not be quantized (e.g. no face found in the images).
    ``progress(text)`` is told what happens."""
    say = progress or (lambda text: log.info("%s", text))
    tasks = tuple(tasks or TASKS)
    models = cached_quantizable(settings, tasks)
    if not models:
        return [], [f"no {' or '.join(tasks)} model to quantize in {settings.cache_folder}"]
    say(f"calibration: {len(previews)} previews through {', '.join(f'{t}/{n}/{m}' for t, n, m in models)}")
    started = time.perf_counter()
    recorded, specs = asyncio.run(calibration_inputs(settings, previews, models))
    say(f"calibration inputs recorded in {time.perf_counter() - started:.0f} s")
    done, failed = [], []
    for task, name, model_type in models:
        runtime_name = f"{task}__{name}__{model_type}"
        spec = specs.get(runtime_name)
        feeds = recorded.get(runtime_name, [])
        if spec is None or not feeds:
            what = "no face was found in the images" if task == "facial-recognition" else "the model never ran"
            failed.append(f"{runtime_name}: no calibration input ({what}); give a folder with photos of people")
            continue
        dest = int8_file(settings.engines_dir, runtime_name)
        feeds = evenly(split_batches(feeds), MAX_CALIBRATION_INPUTS)
        samples = len(feeds)
        say(f"{runtime_name}: quantizing on {samples} inputs")
        started = time.perf_counter()
        try:
            quantize_file(Path(spec.onnx_path), dest, feeds, task, config)
        except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; the other models go on
            failed.append(f"{runtime_name}: {type(exc).__name__}: {exc}")
            continue
        done.append(
            Quantized(
                runtime_name, Path(spec.onnx_path), dest, samples, time.perf_counter() - started,
                Path(spec.onnx_path).stat().st_size, dest.stat().st_size,
            )  # fmt: skip
        )
    return done, failed
