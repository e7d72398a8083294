"""TensorRT engines of the GPU target (``build-engines --target tensorrt``).

For every model of the Immich cache (the ONNX file the CPU target serves, derived
copies included: the uint8-input OCR detector, the CTC-reduced recognizer, the ArcFace
copy with a dynamic batch axis) this module writes, under the model repository::

    <name>/config.pbtxt       platform "tensorrt_plan", the CPU target's tensor contract
    <name>/1/model.plan       the serialized TensorRT engine
    <name>/1/build.json       what the engine was built from, and its cache key
    .trt_timing.cache         TensorRT timing cache shared by every build

Only :func:`build_engine` needs TensorRT (imported there, never at module import);
profiles, profile selection, cache keys and ``config.pbtxt`` are plain Python.

Batch axis
----------
A TensorRT engine batches only where the ONNX graph does; Immich's CLIP exports and its
SCRFD detectors have a static batch of 1. Triton's ``max_batch_size`` is therefore:

- the CPU target's when the served file's first dimension is symbolic: ArcFace (64),
  OCR detection (4), OCR recognition (``max(8, MAX_BATCH_SIZE__OCR)``); the engine takes
  batches ``1..max_batch_size``;
- 1 when the first dimension is 1 and every output leads with it: CLIP visual and
  textual, SCRFD with ``[1, N, C]`` outputs. The engine takes one image or text; Triton
  still sees a batch axis, so an ensemble can feed the model;
- 0 when the outputs have no batch axis: SCRFD with ``[N, C]`` outputs (the layout of
  insightface's ``det_10g``); dims are then the CPU target's, batch axis included.

Optimization profiles and their selection
-----------------------------------------
Triton's TensorRT backend makes one execution context per profile named in the
``instance_group`` ``profile`` list (only profile 0 when the list is empty) and runs a
request on the profile whose ``[min, max]`` box holds every input shape and whose
distance to ``opt`` is smallest (ties go to the lowest index); a shape no profile holds
is refused. The distance is meant to be Manhattan, but the backend compares ``opt``'s
dimension ``i`` with the request's dimension ``i - 1`` (tensorrt_backend
``src/instance_state.cc``, ``EvaluateTensorRTContext``, lines 1978-1982 at e2ef6d7;
so since 2022): :func:`select_profile` reproduces that formula. For the profiles below
the choice is the Manhattan one all the same: the OCR profiles that hold a shape are
nested squares, where the smallest holding side wins under both formulas, or disjoint
width ranges, where one profile holds it (``tests/test_tensorrt_builder.py`` checks every
shape the server sends). The OCR profiles follow the CPU path's shape buckets
(:data:`immich_trt.models.ocr.DET_BUCKETS`, :data:`~immich_trt.models.ocr.REC_WIDTH_BUCKETS`):

- OCR detection ``image_u8`` ``[N, H, W, 3]``: one square profile per side bucket ``b``
  (``H, W`` in ``[32, b]``, ``opt`` ``b x b``), chosen for every shape whose longer side
  is in ``(previous bucket, b]``: the exact bucket shapes the server pads to when
  ``IMMICH_TRT_OCR_SHAPE_BUCKETS`` is on, and every multiple of 32 in between when it
  is off. Two more for panoramas, whose longer side is past the ladder: ``wide``
  (``H <= 1024``, ``2080 <= W <= 4096``, ``opt`` 768 x 2560; PP-OCR's graph needs sides
  that are multiples of 32) and ``tall`` (the transpose); the server's shorter side (at most ``maxResolution``, 736 by default,
  padded 768) fits them. A shape with both sides past 2048, or one past 4096, is
  refused (``ValueError`` here, an error from Triton).
- OCR recognition ``x`` ``[N, 3, H, W]`` (``H`` from the graph, 48 for PP-OCRv5 and
  PP-OCRv6; 48 when the graph leaves it free): one profile per width bucket ``b``, holding
  ``W`` in ``(previous bucket, b]`` (the first from 320, the recognizer's minimum
  width; ``opt`` the bucket), plus ``(2560, 5120]`` past the ladder (``opt`` 3200).
- Every other model has one profile: its fixed shape (CLIP ``S x S`` from the file or
  ``preprocess_cfg.json``, context length 77, SCRFD 640 x 640 or the file's fixed size,
  ArcFace 112 x 112).

Multi-profile models set ``execution_context_allocation_strategy`` to
``ON_PROFILE_CHANGE`` (each context holds the activation memory of its own profile, not
the largest one's; backends that predate the parameter ignore it).

Dynamic batching (models with ``max_batch_size`` > 1)
------------------------------------------------------
- ArcFace: profile ``opt`` batch 8, ``preferred_batch_size: [8]``, queue delay 1000 us.
- OCR recognition: ``opt`` = ``MAX_BATCH_SIZE__OCR`` (6), ``preferred_batch_size`` the
  same (omitted when it equals ``max_batch_size``), queue delay 1000 us.
- OCR detection: ``max_batch_size`` 1 (the CPU target's 4 buys nothing here: every
  request is a whole image, and requests of different sizes never batch together), so
  each of its 9 profile contexts holds one image's activations.

``opt`` is the batch TensorRT times its kernels for. With a queue delay, a batch that
reaches a preferred size runs at once; a smaller one waits at most the delay for other
requests (faces of a concurrent photo, the last lines of another image) to join. One
millisecond is small against a request's CPU-side work (decode, crops: tens of ms).

Engine cache
------------
A plan loads only in the TensorRT version that built it (so build with the version of
the Triton server that serves it) and runs on the GPU model it was built for. The
cache key is the SHA-256 of (ONNX file SHA-256, TensorRT version, GPU name, precision,
profiles, builder flags); ``build`` skips a model whose ``build.json`` holds the same
key next to its plan, so an engine is built once per change of any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...config import Settings
from ...runtime.base import ModelSpec
from ...runtime.repository import (
    add_instance_group,
    add_parameters,
    add_tensor,
    config_text,
    model_config,
    onnx_io,
    triton_data_type,
    triton_dims,
    write_if_changed,
)
from ..engines import cached_specs

log = logging.getLogger(__name__)

#: ``--precision`` values.
PRECISIONS = ("fp16", "fp32", "int8")
PLAN_NAME = "model.plan"
BUILD_INFO_NAME = "build.json"
TIMING_CACHE_NAME = ".trt_timing.cache"
#: Part of every cache key: bump it when this module starts building different engines
#: from the same inputs.
BUILDER_VERSION = 1

#: Smallest side the OCR detector is sent (``det_resize_shape`` rounds to 32).
DET_MIN_SIDE = 32
#: Panorama profiles: the longer side up to this, the shorter up to the next one.
DET_MAX_SIDE = 4096
DET_PANORAMA_SHORT_SIDE = 1024
#: The shorter side the panorama profiles are tuned for (``maxResolution`` 736 padded).
DET_PANORAMA_OPT_SHORT = 768
#: The widest recognizer input any profile holds.
REC_MAX_WIDTH = 5120

#: ArcFace's opt batch, and the queue delay (microseconds) of ArcFace and OCR
#: recognition (see the module docstring for why).
ARCFACE_OPT_BATCH = 8
BATCH_QUEUE_DELAY_US = 1000

#: TensorRT data type names -> ONNX element types (for the I/O type check).
_TRT_TO_ONNX = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "INT32": 6, "INT64": 7, "BOOL": 9, "HALF": 10, "BF16": 16}


class TensorRTUnavailableError(RuntimeError):
    """``import tensorrt`` failed."""


class NoGPUError(RuntimeError):
    """No NVIDIA GPU (or not the GPUs asked for) on this machine."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a model."""


