"""Triton ensembles of the GPU target: how they are built.

For the five models whose preprocessing runs on the GPU, the repository built by
``build-engines --target tensorrt`` holds, next to the TensorRT model ``<base>`` (its
name is the model's ``triton_name``, e.g. ``clip__ViT-B-32__openai__visual``):

* ``<base>__preprocess``: the DALI pipeline (``encoded`` bytes, and for the recognizers
  the detector's landmarks or line geometry, -> the model's input);
* ``<base>__ensemble``: ``platform: "ensemble"``, ``<base>__preprocess`` then ``<base>``;
* for the recognizers, ``<base>__unbatched`` (:func:`write_unbatched`): ``<base>``'s
  engine with ``max_batch_size`` 0, the ensemble's second step. One request carries all
  its faces (or one batch of text lines) as one DALI sample, ``[1, N, ...]``; Triton
  gives a non-batching step that tensor as ``[N, ...]`` (core ``ensemble_scheduler.cc``
  ``ReshapeTensorDims``), so the engine sees the N faces or lines as its batch.

====================  ============================================  =====================================
kind                  ensemble inputs (per request, batch of 1)     ensemble outputs
====================  ============================================  =====================================
``clip_visual``       ``encoded`` UINT8 [1, n]                      ``embedding`` FP32 [1, D]
``face_detection``    ``encoded`` UINT8 [1, n]                      the detector's outputs (9 for SCRFD,
                                                                    same names) + ``det_scale`` FP32 [1, 1]
``ocr_detection``     ``encoded`` UINT8 [1, n], ``resize_hw`` and    the detector's probability map, same
                      ``bucket_hw`` INT32 [1, 2] (height, width)    name, FP32 [1, 1, H_bucket, W_bucket]
``face_recognition``  ``encoded``, ``face_landmarks`` FP32          the recognizer's output, same name,
                      [1, N, 5, 2]                                  FP32 [N, 512]
``ocr_recognition``   ``encoded``, ``line_coefficients`` FP32       ``ctc_index`` INT64 and ``ctc_prob``
                      [1, N, 8], ``line_geometry`` INT32 [1, N, 8]  FP32 [N, T]
====================  ============================================  =====================================

The ensemble's tensors are derived from the composing models' own ``config.pbtxt`` (read
back after they are written), so they always agree with what the TensorRT builder and the
DALI writer produced: ``max_batch_size`` is the smaller of the two (0 when either model
is unbatched; an unbatched ensemble's dims then carry the batch axis), and the link
``<base>__preprocess`` -> ``<base>`` is checked (data type, rank, fixed dims) before
anything is written. In explicit model-control mode, loading ``<base>__ensemble`` loads
both composing models (Triton 2.51, checked by the tests).

The serving side (``IMMICH_TRT_PREPROCESS=gpu``: loading ``<base>__ensemble``, sending
the request's encoded bytes, the CPU fallback) is :mod:`immich_trt.runtime.ensemble`,
whose tensor names this module writes into the configs.

Without a GPU, :func:`write_standin_repository` writes the same names, tensor contracts
and batching with python-backend stand-ins: ``<base>`` runs the ONNX file with
onnxruntime as the CPU target does, and ``<base>__preprocess`` runs the reference
preprocessing of :mod:`immich_trt.models` (:func:`reference_preprocess`); its
ensembles are those of the GPU repository, served by any Triton, e.g. the one of the
``nvidia-pytriton`` wheel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...config import Settings
from ...models.registry import ModelTask, ModelType
from ...runtime.base import ModelSpec
from ...runtime.ensemble import (
    CLIP_EMBEDDING,
    FACE_LANDMARKS,
    LINE_COEFFICIENTS,
    LINE_GEOMETRY,
    LINE_GEOMETRY_COLUMNS,
    gpu_path_names,
)
from ...runtime.repository import (
    add_instance_group,
    add_parameters,
    add_tensor,
    config_pbtxt,
    config_text,
    model_config,
    model_py_source,
    onnx_io,
    write_if_changed,
)
from ..engines import cached_specs
from .dali import (  # the preprocessing contract (importing it never needs DALI)
    BUCKET_HW,
    CLIP_VISUAL,
    DET_SCALE_OUTPUT,
    ENCODED_INPUT,
    FACE_DETECTION,
    FACE_RECOGNITION,
    KINDS,
    OCR_DETECTION,
    OCR_RECOGNITION,
    OUTPUT_NAMES,
    RESIZE_HW,
    SEQUENCE_KINDS,
    TensorSpec,
    arcface_params,
    clip_params,
    io_specs,
)

log = logging.getLogger(__name__)

#: The preprocessing output that feeds the model, per kind (the others, ``det_scale``,
#: are ensemble outputs).
PREPROCESSED = {kind: names[0] for kind, names in OUTPUT_NAMES.items()}

#: Smallest ``max_batch_size`` of a preprocessing model: it batches concurrent requests
#: (decode and resize on the GPU) even when the model behind it runs one at a time.
PREPROCESS_MAX_BATCH_SIZE = 8

_KIND_BY_TASK_TYPE = {
    (ModelTask.SEARCH, ModelType.VISUAL): CLIP_VISUAL,
    (ModelTask.FACIAL_RECOGNITION, ModelType.DETECTION): FACE_DETECTION,
    (ModelTask.OCR, ModelType.DETECTION): OCR_DETECTION,
    (ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION): FACE_RECOGNITION,
    (ModelTask.OCR, ModelType.RECOGNITION): OCR_RECOGNITION,
}


# ----------------------------------------------------------------------------- names


class GpuRepository(NamedTuple):
    """What :func:`build_gpu_repository` wrote."""

    models: Any  # what the models' builder returned (the TensorRT builder: its BuildResults)
    preprocess: list[str]  # ``<base>__preprocess`` names
    ensembles: list[str]  # ``<base>__ensemble`` names
    skipped: list[str]  # bases without a model (its build failed): no preprocessing, no ensemble


def gpu_kind(base: str) -> str | None:
    """The GPU preprocessing kind (:data:`~immich_trt.tools.gpu.dali.KINDS`) of a model
    name ``<task>__<model>__<type>``: CLIP visual, face detection and recognition, OCR
    detection and recognition; ``None`` for CLIP textual (a text model)."""
    parts = base.split("__")
    if len(parts) < 3:
        return None
    try:
        return _KIND_BY_TASK_TYPE.get((ModelTask(parts[0]), ModelType(parts[-1])))
    except ValueError:
        return None


# ----------------------------------------------------------------------- config.pbtxt


@dataclass(frozen=True)
class ModelIO:
    """What an ensemble needs to know of a composing model: its tensors' ``dims`` are
    without the batch axis when ``max_batch_size`` > 0 (as in ``config.pbtxt``)."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def full_dims(self, tensor: TensorSpec) -> tuple[int, ...]:
        """The tensor's shape as a request carries it (batch axis included)."""
        return ((-1,) + tensor.dims) if self.max_batch_size > 0 else tensor.dims

    def output(self, name: str) -> TensorSpec:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(f"model '{self.name}' has no output '{name}'")


