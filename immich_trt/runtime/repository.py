"""The Triton model repository for the CPU target (``build_engines.py --target cpu``).

Each model is ``<repository>/<name>/config.pbtxt`` plus ``1/model.py``, a python-backend
model running the ONNX file from the Immich model cache with onnxruntime (Triton's own
onnxruntime backend ships only in NVIDIA's containers). Inputs and outputs are read
from the ONNX graph; a symbolic first dimension becomes the batch axis, with
``dynamic_batching`` and a ``max_batch_size`` per model:

===========================  ==============  =========================================
model                        max_batch_size  why
===========================  ==============  =========================================
OCR detection                4               whole images; equal shapes batch together
OCR recognition              max(8, MAX_BATCH_SIZE__OCR)  one request carries <= 6 lines
===========================  ==============  =========================================

This module is also the writer every target shares (the TensorRT models, DALI
pipelines, stand-ins and ensembles of :mod:`immich_trt.tools.gpu`): a ``config.pbtxt`` is
built as Triton's own ``ModelConfig`` message (:func:`model_config`,
:func:`add_tensor`, :func:`add_instance_group`, :func:`add_parameters`) and rendered
with protobuf's text format (:func:`config_text`); files land through
:func:`write_if_changed`; python-backend ``model.py`` files come from
:func:`model_py_source`.
"""

from __future__ import annotations

import logging
import os
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Settings
from .base import ModelSpec

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

#: ONNX TensorProto element types -> Triton data types.
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
}


def onnx_io(path: Path) -> tuple[list[tuple[str, int, list[int | str]]], list[tuple[str, int, list[int | str]]]]:
    """Graph inputs and outputs of an ONNX file as ``(name, elem_type, dims)``; a dim is
    an int, or a string for a symbolic/unknown dimension. Initializers are skipped."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def describe(values):
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            out.append((value.name, tensor.elem_type, dims))
        return out

    return describe(model.graph.input), describe(model.graph.output)


def triton_data_type(elem_type: int) -> str:
    """Triton data type name (``"TYPE_FP32"``...) of an ONNX ``TensorProto`` element type;
    ``"TYPE_FP32"`` for a type :data:`ONNX_TO_TRITON` does not list."""
    return ONNX_TO_TRITON.get(elem_type, "TYPE_FP32")


def triton_dims(dims: Sequence[int | str]) -> list[int]:
    """``config.pbtxt`` dims of ``onnx_io`` dims: a positive int is kept, anything else
    (symbolic, unknown, 0) becomes -1 (variable)."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims]


def _symbolic_batch(dims: list[int | str]) -> bool:
    return bool(dims) and (not isinstance(dims[0], int) or dims[0] <= 0)


# ----------------------------------------------------------------------- config.pbtxt


def model_config(name: str, *, platform: str = "", backend: str = "", max_batch_size: int = 0) -> ModelConfig:
    """A new Triton ``ModelConfig`` message (``tritonclient.grpc.model_config_pb2``)
    with its name, ``platform`` or ``backend``, and ``max_batch_size`` (0: no batch axis).
    Raises ``ValueError`` for a negative ``max_batch_size``."""
    from tritonclient.grpc import model_config_pb2

    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, not {max_batch_size}")
    return model_config_pb2.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=max_batch_size)


def add_tensor(tensors: Any, name: str, data_type: str, dims: Sequence[int], **fields: Any) -> Any:
    """Append a tensor to ``tensors`` (a config's ``input`` or ``output`` field) and return
    it: ``data_type`` a Triton type name (``"TYPE_UINT8"``...), ``dims`` without the batch
    axis when ``max_batch_size`` > 0 (-1: variable); ``fields`` other ``ModelInput`` /
    ``ModelOutput`` fields (e.g. ``allow_ragged_batch=True``). Raises ``ValueError`` for
    an unknown type name."""
    from tritonclient.grpc import model_config_pb2

    return tensors.add(name=name, data_type=model_config_pb2.DataType.Value(data_type), dims=list(dims), **fields)


def add_instance_group(
    config: ModelConfig, kind: str, count: int = 1, gpus: Sequence[int] = (), profile: Sequence[str] = ()
) -> None:
    """Append an ``instance_group``: ``kind`` ``"KIND_CPU"`` or ``"KIND_GPU"``, ``count``
    instances on each of ``gpus`` (none: Triton's choice), TensorRT ``profile`` names.
    Raises ``ValueError`` for an unknown kind."""
    from tritonclient.grpc import model_config_pb2

    config.instance_group.add(
        kind=model_config_pb2.ModelInstanceGroup.Kind.Value(kind),
        count=count,
        gpus=[int(gpu) for gpu in gpus],
        profile=list(profile),
    )