class Int8CalibrationError(ValueError):
    """INT8 was asked for a model that has neither Q/DQ nodes nor a calibrator."""


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ProfileShape:
    """One input's ``min``/``opt``/``max`` shapes in an optimization profile, batch
    axis first. Raises ``ValueError`` unless the ranks agree and ``min <= opt <= max``."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"profile shapes of {self.name!r} differ in rank: {self.min} {self.opt} {self.max}")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"profile of {self.name!r} needs min <= opt <= max: {self.min} {self.opt} {self.max}")

    def holds(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimization profile: a :class:`ProfileShape` per dynamic input.
    ``covers`` says which request shapes it is meant for (documentation only; not part
    of the cache key)."""

    shapes: tuple[ProfileShape, ...]
    covers: str = ""

    def __getitem__(self, name: str) -> ProfileShape:
        for shape in self.shapes:
            if shape.name == name:
                return shape
        raise KeyError(name)

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether every input of this profile is given and within ``[min, max]``."""
        return all(s.name in shapes and s.holds(shapes[s.name]) for s in self.shapes)

    def distance(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """Manhattan distance between ``opt`` and the given shapes, summed over inputs."""
        return sum(abs(o - d) for s in self.shapes for o, d in zip(s.opt, shapes[s.name]))

    def as_json(self) -> list[dict[str, Any]]:
        return [shape.as_json() for shape in self.shapes]


def backend_distance(profile: Profile, shapes: Mapping[str, Sequence[int]]) -> int:
    """The distance tensorrt_backend ranks a holding profile by (``EvaluateTensorRTContext``,
    ``src/instance_state.cc`` lines 1978-1982 at e2ef6d7): per input,
    ``|opt[0] - batch| + sum(|opt[i] - shape[i - 1]|, i >= 1)``, ``shape`` batch axis
    first: each ``opt`` dimension after the first is compared with the request's
    previous one (the Manhattan distance would compare ``opt[i]`` with ``shape[i]``)."""
    total = 0
    for s in profile.shapes:
        shape = shapes[s.name]
        total += abs(s.opt[0] - shape[0]) + sum(abs(s.opt[i] - shape[i - 1]) for i in range(1, len(s.opt)))
    return total


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the profile Triton's TensorRT backend runs a request with full input
    ``shapes`` (batch axis first) on: among the profiles that hold every shape, the one
    with the smallest :func:`backend_distance`, the lowest index on a tie
    (tensorrt_backend ``GetMostOptimizedProfile``; see the module docstring for how that
    differs from the Manhattan distance it intends, and why our profiles do not care).

    Raises ``ValueError`` naming the shape and what the profiles hold when none does."""
    best, best_distance = -1, None
    for index, profile in enumerate(profiles):
        if profile.holds(shapes):
            distance = backend_distance(profile, shapes)
            if best_distance is None or distance < best_distance:
                best, best_distance = index, distance
    if best < 0:
        held = "; ".join(
            f"{i}: " + ", ".join(f"{s.name} {list(s.min)}..{list(s.max)}" for s in p.shapes)
            for i, p in enumerate(profiles)
        )
        given = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"no optimization profile holds {given} (profiles: {held})")
    return best