def read_config(folder: Path):
    """Parse ``<folder>/config.pbtxt`` into Triton's ``ModelConfig`` message. Raises
    ``FileNotFoundError`` if it is missing, ``ValueError`` if it does not parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(folder) / "config.pbtxt"
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return config


def read_model_io(folder: Path) -> ModelIO:
    """Parse ``<folder>/config.pbtxt`` (Triton's ``ModelConfig`` text format).

    Raises ``FileNotFoundError`` if it is missing, ``ValueError`` if it does not parse or
    declares no inputs or outputs (an ensemble cannot be wired to an auto-completed one)."""
    from tritonclient.grpc import model_config_pb2

    path = Path(folder) / "config.pbtxt"
    config = read_config(folder)
    if not config.input or not config.output:
        raise ValueError(f"{path} declares no inputs or no outputs; an ensemble needs both")

    def tensors(items) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in items)

    name = config.name or Path(folder).name
    return ModelIO(name, config.max_batch_size, tensors(config.input), tensors(config.output))


def _compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b))


def consistent(producer: ModelIO, produced: TensorSpec, consumer: ModelIO, consumed: TensorSpec) -> bool:
    """Whether Triton accepts tensor ``produced`` of ``producer`` as ``consumed`` of
    ``consumer`` in an ensemble: same data type, and the dims without the batch axis
    compatible (-1 matches anything) or else the full dims (batch axis included). This
    is Triton's own rule (core ``src/ensemble_scheduler/ensemble_utils.cc``
    ``ValidateTensorConsistency``, at commit 73aad7c): it lets a batching model's
    ``[-1, 3, 112, 112]`` per-request output feed a non-batching model's
    ``[-1, 3, 112, 112]``, the batch axis of 1 being stripped at run time
    (``ensemble_scheduler.cc`` ``EnsembleContext::ReshapeTensorDims``)."""
    if produced.data_type != consumed.data_type:
        return False
    return _compatible(produced.dims, consumed.dims) or _compatible(
        producer.full_dims(produced), consumer.full_dims(consumed)
    )


def ensemble_config_pbtxt(kind: str, preprocess: ModelIO, model: ModelIO, name: str | None = None) -> str:
    """``config.pbtxt`` of ``<base>__ensemble`` (``name``; default from ``model.name``):
    ``preprocess`` (``<base>__preprocess``) then ``model`` (``<base>``, or for the
    recognizers ``<base>__unbatched``), for a kind of :data:`KINDS`.

    Ensemble inputs are the preprocessing model's; outputs are the model's (the first
    renamed :data:`CLIP_EMBEDDING` for CLIP) plus :data:`DET_SCALE_OUTPUT` for faces. The
    preprocessing output :data:`PREPROCESSED` ``[kind]`` feeds the model's single input
    (:func:`consistent`). Raises ``ValueError`` if the two models do not fit together."""
    if kind not in KINDS:
        raise ValueError(f"unknown GPU preprocessing kind {kind!r}; expected one of {', '.join(KINDS)}")
    if len(model.inputs) != 1:
        raise ValueError(f"'{model.name}' has {len(model.inputs)} inputs; a preprocessed model has exactly one")
    try:
        produced = preprocess.output(PREPROCESSED[kind])
        scale = preprocess.output(DET_SCALE_OUTPUT) if kind == FACE_DETECTION else None
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} (the {kind} preprocessing contract)") from None
    consumed = model.inputs[0]
    link_from, link_to = preprocess.full_dims(produced), model.full_dims(consumed)
    if not consistent(preprocess, produced, model, consumed):
        raise ValueError(
            f"'{preprocess.name}' output '{produced.name}' ({produced.data_type} {list(link_from)}) cannot feed "
            f"'{model.name}' input '{consumed.name}' ({consumed.data_type} {list(link_to)})"
        )
    batch = min(preprocess.max_batch_size, model.max_batch_size)
    name = name or gpu_path_names(model.name).ensemble
    config = model_config(name, platform="ensemble", max_batch_size=batch)

    def add(tensors: Any, owner: ModelIO, tensor: TensorSpec, name: str) -> None:
        full = owner.full_dims(tensor)  # an unbatched ensemble's dims carry the batch axis
        add_tensor(tensors, name, tensor.data_type, full[1:] if batch > 0 else full)

    # (the model's output, the ensemble's name for it)
    if kind == CLIP_VISUAL:
        exported = [(model.outputs[0], CLIP_EMBEDDING)]
    else:
        exported = [(tensor, tensor.name) for tensor in model.outputs]
    passed_on = [produced.name] + ([DET_SCALE_OUTPUT] if scale is not None else [])
    for tensor in preprocess.inputs:
        add(config.input, preprocess, tensor, tensor.name)
    for tensor, name in exported:
        add(config.output, model, tensor, name)
    if scale is not None:
        add(config.output, preprocess, scale, DET_SCALE_OUTPUT)
    first = config.ensemble_scheduling.step.add(model_name=preprocess.name, model_version=-1)
    first.input_map.update({tensor.name: tensor.name for tensor in preprocess.inputs})
    first.output_map.update({name: name for name in passed_on})
    second = config.ensemble_scheduling.step.add(model_name=model.name, model_version=-1)
    second.input_map[consumed.name] = produced.name
    second.output_map.update({tensor.name: name for tensor, name in exported})
    return config_text(config)


def unbatched_config(config, name: str):
    """A copy of a model's ``ModelConfig`` named ``name`` that takes the batch as a
    plain leading dimension: ``max_batch_size`` 0, every tensor's dims led by -1, no
    ``dynamic_batching`` (a config already without a batch axis keeps its dims). The
    engine, profiles, instance groups and parameters are the model's own."""
    twin = type(config)()
    twin.CopyFrom(config)
    twin.name = name
    if config.max_batch_size > 0:
        twin.max_batch_size = 0
        for tensor in (*twin.input, *twin.output):
            dims = list(tensor.dims)
            del tensor.dims[:]
            tensor.dims.extend([-1, *dims])
        twin.ClearField("dynamic_batching")
    return twin