def add_parameters(config: ModelConfig, params: Mapping[str, str]) -> None:
    """Set ``parameters`` ``{key: {string_value: value}}`` for every item of ``params``."""
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def config_text(config: ModelConfig, comments: Sequence[str] = ()) -> str:
    """``config.pbtxt`` text of a ``ModelConfig``: protobuf's text format (fields in
    the order of Triton's ``model_config.proto``, repeated numbers as ``[a, b]``, UTF-8
    kept), after ``comments`` as ``# `` lines (ignored by every reader)."""
    from google.protobuf import text_format

    header = "".join(f"# {line}\n" for line in comments)
    return header + text_format.MessageToString(config, use_short_repeated_primitives=True, use_index_order=True)


def write_if_changed(path: Path, data: str | bytes) -> bool:
    """Write ``data`` (``str``: as UTF-8) to ``path`` unless the file already holds
    exactly those bytes; returns whether it was written. Parent folders are created; the
    bytes go to a temporary file in the same folder, then ``os.replace``, so readers see
    the old file or the new one, never a part. Raises ``OSError``."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path = Path(path)
    try:
        if path.stat().st_size == len(raw) and path.read_bytes() == raw:
            return False
    except OSError:
        pass  # absent or unreadable: write it
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def config_pbtxt(spec: ModelSpec, inputs, outputs, settings: Settings) -> str:
    """``config.pbtxt`` text for a python-backend ONNX model; ``inputs``/``outputs`` as
    :func:`onnx_io` gives them (``(name, elem_type, dims)``, batch axis included).

    The batch axis is used only when every input's first dimension is symbolic and
    ``spec.max_batch_size > 0``; otherwise the model is unbatched (``max_batch_size: 0``,
    dims in full). Batched models get ``dynamic_batching`` without queue delay."""
    batched = spec.max_batch_size > 0 and all(_symbolic_batch(dims) for _, _, dims in inputs)
    inter, intra = settings.ort_threads
    config = model_config(spec.name, backend="python", max_batch_size=spec.max_batch_size if batched else 0)
    for tensors, items in ((config.input, inputs), (config.output, outputs)):
        for name, elem_type, dims in items:
            add_tensor(tensors, name, triton_data_type(elem_type), triton_dims(dims[1:] if batched else dims))
    if batched:
        # no queue delay: batch what is already waiting, never hold a request back
        config.dynamic_batching.max_queue_delay_microseconds = 0
        config.dynamic_batching.SetInParent()
    add_instance_group(config, "KIND_CPU", count=max(1, settings.triton_instances))
    add_parameters(
        config,
        {
            "onnx_path": str(Path(spec.onnx_path).resolve()),
            "inter_op_num_threads": str(inter),
            "intra_op_num_threads": str(intra),
            "arena": "true" if settings.model_arena else "false",
            "allow_spinning": "true" if settings.ort_spinning else "false",
        },
    )
    return config_text(config)


#: ``model.py`` that serves a class of this package as ``TritonPythonModel``.
_CLASS_MODEL_PY = '''"""Triton python-backend model: serves {model_class}."""

import sys

for _path in ({package_root!r}, {site_packages!r}):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from {module} import {name} as TritonPythonModel  # noqa: E402,F401
'''


def model_py_source(model_class: str | None = None) -> str:
    """A python-backend ``model.py`` with this installation's package root and
    site-packages first on ``sys.path`` (the backend stub ignores PYTHONPATH).

    Without ``model_class``: :mod:`immich_trt.runtime.triton_python_model` (onnxruntime on
    the ``onnx_path`` parameter). With ``"package.module.Class"``: a file importing that
    class as ``TritonPythonModel``. Raises ``ValueError`` for a name without a module."""
    package_root = str(Path(__file__).resolve().parents[2])
    site_packages = sysconfig.get_paths()["purelib"]
    if model_class is None:
        source = resources.files("immich_trt.runtime").joinpath("triton_python_model.py").read_text(encoding="utf-8")
        return source.replace("@SITE_PACKAGES@", site_packages).replace("@PACKAGE_ROOT@", package_root)
    module, _, name = model_class.rpartition(".")
    if not module or not name:
        raise ValueError(f"model_class must be 'package.module.Class', not {model_class!r}")
    return _CLASS_MODEL_PY.format(
        model_class=model_class, package_root=package_root, site_packages=site_packages, module=module, name=name
    )


def write_model(repository: Path, spec: ModelSpec, settings: Settings) -> Path:
    """Write (or rewrite) one model of the repository; returns its folder.

    Raises ``FileNotFoundError`` if the ONNX file is missing."""
    if not Path(spec.onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {spec.onnx_path}")
    inputs, outputs = onnx_io(Path(spec.onnx_path))
    folder = repository / spec.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    write_if_changed(folder / "config.pbtxt", config_pbtxt(spec, inputs, outputs, settings))
    write_if_changed(folder / "1" / "model.py", model_py_source())
    return folder