def _square_det_profile(name: str, side: int, previous: int, opt_batch: int, max_batch: int) -> Profile:
    return Profile(
        (
            ProfileShape(
                name,
                (1, DET_MIN_SIDE, DET_MIN_SIDE, 3),
                (opt_batch, side, side, 3),
                (max_batch, side, side, 3),
            ),
        ),
        covers=f"H, W <= {side}: shapes whose longer side is in ({previous}, {side}]",
    )


def ocr_detection_profiles(input_name: str, max_batch: int, opt_batch: int = 1) -> tuple[Profile, ...]:
    """Profiles of the OCR detector's ``[N, H, W, 3]`` input: one square profile per
    :data:`~immich_trt.models.ocr.DET_BUCKETS` side, then ``wide`` and ``tall`` for
    panoramas (see the module docstring). ``max_batch`` >= 1."""
    from ...models.ocr import DET_BUCKETS, bucket

    opt_batch = min(opt_batch, max_batch)
    profiles = []
    previous = 0
    for side in DET_BUCKETS:
        profiles.append(_square_det_profile(input_name, side, previous, opt_batch, max_batch))
        previous = side
    # past the ladder: one side longer than the last bucket, the other up to 1024
    long_low, long_opt = previous + DET_MIN_SIDE, bucket(previous + 1, DET_BUCKETS, 512)
    short, short_opt = DET_PANORAMA_SHORT_SIDE, DET_PANORAMA_OPT_SHORT
    for wide, covers in (
        (True, f"wide: H <= {short}, W in ({previous}, {DET_MAX_SIDE}]"),
        (False, f"tall: H in ({previous}, {DET_MAX_SIDE}], W <= {short}"),
    ):

        def hw(short_side: int, long_side: int, wide: bool = wide) -> tuple[int, int]:
            return (short_side, long_side) if wide else (long_side, short_side)

        shape = ProfileShape(
            input_name,
            (1, *hw(DET_MIN_SIDE, long_low), 3),
            (opt_batch, *hw(short_opt, long_opt), 3),
            (max_batch, *hw(short, DET_MAX_SIDE), 3),
        )
        profiles.append(Profile((shape,), covers=covers))
    return tuple(profiles)


def ocr_recognition_profiles(
    input_name: str, max_batch: int, opt_batch: int, height: int | None = None
) -> tuple[Profile, ...]:
    """Profiles of the recognizer's ``[N, 3, H, W]`` input (``H`` = ``height``, 48 for
    PP-OCRv5 and v6): one per :data:`~immich_trt.models.ocr.REC_WIDTH_BUCKETS` width
    ``b`` holding ``W`` in ``(previous, b]`` (from 320), then ``(2560, 5120]``; batch
    ``1..max_batch``."""
    from ...models.ocr import REC_HEIGHT, REC_MIN_WIDTH, REC_WIDTH_BUCKETS, bucket

    height = height or REC_HEIGHT
    opt_batch = min(opt_batch, max_batch)
    profiles = []
    low = REC_MIN_WIDTH
    for width in (*REC_WIDTH_BUCKETS, REC_MAX_WIDTH):
        # past the ladder, tuned for its first padded width
        opt_width = width if width in REC_WIDTH_BUCKETS else bucket(low, REC_WIDTH_BUCKETS, 640)
        profiles.append(
            Profile(
                (
                    ProfileShape(
                        input_name,
                        (1, 3, height, low),
                        (opt_batch, 3, height, opt_width),
                        (max_batch, 3, height, width),
                    ),
                ),
                covers=f"W in [{low}, {width}]",
            )
        )
        low = width + 1
    return tuple(profiles)


def fixed_profile(inputs: Sequence[tuple[str, Sequence[int]]], max_batch: int, opt_batch: int = 1) -> Profile:
    """One profile for inputs of fixed shape (batch axis excluded): batch ``1..max_batch``."""
    opt_batch = min(opt_batch, max_batch)
    return Profile(
        tuple(ProfileShape(name, (1, *dims), (opt_batch, *dims), (max_batch, *dims)) for name, dims in inputs),
        covers="batch 1.." + str(max_batch) + ", " + ", ".join(f"{name} {list(dims)}" for name, dims in inputs),
    )


# --------------------------------------------------------------------------- layouts

FAMILIES = {
    ("clip", "visual"): "clip-visual",
    ("clip", "textual"): "clip-textual",
    ("facial-recognition", "detection"): "scrfd",
    ("facial-recognition", "recognition"): "arcface",
    ("ocr", "detection"): "ocr-detection",
    ("ocr", "recognition"): "ocr-recognition",
}

Tensor = tuple[str, int, list]  # (name, ONNX element type, dims) as onnx_io gives them


@dataclass(frozen=True)
class EngineLayout:
    """How one served ONNX file becomes a TensorRT engine and a Triton model.

    ``inputs``/``outputs`` are ``onnx_io`` tuples (batch axis included);
    ``max_batch_size`` is Triton's (0: the model has no batch axis, dims are full);
    ``profiles`` the engine's optimization profiles; ``preferred_batch_size`` and
    ``max_queue_delay_us`` its dynamic batching (used when ``max_batch_size`` > 1)."""

    name: str
    family: str
    onnx_path: Path
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int
    profiles: tuple[Profile, ...]
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


def model_family(name: str) -> str:
    """``"clip-visual"``, ``"clip-textual"``, ``"scrfd"``, ``"arcface"``,
    ``"ocr-detection"`` or ``"ocr-recognition"`` from a Triton name
    ``<task>__<model>__<type>``. Raises ``ValueError`` for any other name."""
    parts = name.split("__")
    family = FAMILIES.get((parts[0], parts[-1])) if len(parts) >= 3 else None
    if family is None:
        raise ValueError(f"{name!r} is not a <task>__<model>__<type> name of a CLIP, face or OCR model")
    return family