def _link(source: Path, dest: Path) -> None:
    """``dest`` -> ``source`` as a relative symbolic link (a copy where links fail),
    replacing what ``dest`` was."""
    if dest.is_symlink() and dest.resolve() == source.resolve():
        return
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        dest.symlink_to(Path("..") / ".." / source.parent.parent.name / source.parent.name / source.name)
    except OSError:
        shutil.copy2(source, dest)


def write_unbatched(repository: Path, base: str) -> str:
    """Write ``<base>__unbatched``: ``<base>``'s config as :func:`unbatched_config` and
    its version folder's files linked (the same engine or model file, loaded a second
    time). A recognizer's ensemble runs it: the preprocessing gives all of a request's
    faces or text lines as one sample, ``[1, N, ...]``, which Triton hands to a
    non-batching model as ``[N, ...]``. Returns its name. Raises as :func:`read_config`."""
    names = gpu_path_names(base)
    repository = Path(repository)
    config = unbatched_config(read_config(repository / base), names.unbatched)
    folder = repository / names.unbatched
    (folder / "1").mkdir(parents=True, exist_ok=True)
    for source in sorted((repository / base / "1").iterdir()):
        if source.is_file():
            _link(source, folder / "1" / source.name)
    write_if_changed(folder / "config.pbtxt", config_text(config))
    return names.unbatched


