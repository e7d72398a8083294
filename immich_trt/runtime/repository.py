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
"""

from __future__ import annotations

import logging
import sysconfig
from importlib import resources
from pathlib import Path

from ..config import Settings
from .base import ModelSpec

log = logging.getLogger(__name__)

#: ONNX TensorProto element types -> Triton data types.
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64"}


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


def _dims(dims: list[int | str]) -> str:
    return ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims)


def _symbolic_batch(dims: list[int | str]) -> bool:
    return bool(dims) and (not isinstance(dims[0], int) or dims[0] <= 0)


def config_pbtxt(spec: ModelSpec, inputs, outputs, settings: Settings) -> str:
    """``config.pbtxt`` text for a python-backend ONNX model.

    The batch axis is used only when every input's first dimension is symbolic and
    ``spec.max_batch_size > 0``; otherwise the model is unbatched (``max_batch_size: 0``)."""
    batched = spec.max_batch_size > 0 and all(_symbolic_batch(dims) for _, _, dims in inputs)
    inter, intra = settings.ort_threads
    lines = [f'name: "{spec.name}"', 'backend: "python"', f"max_batch_size: {spec.max_batch_size if batched else 0}"]

    def tensors(kind: str, items) -> None:
        lines.append(f"{kind} [")
        entries = []
        for name, elem_type, dims in items:
            shown = dims[1:] if batched else dims
            entries.append(
                f'  {{ name: "{name}" data_type: {ONNX_TO_TRITON.get(elem_type, "TYPE_FP32")} dims: [ {_dims(shown)} ] }}'
            )
        lines.append(",\n".join(entries))
        lines.append("]")

    tensors("input", inputs)
    tensors("output", outputs)
    if batched:
        # no queue delay: batch what is already waiting, never hold a request back
        lines.append("dynamic_batching { max_queue_delay_microseconds: 0 }")
    lines.append(f"instance_group [ {{ kind: KIND_CPU count: {max(1, settings.triton_instances)} }} ]")
    params = {
        "onnx_path": str(Path(spec.onnx_path).resolve()),
        "inter_op_num_threads": str(inter),
        "intra_op_num_threads": str(intra),
        "arena": "true" if settings.model_arena else "false",
        "allow_spinning": "true" if settings.ort_spinning else "false",
    }
    for key, value in params.items():
        lines.append(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def model_py_source() -> str:
    """The python-backend ``model.py`` with this installation's site-packages filled in."""
    source = resources.files("immich_trt.runtime").joinpath("triton_python_model.py").read_text(encoding="utf-8")
    package_root = str(Path(__file__).resolve().parents[2])
    return source.replace("@SITE_PACKAGES@", sysconfig.get_paths()["purelib"]).replace("@PACKAGE_ROOT@", package_root)


def write_model(repository: Path, spec: ModelSpec, settings: Settings) -> Path:
    """Write (or rewrite) one model of the repository; returns its folder.

    Raises ``FileNotFoundError`` if the ONNX file is missing."""
    if not Path(spec.onnx_path).is_file():
        raise FileNotFoundError(f"ONNX file not found: {spec.onnx_path}")
    inputs, outputs = onnx_io(Path(spec.onnx_path))
    folder = repository / spec.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "config.pbtxt", config_pbtxt(spec, inputs, outputs, settings))
    _write_if_changed(folder / "1" / "model.py", model_py_source())
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def cached_specs(settings: Settings, only: list[str] | None = None) -> list[ModelSpec]:
    """Specs of every servable model whose ONNX file is in the Immich model cache
    (``<cache>/<task>/<model>/<type>/model.onnx``), derived files prepared."""
    from ..models import build_model
    from ..models.base import ModelContext
    from ..models.registry import ModelTask, ModelType, resolve

    import dataclasses

    # the served models themselves, whatever IMMICH_TRT_PREPROCESS says (gpu mode's specs
    # name its ensembles)
    settings = dataclasses.replace(settings, preprocess="cpu")
    ctx = ModelContext(settings=settings, runtime=None)  # type: ignore[arg-type]
    specs: dict[str, ModelSpec] = {}
    for path in sorted(Path(settings.cache_folder).glob("*/*/*/model.onnx")):
        model_type, name, task = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        try:
            source, _ = resolve(name, model_type, task)
        except ValueError:
            log.warning("Skipping %s: not an Immich model", path)
            continue
        model = build_model(source, name, ModelType(model_type), ModelTask(task), ctx, {})
        if model.model_file != path:
            continue  # e.g. a language-prefixed name's detector lives under the plain name
        if only and getattr(model, "triton_name", None) not in only:
            continue
        model.prepare_files()
        for spec in model.specs():
            specs[spec.name] = spec
    return list(specs.values())


def build_repository(settings: Settings, repository: Path, only: list[str] | None = None) -> list[str]:
    """Write the CPU-target repository for every cached model (or only the named ones).

    Returns the names written."""
    import dataclasses

    repository.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, engines_dir=repository)  # derived files live beside their config
    written = []
    for spec in cached_specs(settings, only):
        write_model(repository, spec, settings)
        written.append(spec.name)
    return written