def _static(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0


def _resolve(name: str, dims: Sequence[Any], fill: Mapping[int, int]) -> tuple[int, ...]:
    """Non-batch dims with symbolic ones taken from ``fill`` (axis -> size)."""
    out = []
    for axis, dim in enumerate(dims[1:], start=1):
        if _static(dim):
            out.append(dim)
        elif axis in fill:
            out.append(fill[axis])
        else:
            raise ValueError(f"input {name!r} has a symbolic dimension {axis} ({dim!r}) with no known size")
    return tuple(out)


def _clip_image_size(onnx_path: Path) -> int | None:
    cfg = onnx_path.parent / "preprocess_cfg.json"
    if not cfg.is_file():
        return None
    size = json.loads(cfg.read_text(encoding="utf-8"))["size"]
    return int(size[0] if isinstance(size, list) else size)


def _clip_context_length(onnx_path: Path) -> int:
    cfg = onnx_path.parent.parent / "config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text(encoding="utf-8")).get("text_cfg", {}).get("context_length", 77))
    return 77


def _batch_first_outputs(family: str, outputs: Sequence[Tensor]) -> bool:
    if family == "scrfd":  # insightface reads the layout from the rank (ScrfdLayout)
        return len(outputs[0][2]) == 3
    return all(dims and (not _static(dims[0]) or dims[0] == 1) for _, _, dims in outputs)


def _rec_height(spec: ModelSpec, dims: Sequence[Any]) -> int:
    """The recognizer's input height: fixed by the graph, else the processing in the
    served file's metadata (an imported model), else Immich's 48."""
    import onnx

    from ...models.ocr import IMMICH_RECOGNITION
    from ...models.ocr.processing import read_processing

    if len(dims) == 4 and _static(dims[2]):
        return int(dims[2])
    model = onnx.load(str(spec.onnx_path), load_external_data=False)
    return read_processing(model, "recognition", IMMICH_RECOGNITION).height


def engine_layout(spec: ModelSpec, settings: Settings) -> EngineLayout:
    """The engine and Triton model for one served ONNX file (``spec`` from
    :func:`immich_trt.tools.engines.cached_specs`). Raises ``ValueError`` for a
    model outside the six families or a symbolic dimension with no known size."""
    from ...models.face import DET_INPUT_SIZE

    family = model_family(spec.name)
    inputs, outputs = onnx_io(Path(spec.onnx_path))
    first = [dims[0] if dims else None for _, _, dims in inputs]
    dynamic = all(not _static(d) for d in first)
    if not _batch_first_outputs(family, outputs):
        max_batch = 0
    elif dynamic and spec.max_batch_size > 0:
        max_batch = spec.max_batch_size
    elif dynamic or all(d == 1 for d in first):
        max_batch = 1
    else:
        max_batch = 0
    if family == "ocr-detection" and max_batch > 1:
        # one image per request, and images of different sizes never batch; a backend
        # older than tensorrt_backend #108 (Triton 25.05) allocates every profile's
        # context at its largest shape, batch included (module docstring)
        max_batch = 1
    engine_batch = max(1, max_batch)

    preferred: tuple[int, ...] = ()
    delay = 0
    if family == "ocr-detection":
        profiles = ocr_detection_profiles(inputs[0][0], engine_batch)
    elif family == "ocr-recognition":
        opt = min(settings.max_batch_size_ocr, engine_batch)
        profiles = ocr_recognition_profiles(inputs[0][0], engine_batch, opt, _rec_height(spec, inputs[0][2]))
        preferred, delay = (opt,), BATCH_QUEUE_DELAY_US
    else:
        fill: dict[int, int] = {}
        opt = 1
        if family == "clip-visual":
            size = _clip_image_size(Path(spec.onnx_path))
            if size is not None:
                fill = {2: size, 3: size}
        elif family == "clip-textual":
            fill = {1: _clip_context_length(Path(spec.onnx_path))}
        elif family == "scrfd":
            dims = inputs[0][2]
            width, height = (dims[3], dims[2]) if _static(dims[2]) and _static(dims[3]) else DET_INPUT_SIZE
            fill = {2: height, 3: width}
        elif family == "arcface":
            fill = {2: 112, 3: 112}
            opt = min(ARCFACE_OPT_BATCH, engine_batch)
            preferred, delay = (opt,), BATCH_QUEUE_DELAY_US
        profiles = (fixed_profile([(name, _resolve(name, dims, fill)) for name, _, dims in inputs], engine_batch, opt),)
    if max_batch <= 1 or preferred == (max_batch,) or preferred == (1,):
        preferred = ()
    return EngineLayout(
        name=spec.name,
        family=family,
        onnx_path=Path(spec.onnx_path),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=max_batch,
        profiles=profiles,
        preferred_batch_size=preferred,
        max_queue_delay_us=delay,
    )


# --------------------------------------------------------------------------- config.pbtxt


def parse_device_ids(ids: Iterable[int | str]) -> tuple[int, ...]:
    """GPU ids as ints (``MACHINE_LEARNING_DEVICE_IDS`` or ``--gpus``), duplicates
    dropped in order. Raises ``ValueError`` for an empty list or a non-integer id."""
    out: list[int] = []
    for raw in ids:
        text = str(raw).strip()
        if not text.isdigit():
            raise ValueError(f"GPU ids are integers like 0,1; got {raw!r}")
        if int(text) not in out:
            out.append(int(text))
    if not out:
        raise ValueError("at least one GPU id is needed")
    return tuple(out)


def tensorrt_config_pbtxt(layout: EngineLayout, gpus: Sequence[int | str]) -> str:
    """``config.pbtxt`` of a ``tensorrt_plan`` model: the CPU target's name and tensors
    (``data_type`` from the ONNX element type; the batch axis dropped from ``dims`` when
    ``max_batch_size`` > 0), ``dynamic_batching`` when ``max_batch_size`` > 1, one
    ``KIND_GPU`` instance group per GPU id (with the ``profile`` list when the engine has
    several), and a comment header naming what each profile holds. Raises ``ValueError``
    for a bad GPU id."""
    ids = parse_device_ids(gpus)
    batched = layout.max_batch_size > 0
    config = model_config(layout.name, platform="tensorrt_plan", max_batch_size=layout.max_batch_size)
    comments = []
    for index, profile in enumerate(layout.profiles):
        shapes = ", ".join(f"{s.name} min {list(s.min)} opt {list(s.opt)} max {list(s.max)}" for s in profile.shapes)
        comments.append(f"profile {index}: {shapes}" + (f" ({profile.covers})" if profile.covers else ""))
    for tensors, items in ((config.input, layout.inputs), (config.output, layout.outputs)):
        for name, elem, dims in items:
            add_tensor(tensors, name, triton_data_type(elem), triton_dims(dims[1:] if batched else dims))
    if layout.max_batch_size > 1:
        config.dynamic_batching.preferred_batch_size.extend(layout.preferred_batch_size)
        config.dynamic_batching.max_queue_delay_microseconds = layout.max_queue_delay_us
        config.dynamic_batching.SetInParent()
    several = len(layout.profiles) > 1
    for gpu in ids:
        add_instance_group(
            config, "KIND_GPU", 1, [gpu], [str(i) for i in range(len(layout.profiles))] if several else ()
        )
    if several:
        add_parameters(config, {"execution_context_allocation_strategy": "ON_PROFILE_CHANGE"})
    return config_text(config, comments)


# --------------------------------------------------------------------------- cache key


def cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    precision: str,
    profiles: Sequence[Profile],
    flags: Mapping[str, Any],
) -> str:
    """SHA-256 (hex) of everything an engine depends on: the ONNX file's SHA-256, the
    TensorRT version, the GPU name, the precision, the profiles' shapes (not their
    ``covers`` text) and the builder flags (key order irrelevant)."""
    payload = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "gpu": gpu_name,
        "precision": precision,
        "profiles": [profile.as_json() for profile in profiles],
        "flags": dict(flags),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_cached(folder: Path, key: str) -> bool:
    """Whether ``<folder>/1/model.plan`` was built with ``key`` (``build.json`` says so
    and the plan has the size recorded there)."""
    info_path, plan = folder / "1" / BUILD_INFO_NAME, folder / "1" / PLAN_NAME
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("key") == key and plan.is_file() and plan.stat().st_size == info.get("plan_bytes")