def write_ensembles(repository: Path, specs: Sequence[ModelSpec], settings: Settings | None = None) -> list[str]:
    """Write ``<base>__ensemble/config.pbtxt`` (and its empty version folder ``1/``) for
    every spec of a GPU-preprocessed kind, from the ``config.pbtxt`` of ``<base>`` (or
    ``<base>__unbatched`` for the recognizers) and ``<base>__preprocess`` already in
    ``repository``. Returns the ensemble names.

    ``settings`` is accepted so that every writer of the repository takes the same
    arguments; the ensembles depend only on the composing models. Raises
    ``FileNotFoundError`` for a missing composing config, ``ValueError`` (see
    :func:`ensemble_config_pbtxt`)."""
    written = []
    for spec in specs:
        kind = gpu_kind(spec.name)
        if kind is None:
            continue
        names = gpu_path_names(spec.name)
        model = names.unbatched if kind in SEQUENCE_KINDS else names.base
        text = ensemble_config_pbtxt(
            kind,
            read_model_io(Path(repository) / names.preprocess),
            read_model_io(Path(repository) / model),
            names.ensemble,
        )
        folder = Path(repository) / names.ensemble
        (folder / "1").mkdir(parents=True, exist_ok=True)
        write_if_changed(folder / "config.pbtxt", text)
        written.append(names.ensemble)
    return written