# --------------------------------------------------------------------------- TensorRT


def import_tensorrt():
    """The ``tensorrt`` module. Raises :class:`TensorRTUnavailableError` saying what to
    install when it cannot be imported."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or a wheel whose libraries do not load
        raise TensorRTUnavailableError(
            f"TensorRT's Python package cannot be imported ({type(exc).__name__}: {exc}). Build the engines "
            "where they will run: inside NVIDIA's Triton server container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3, "
            "which ships TensorRT), or install the TensorRT wheel of the version your Triton server uses "
            "(pip install tensorrt-cu12==<version>); a plan only loads in the TensorRT version that built it"
        ) from exc
    return tensorrt


def has_qdq(onnx_path: Path) -> bool:
    """Whether the ONNX graph is explicitly quantized (has QuantizeLinear/DequantizeLinear)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def _capturing_logger(trt):
    """A ``trt.ILogger`` that forwards to :mod:`logging` and keeps the error messages."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # called by TensorRT
            severe = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            if severity in severe:
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()


def _mixed_precision_copy(onnx_path: Path, folder: Path, tensorrt_version: str) -> Path:
    """FP16 under strong typing (TensorRT 11, which dropped the FP16 builder flag): the
    ONNX converted to mixed precision by ModelOpt AutoCast, I/O types kept."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception as exc:
        raise EngineBuildError(
            f"FP16 engines with TensorRT {tensorrt_version} need the ONNX converted to mixed precision first "
            "(TensorRT 11 removed the FP16 builder flag): pip install 'nvidia-modelopt[onnx]', or build with "
            "--precision fp32"
        ) from exc
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True)
    dest = folder / "model.fp16.onnx"
    onnx.save(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location="model.fp16.data")
    return dest


def _check_io_types(trt, network, onnx_path: Path) -> None:
    """The engine's I/O types must be the ONNX file's (Triton's config is written from
    it); TensorRT before 10 turns INT64 into INT32, for example."""
    inputs, outputs = onnx_io(onnx_path)
    expected = {name: elem for name, elem, _ in (*inputs, *outputs)}
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    for tensor in tensors:
        got = _TRT_TO_ONNX.get(tensor.dtype.name)
        if tensor.name in expected and got != expected[tensor.name]:
            raise EngineBuildError(
                f"{onnx_path}: TensorRT {trt.__version__} gives tensor {tensor.name!r} type {tensor.dtype.name}, "
                f"the ONNX file (and Triton's config) type {expected[tensor.name]}; TensorRT 10 or newer is needed"
            )