# ------------------------------------------------------------------ repository builder

#: ``build_engines(settings, repository, *, only, precision, gpus, force)``: writes the
#: models ``<base>`` with their ``config.pbtxt`` (default: the TensorRT builder). Not
#: :class:`immich_trt.tools.gpu.tensorrt.EngineBuilder`, which builds one engine.
ModelsWriter = Callable[..., Any]
#: ``write_preprocess(folder, kind, params, max_batch_size, device_ids=ids)``: writes
#: one preprocessing model (``config.pbtxt`` and its version folder) into ``folder``,
#: with one instance group per GPU id (default: DALI).
PreprocessWriter = Callable[..., Any]


def _tensorrt_builder(*args: Any, **kwargs: Any) -> Any:
    from .tensorrt import build_tensorrt_models

    return build_tensorrt_models(*args, **kwargs)


def _dali_writer(folder: Path, kind: str, params: dict, max_batch_size: int, device_ids: Sequence[int] = (0,)) -> Any:
    from .dali import write_dali_model

    return write_dali_model(folder, kind, params, max_batch_size, device_ids=device_ids)


def preprocess_params(settings: Settings, base: str) -> dict[str, Any]:
    """The parameters of the preprocessing of model ``base`` (read from its files in the
    model cache), as given to the preprocessing writers:

    * ``clip_visual``: ``{"size": S, "mean": [3 floats], "std": [3 floats]}``
      (``visual/preprocess_cfg.json``);
    * ``face_detection``: ``{"input_size": [width, height]}`` (640x640 unless the
      detector was exported for a fixed size);
    * ``ocr_detection``, ``ocr_recognition``: ``{}`` (sizes come with each request);
    * ``face_recognition``: ``{"mean": m, "std": s}`` (``arcface_normalisation``).

    Raises ``ValueError`` for a model that is not GPU-preprocessed."""
    from ...models import build_model
    from ...models.base import ModelContext
    from ...models.registry import resolve

    kind = gpu_kind(base)
    if kind is None:
        raise ValueError(f"'{base}' has no GPU preprocessing")
    if kind in (OCR_DETECTION, OCR_RECOGNITION):
        return {}
    parts = base.split("__")
    task, name, model_type = parts[0], "__".join(parts[1:-1]), parts[-1]
    source, _ = resolve(name, model_type, task)
    ctx = ModelContext(settings=settings)  # prepares files only: no runtime
    model = build_model(source, name, ModelType(model_type), ModelTask(task), ctx, {})
    model.prepare_files()
    if kind == CLIP_VISUAL:
        return clip_params(model.size, model.mean, model.std)
    if kind == FACE_RECOGNITION:
        return arcface_params(model.mean, model.std)
    return {"input_size": [int(v) for v in model.input_size]}


def build_gpu_repository(
    settings: Settings,
    repository: Path,
    only: list[str] | None = None,
    precision: str | None = None,
    gpus: Sequence[str] | None = None,
    force: bool = False,
    *,
    build_engines: ModelsWriter | None = None,
    write_preprocess: PreprocessWriter | None = None,
) -> GpuRepository:
    """Write the GPU target for every cached model (or only the named ones): the models
    (``build_engines``, default :func:`immich_trt.tools.gpu.tensorrt.build_tensorrt_models`,
    called as ``build_engines(settings, repository, only=, precision=, gpus=, force=)``),
    then for CLIP visual, face detection and recognition, OCR detection and recognition
    ``<base>__preprocess`` (``write_preprocess``, default
    :func:`immich_trt.tools.gpu.dali.write_dali_model`, with :func:`preprocess_params`,
    ``max_batch_size`` = the model's, at least :data:`PREPROCESS_MAX_BATCH_SIZE`, and
    one instance group per id of ``gpus``, default ``MACHINE_LEARNING_DEVICE_IDS``),
    ``<base>__unbatched`` for the recognizers (:func:`write_unbatched`) and the
    ensembles (:func:`write_ensembles`).

    A model whose build failed (no ``<base>/config.pbtxt``: the builder reported it)
    gets no preprocessing and no ensemble, and is listed in ``skipped``; every other
    kind is still written. Derived model files are kept beside their configs
    (``engines_dir = repository``). Returns what was written (:class:`GpuRepository`).
    Raises what the writers raise, ``ValueError`` if the models do not fit together or
    for bad GPU ids."""
    from .tensorrt import parse_device_ids

    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, engines_dir=repository)
    build_engines = build_engines or _tensorrt_builder
    write_preprocess = write_preprocess or _dali_writer
    ids = parse_device_ids(gpus if gpus is not None else settings.device_ids)
    models = build_engines(settings, repository, only=only, precision=precision, gpus=gpus, force=force)
    specs, skipped = [], []
    for spec in cached_specs(settings, only):
        if gpu_kind(spec.name) is None:
            continue
        if not spec.from_encoded_image:  # e.g. a recognizer whose lines are not 48 px high
            log.info("%s: preprocessed on the CPU (its inputs are not what the GPU steps make)", spec.name)
            continue
        if not (repository / spec.name / "config.pbtxt").is_file():
            log.error("%s: no model was built; its GPU preprocessing and ensemble are not written", spec.name)
            skipped.append(spec.name)
            continue
        specs.append(spec)
    preprocess = []
    for spec in specs:
        names = gpu_path_names(spec.name)
        kind = gpu_kind(spec.name)
        if kind in SEQUENCE_KINDS:
            write_unbatched(repository, spec.name)
            batch = PREPROCESS_MAX_BATCH_SIZE  # one request is one sample, whatever the model batches
        else:
            batch = max(read_model_io(repository / names.base).max_batch_size, PREPROCESS_MAX_BATCH_SIZE)
        write_preprocess(
            repository / names.preprocess, kind, preprocess_params(settings, spec.name), batch, device_ids=ids
        )
        preprocess.append(names.preprocess)
    return GpuRepository(models, preprocess, write_ensembles(repository, specs, settings), skipped)


# --------------------------------------------------------------------------- stand-ins