def build_engine(
    onnx_path: Path,
    profiles: Sequence[Profile],
    precision: str,
    timing_cache_path: Path | None,
    workspace_bytes: int | None = None,
    *,
    calibrator: Any = None,
    trt_module: Any = None,
) -> bytes:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and return the serialized engine.

    - ``profiles``: one optimization profile each, in order (their index is the
      profile name in Triton); every input with a dynamic dimension must be in each.
      Ignored when the network has no dynamic input.
    - ``precision``: ``"fp32"`` (TensorRT's default: TF32 where the GPU has it),
      ``"fp16"`` (TensorRT <= 10: the FP16 builder flag; TensorRT 11: strongly typed,
      the ONNX converted by ModelOpt AutoCast first), ``"int8"`` (an explicitly
      quantized ONNX with Q/DQ nodes, or TensorRT <= 10 with ``calibrator``, an
      ``IInt8Calibrator``; FP16 is allowed for the layers left in float).
    - ``timing_cache_path``: TensorRT timing cache, loaded if present (one written by
      another GPU or version is ignored) and saved back after the build.
    - ``workspace_bytes``: workspace memory pool limit (None: TensorRT's default).
    - ``trt_module``: the TensorRT module to use (default ``import tensorrt``).

    Raises :class:`Int8CalibrationError` (before importing TensorRT) for INT8 without
    Q/DQ nodes or calibrator, :class:`TensorRTUnavailableError`,
    :class:`EngineBuildError` with the parser's or builder's errors, ``ValueError`` for
    an unknown precision."""
    onnx_path = Path(onnx_path)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    explicit_int8 = precision == "int8" and has_qdq(onnx_path)
    if precision == "int8" and not explicit_int8 and calibrator is None:
        raise Int8CalibrationError(
            f"INT8 for {onnx_path} needs calibration data: give build_engine an IInt8Calibrator over "
            "representative inputs (TensorRT 10 or older), or an explicitly quantized ONNX with Q/DQ nodes; "
            "or build with --precision fp16"
        )
    trt = trt_module if trt_module is not None else import_tensorrt()
    weak_typing = hasattr(trt.BuilderFlag, "FP16")
    if precision == "int8" and not explicit_int8 and not hasattr(trt.BuilderFlag, "INT8"):
        raise Int8CalibrationError(
            f"TensorRT {trt.__version__} has no calibration (INT8 flag removed): quantize {onnx_path} with Q/DQ nodes"
        )
    logger = _capturing_logger(trt)
    with tempfile.TemporaryDirectory(prefix="trt-build-") as scratch:
        parse_path = onnx_path
        if precision == "fp16" and not weak_typing:
            parse_path = _mixed_precision_copy(onnx_path, Path(scratch), trt.__version__)
        builder = trt.Builder(logger)
        creation = trt.NetworkDefinitionCreationFlag
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10 and hasattr(creation, "EXPLICIT_BATCH"):
            flags |= 1 << int(creation.EXPLICIT_BATCH)
        if not weak_typing and hasattr(creation, "STRONGLY_TYPED"):
            flags |= 1 << int(creation.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(parse_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
            raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: " + "; ".join(errors))
        _check_io_types(trt, network, onnx_path)

        config = builder.create_builder_config()
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if weak_typing and precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if weak_typing and precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not explicit_int8:
                config.int8_calibrator = calibrator

        dynamic = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if any(d < 0 for d in tensor.shape):
                dynamic[tensor.name] = tuple(tensor.shape)
        if dynamic and not profiles:
            raise EngineBuildError(f"{onnx_path}: inputs {sorted(dynamic)} are dynamic but no profile was given")
        first_profile = None
        for index, profile in enumerate(profiles if dynamic else ()):
            trt_profile = builder.create_optimization_profile()
            for name, shape in dynamic.items():
                try:
                    given = profile[name]
                except KeyError:
                    raise EngineBuildError(f"{onnx_path}: profile {index} has no shape for input {name!r}") from None
                fixed_ok = all(d < 0 or given.min[a] == given.max[a] == d for a, d in enumerate(shape))
                if len(given.min) != len(shape) or not fixed_ok:
                    raise EngineBuildError(
                        f"{onnx_path}: profile {index} shapes {list(given.min)}..{list(given.max)} of {name!r} "
                        f"do not fit its dimensions {list(shape)}"
                    )
                trt_profile.set_shape(name, given.min, given.opt, given.max)
            config.add_optimization_profile(trt_profile)
            first_profile = first_profile or trt_profile
        if precision == "int8" and not explicit_int8 and first_profile is not None:
            config.set_calibration_profile(first_profile)

        cache_data = b""
        if timing_cache_path is not None and Path(timing_cache_path).is_file():
            cache_data = Path(timing_cache_path).read_bytes()
        try:
            timing_cache = config.create_timing_cache(cache_data)
        except Exception:  # noqa: BLE001 - TensorRT raises its own types for an unreadable cache: start afresh
            log.warning("ignoring unreadable TensorRT timing cache %s", timing_cache_path)
            timing_cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(timing_cache, False):
            log.warning("TensorRT timing cache %s is from another GPU or version; starting afresh", timing_cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(
                f"TensorRT could not build {onnx_path}: " + ("; ".join(logger.errors) or "no reason given")
            )
        if timing_cache_path is not None:
            saved = config.get_timing_cache()
            if saved is not None:
                write_if_changed(Path(timing_cache_path), bytes(memoryview(saved.serialize())))
        return bytes(memoryview(serialized))


def parse_gpu_query(text: str) -> dict[int, str]:
    """``nvidia-smi --query-gpu=index,name --format=csv,noheader`` output -> {index: name}."""
    names = {}
    for line in text.splitlines():
        index, _, name = line.partition(",")
        if index.strip().isdigit() and name.strip():
            names[int(index)] = name.strip()
    return names


def gpu_names(device_ids: Sequence[int]) -> list[str]:
    """Names of the GPUs ``device_ids`` (``nvidia-smi`` indices). Raises
    :class:`NoGPUError` without an NVIDIA driver or when an id is not present."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise NoGPUError(
            "no NVIDIA GPU found (nvidia-smi is not on PATH): TensorRT engines are built on the GPU model "
            "that serves them; run build-engines --target tensorrt on the GPU host (--target cpu needs no GPU)"
        )
    try:
        done = subprocess.run(
            [exe, "--query-gpu=index,name", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoGPUError(f"nvidia-smi failed: {exc}") from exc
    if done.returncode != 0:
        raise NoGPUError(f"nvidia-smi failed: {(done.stderr or done.stdout).strip()}")
    names = parse_gpu_query(done.stdout)
    missing = [i for i in device_ids if i not in names]
    if missing:
        raise NoGPUError(f"GPU id(s) {missing} not found; this machine has {names or 'no GPU'}")
    return [names[i] for i in device_ids]


class EngineBuilder(Protocol):
    """What :func:`build_tensorrt_models` needs from a builder."""

    tensorrt_version: str
    gpu_name: str

    def build(
        self,
        onnx_path: Path,
        profiles: Sequence[Profile],
        precision: str,
        timing_cache_path: Path,
        workspace_bytes: int | None,
    ) -> bytes: ...


def build_environment(device_ids: Sequence[int], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Point CUDA at the GPU the engines are built for, before anything initialises CUDA
    in this process: ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (so CUDA's ordinals are
    nvidia-smi's indices, the ids of ``MACHINE_LEARNING_DEVICE_IDS`` and of the configs'
    ``instance_group``) and ``CUDA_VISIBLE_DEVICES`` = the first id: TensorRT builds
    on CUDA device 0, which is then that GPU (GPU 0 may be another model or busy), and
    DALI serialises its pipelines there. ``environ`` (default ``os.environ``) is
    updated and returned."""
    import os

    env = os.environ if environ is None else environ
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = str(int(device_ids[0]))
    return env


class TensorRTBuilder:
    """:func:`build_engine` on this machine's GPU. Creating one points CUDA at the first
    of ``device_ids`` (:func:`build_environment`), imports TensorRT and reads the GPU
    names of ``device_ids``; raises :class:`TensorRTUnavailableError`,
    :class:`NoGPUError`, or ``NoGPUError`` when the GPUs are different models (a plan
    runs only on the model it was built for: build one repository per GPU model).
    Engines are built on the first id's GPU; create the builder before anything else
    in the process uses CUDA (``build-engines`` does: it is a process of its own)."""

    def __init__(self, device_ids: Sequence[int]) -> None:
        self.trt = import_tensorrt()  # loads the libraries; CUDA starts with the first builder
        self.tensorrt_version = str(self.trt.__version__)
        names = gpu_names(device_ids)
        if len(set(names)) > 1:
            listed = ", ".join(f"{i}: {n}" for i, n in zip(device_ids, names))
            raise NoGPUError(f"GPUs {listed} are different models; build one repository per GPU model (--gpus)")
        self.gpu_name = names[0]
        build_environment(device_ids)

    def build(self, onnx_path, profiles, precision, timing_cache_path, workspace_bytes):
        return build_engine(onnx_path, profiles, precision, timing_cache_path, workspace_bytes, trt_module=self.trt)


# --------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class BuildResult:
    """One model of :func:`build_tensorrt_models`: ``status`` is ``"built"``,
    ``"cached"`` or ``"failed"`` (``error`` says why); ``seconds`` the build time of
    this run (0 when cached)."""

    name: str
    precision: str
    profiles: int
    seconds: float
    size_mb: float
    status: str
    key: str
    error: str = ""
    checked: str = ""  # the comparison with ONNX Runtime after the build (verify.py)


#: Families built in FP32 when FP16 is asked for, and why.
FP32_FAMILIES = {
    "ocr-recognition": "PP-OCR recognizers (opset 14) spell LayerNorm as ReduceMean/Pow/Sqrt, which TensorRT "
    "warns overflows in FP16 (NVIDIA/TensorRT#2781)",
}

#: ``verify(layout, plan) -> (True | False | None, what was measured)``: the engine
#: against ONNX Runtime (``None``: it could not be run here).
Verifier = Callable[[EngineLayout, bytes], tuple["bool | None", str]]


def build_tensorrt_models(
    settings: Settings,
    repository: Path,
    only: list[str] | None = None,
    precision: str | None = None,
    gpus: Sequence[int | str] | None = None,
    force: bool = False,
    *,
    builder: EngineBuilder | None = None,
    workspace_bytes: int | None = None,
    progress: bool = True,
    verify: Verifier | None = None,
) -> list[BuildResult]:
    """Write the TensorRT model of every cached model (or only the named ones) into
    ``repository``: ``model.plan`` (built, or kept when its cache key matches and
    ``force`` is off), ``build.json`` and ``config.pbtxt`` (always rewritten, so new GPU
    ids need no rebuild).

    ``precision`` defaults to ``settings.trt_precision``, ``gpus`` to
    ``settings.device_ids``; ``builder`` defaults to :class:`TensorRTBuilder` (TensorRT
    and a GPU needed). Derived ONNX copies are written beside their configs. A model
    TensorRT refuses (:class:`EngineBuildError`, :class:`Int8CalibrationError`, a layout
    ``ValueError``) is a ``"failed"`` result, its files left as they were; the others
    are still built. Raises ``ValueError`` (precision, GPU ids),
    :class:`TensorRTUnavailableError` and :class:`NoGPUError` before building anything.

    FP16 where it is safe: the families of :data:`FP32_FAMILIES` are built in FP32, and
    every engine built is compared with ONNX Runtime (``verify``; default
    :func:`immich_trt.tools.gpu.verify.verify_engine` with the real builder); an FP16
    engine that disagrees is rebuilt in FP32. ``build.json`` records both."""
    from tqdm import tqdm

    precision = precision or settings.trt_precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    ids = parse_device_ids(gpus if gpus is not None else settings.device_ids)
    builder = builder or TensorRTBuilder(ids)
    if verify is None and isinstance(builder, TensorRTBuilder):
        from .verify import verify_engine

        trt = builder.trt
        verify = lambda layout, plan: verify_engine(layout, plan, trt)  # noqa: E731
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    # derived files beside their configs; the engines are the plain models whichever
    # preprocessing the server uses (with "gpu", specs name the ensembles instead)
    settings = dataclasses.replace(settings, engines_dir=repository)
    flags = {"builder_version": BUILDER_VERSION, "workspace_bytes": workspace_bytes}
    results = []
    specs = cached_specs(settings, only)
    bar = tqdm(specs, desc="TensorRT engines", unit="model", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        try:
            results.append(
                _build_one(spec, settings, repository, builder, precision, ids, flags, force, workspace_bytes, verify)
            )
        except (EngineBuildError, ValueError) as exc:  # this model only; the others are still built
            log.error("%s: %s", spec.name, exc)
            results.append(BuildResult(spec.name, precision, 0, 0.0, 0.0, "failed", "", str(exc)))
    return results


def _build_one(
    spec: ModelSpec,
    settings: Settings,
    repository: Path,
    builder: EngineBuilder,
    precision: str,
    ids: tuple[int, ...],
    flags: Mapping[str, Any],
    force: bool,
    workspace_bytes: int | None,
    verify: Verifier | None = None,
) -> BuildResult:
    from ...models.download import sha256_file

    layout = engine_layout(spec, settings)
    folder = repository / spec.name
    onnx_sha = sha256_file(layout.onnx_path)
    requested = precision
    if precision == "fp16" and layout.family in FP32_FAMILIES:
        precision = "fp32"
    key = cache_key(onnx_sha, builder.tensorrt_version, builder.gpu_name, precision, layout.profiles, flags)
    plan = folder / "1" / PLAN_NAME
    checked = ""
    if not force and is_cached(folder, key):
        status, seconds = "cached", 0.0
        info = json.loads((folder / "1" / BUILD_INFO_NAME).read_text(encoding="utf-8"))
        precision, checked = info.get("precision", precision), info.get("checked", "")
    else:
        started = time.monotonic()
        timing = repository / TIMING_CACHE_NAME
        data = builder.build(layout.onnx_path, layout.profiles, precision, timing, workspace_bytes)
        verdict, checked = verify(layout, data) if verify is not None else (None, "not checked")
        if verdict is False and precision == "fp16":
            log.warning("%s: the FP16 engine disagrees with ONNX Runtime (%s); building it in FP32", spec.name, checked)
            precision = "fp32"
            data = builder.build(layout.onnx_path, layout.profiles, precision, timing, workspace_bytes)
            verdict, checked = verify(layout, data) if verify is not None else (None, "not checked")
            checked = f"FP16 disagreed, FP32 built: {checked}"
        if verdict is False:
            raise EngineBuildError(f"the {precision} engine disagrees with ONNX Runtime: {checked}")
        if verdict is None and verify is not None:
            log.warning("%s: engine not compared with ONNX Runtime: %s", spec.name, checked)
            checked = f"not checked: {checked}"
        seconds = time.monotonic() - started
        write_if_changed(plan, data)
        info = {
            "key": key,
            "onnx": str(layout.onnx_path),
            "onnx_sha256": onnx_sha,
            "tensorrt": builder.tensorrt_version,
            "gpu": builder.gpu_name,
            "precision": precision,
            "requested_precision": requested,
            "fp32_because": FP32_FAMILIES.get(layout.family, "") if requested == "fp16" else "",
            "checked": checked,
            "profiles": [p.as_json() for p in layout.profiles],
            "flags": dict(flags),
            "build_seconds": round(seconds, 3),
            "plan_bytes": len(data),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_if_changed(folder / "1" / BUILD_INFO_NAME, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
        status = "built"
    write_if_changed(folder / "config.pbtxt", tensorrt_config_pbtxt(layout, ids))
    size = plan.stat().st_size / 1e6
    return BuildResult(spec.name, precision, len(layout.profiles), seconds, size, status, key, checked=checked)


def summary_table(results: Sequence[BuildResult]) -> str:
    """Plain-text table: model, precision, profiles, build seconds, size MB, status."""
    header = ("model", "precision", "profiles", "build s", "size MB", "status")
    rows = [(r.name, r.precision, str(r.profiles), f"{r.seconds:.1f}", f"{r.size_mb:.1f}", r.status) for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {2, 3, 4}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