def reference_preprocess(
    kind: str,
    params: Mapping[str, Any],
    data: bytes,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The CPU reference of a preprocessing model, for one encoded image and its other
    inputs (``inputs``, by name; no batch axis anywhere):

    * ``clip_visual``: ``{"image": float32[3, S, S]}`` (``clip_preprocess``);
    * ``face_detection``: ``{"input.1": float32[3, h, w], "det_scale": float32[1]}``
      (``to_bgr`` + ``letterbox`` + ``detection_blob``);
    * ``ocr_detection`` (``resize_hw``, ``bucket_hw``): ``{"image_u8": uint8[Hb, Wb, 3]}``:
      PIL LANCZOS resize to ``resize_hw`` (as ``det_resize``), zero-padded bottom/right
      to ``bucket_hw``;
    * ``face_recognition`` (``face_landmarks`` [N, 5, 2]): ``{"aligned_faces":
      float32[N, 3, 112, 112]}`` (``norm_crop`` + ``recognition_blob``);
    * ``ocr_recognition`` (``line_coefficients`` [N, 8], ``line_geometry`` [N, 8]):
      ``{"text_lines": float32[N, 3, 48, W]}`` (``crop_text_line`` + ``line_tensor``).

    ``data`` is decoded as the server does (``decode_pil``): the recognizers' results
    are the CPU path's exactly. Raises ``ValueError`` for a bucket smaller than the
    resized image or a missing input, PIL's errors for undecodable bytes."""
    from PIL import Image

    from ...models.transforms import decode_pil

    inputs = inputs or {}
    needed = {FACE_RECOGNITION: (FACE_LANDMARKS,), OCR_RECOGNITION: (LINE_COEFFICIENTS, LINE_GEOMETRY)}.get(kind, ())
    if any(name not in inputs for name in needed):
        raise ValueError(f"{kind} preprocessing needs {', '.join(needed)}")
    image = decode_pil(bytes(data))
    if kind == FACE_RECOGNITION:
        from ...models.face import norm_crop, recognition_blob
        from ...models.transforms import to_bgr

        bgr = to_bgr(image)
        crops = [norm_crop(bgr, landmark) for landmark in np.asarray(inputs[FACE_LANDMARKS], np.float32)]
        return {PREPROCESSED[kind]: recognition_blob(crops, float(params["mean"]), float(params["std"]))}
    if kind == OCR_RECOGNITION:
        from ...models.ocr import crop_text_line, line_tensor

        columns = {name: i for i, name in enumerate(LINE_GEOMETRY_COLUMNS)}
        lines = []
        for coefficients, row in zip(np.asarray(inputs[LINE_COEFFICIENTS], np.float32), inputs[LINE_GEOMETRY]):
            size = np.array([row[columns["width"]], row[columns["height"]]], np.int32)
            crop = crop_text_line(image, coefficients, size)
            lines.append(line_tensor(crop, int(row[columns["resized_width"]]), int(row[columns["batch_width"]])))
        return {PREPROCESSED[kind]: np.stack(lines).astype(np.float32)}
    resize_hw, bucket_hw = inputs.get(RESIZE_HW), inputs.get(BUCKET_HW)
    if kind == CLIP_VISUAL:
        from ...models.clip import clip_preprocess

        mean, std = np.array(params["mean"], np.float32), np.array(params["std"], np.float32)
        return {PREPROCESSED[kind]: clip_preprocess(image, int(params["size"]), mean, std)[0]}
    if kind == FACE_DETECTION:
        from ...models.face import detection_blob, letterbox
        from ...models.transforms import to_bgr

        canvas, det_scale = letterbox(to_bgr(image), tuple(params["input_size"]))
        return {PREPROCESSED[kind]: detection_blob(canvas)[0], DET_SCALE_OUTPUT: np.array([det_scale], np.float32)}
    if kind == OCR_DETECTION:
        if resize_hw is None or bucket_hw is None:
            raise ValueError("OCR detection preprocessing needs resize_hw and bucket_hw")
        (h, w), (bh, bw) = (int(v) for v in resize_hw), (int(v) for v in bucket_hw)
        if bh < h or bw < w or h <= 0 or w <= 0:
            raise ValueError(f"bucket {bh}x{bw} cannot hold a {h}x{w} resized image")
        pixels = np.zeros((bh, bw, 3), np.uint8)
        pixels[:h, :w] = np.asarray(image.resize((w, h), resample=Image.Resampling.LANCZOS), dtype=np.uint8)
        return {PREPROCESSED[kind]: pixels}
    raise ValueError(f"unknown GPU preprocessing kind {kind!r}")


def write_standin_preprocess(folder: Path, kind: str, params: dict, max_batch_size: int, **_: Any) -> Path:
    """Write a python-backend ``<base>__preprocess`` running :func:`reference_preprocess`,
    with the DALI model's tensors (``immich_trt.tools.gpu.dali.io_specs``; same signature as
    the DALI writer; one CPU instance whatever GPU ids it is given). Returns ``folder``."""
    folder = Path(folder)
    inputs, outputs = io_specs(kind, params)
    config = model_config(folder.name, backend="python", max_batch_size=max_batch_size)
    for tensors, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            add_tensor(tensors, spec.name, spec.data_type, spec.dims)
    add_instance_group(config, "KIND_CPU", 1)
    add_parameters(config, {"kind": kind, "params": json.dumps(params, sort_keys=True)})
    (folder / "1").mkdir(parents=True, exist_ok=True)
    write_if_changed(folder / "config.pbtxt", config_text(config))
    write_if_changed(folder / "1" / "model.py", model_py_source(f"{__name__}.{PreprocessStandin.__name__}"))
    return folder


class PreprocessStandin:
    """``TritonPythonModel`` of the stand-ins: each request's rows (one encoded image
    each) through :func:`reference_preprocess`, stacked on the batch axis."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.kind = params["kind"]
        self.params = json.loads(params["params"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                others = [name for name in self.inputs if name != ENCODED_INPUT]
                rows = [
                    reference_preprocess(
                        self.kind, self.params, feed[ENCODED_INPUT][i].tobytes(), {n: feed[n][i] for n in others}
                    )
                    for i in range(feed[ENCODED_INPUT].shape[0])
                ]
                tensors = [pb_utils.Tensor(name, np.stack([row[name] for row in rows])) for name in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # noqa: BLE001 - any failure is this request's error response
                message = f"preprocessing failed: {type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def finalize(self) -> None:
        pass


def write_standin_models(settings: Settings, repository: Path, *, only: list[str] | None = None, **_: Any) -> list[str]:
    """Write every cached model (or only the named ones) as the CPU target's
    python-backend model (``immich_trt.runtime.repository``: onnxruntime on the ONNX
    file) with the batching of its TensorRT model (``max_batch_size`` of
    ``immich_trt.tools.gpu.tensorrt.engine_layout``): the same names and tensor contracts as
    the plans. Same call as the TensorRT builder; returns the names written."""
    from .tensorrt import engine_layout

    written = []
    for spec in cached_specs(settings, only):
        batch = engine_layout(spec, settings).max_batch_size
        inputs, outputs = onnx_io(Path(spec.onnx_path))
        if batch > 0:  # a batch-1 export batched as its engine is: a symbolic first axis
            inputs, outputs = ([(n, dtype, ["batch", *dims[1:]]) for n, dtype, dims in t] for t in (inputs, outputs))
        folder = Path(repository) / spec.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        text = config_pbtxt(dataclasses.replace(spec, max_batch_size=batch), inputs, outputs, settings)
        write_if_changed(folder / "config.pbtxt", text)
        write_if_changed(folder / "1" / "model.py", model_py_source())
        written.append(spec.name)
    return written


def write_standin_repository(settings: Settings, repository: Path, only: list[str] | None = None) -> GpuRepository:
    """The GPU target's repository with python-backend stand-ins, for machines without a
    GPU: :func:`build_gpu_repository` with :func:`write_standin_models` in place of the
    TensorRT builder and :func:`write_standin_preprocess` in place of the DALI writer.
    Same names, tensor contracts and batching, hence the same ensembles, as on a GPU;
    the answers are the CPU path's exactly. Serve it with any Triton that has the python
    backend (``TRITON_URL``, or ``IMMICH_TRT_TRITON_SERVER``). Returns what was written (``models``: the
    names of every model)."""
    return build_gpu_repository(
        settings, repository, only, build_engines=write_standin_models, write_preprocess=write_standin_preprocess
    )


# ---------------------------------------------------------------------- contract checks


def exact_det_scale(det_scale: np.ndarray, height: int) -> float:
    """The float64 ``det_scale = new_height / height`` of ``letterbox`` from the float32
    one the ensemble returns: ``new_height`` is an integer, recovered by rounding, so the
    boxes divide by exactly the CPU path's number."""
    return round(float(np.asarray(det_scale).reshape(-1)[0]) * height) / height
