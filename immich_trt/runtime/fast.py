"""Fast mode (``IMMICH_TRT_FAST=true``, off by default): the in-process runtime serves
some models from faster files or engines, trading a little fidelity for speed.

* CLIP visual encoders and ArcFace recognizers: the int8 file that
  ``immich-trt models quantize`` wrote beside the other generated files
  (:func:`int8_file`: ``<IMMICH_TRT_ENGINES_DIR>/<model>/model.int8.onnx``, static
  quantization calibrated on the user's own images), run by ONNX Runtime, when it was
  made from the very file the model would otherwise serve (:mod:`.derived`). Otherwise
  the fp32 file, with one log line saying how to build it.
* PP-OCR detectors and recognizers: OpenVINO's CPU plugin (:mod:`.openvino`, the
  ``[fast]`` extra) on the same ONNX file; without ``openvino``, ONNX Runtime and one
  log line.
* Every other model: exactly what default mode serves.

The fidelity goals (measured against the fp32 answers with ``immich-trt bench``, see
``docs/fast-mode.md``): CLIP cosine >= 0.995, the same faces with boxes within 2 px and
embedding cosine >= 0.99, at least 97% of OCR lines identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import ModelSpec
from .derived import is_up_to_date
from .onnxruntime import make_session
from .openvino import OpenVinoSession, openvino_available

log = logging.getLogger(__name__)

INT8_FILENAME = "model.int8.onnx"

#: (task, type) of the models fast mode serves from an int8 file.
QUANTIZED = frozenset({("clip", "visual"), ("facial-recognition", "recognition")})
#: tasks whose models fast mode runs in OpenVINO.
OPENVINO_TASKS = frozenset({"ocr"})


def task_and_type(name: str) -> tuple[str, str]:
    """``("clip", "visual")`` for the runtime name ``clip__ViT-B-32__openai__visual``
    (``<task>__<model>__<type>``; a model name may itself contain ``__``)."""
    parts = name.split("__")
    return (parts[0], parts[-1]) if len(parts) >= 3 else ("", "")


def is_quantized(name: str) -> bool:
    """Whether fast mode serves runtime model ``name`` from an int8 file."""
    return task_and_type(name) in QUANTIZED


def int8_file(engines_dir: Path, name: str) -> Path:
    """Where ``immich-trt models quantize`` writes, and fast mode reads, the int8 file
    of runtime model ``name``."""
    return Path(engines_dir) / name / INT8_FILENAME


class FastSessions:
    """The in-process runtime's session factory in fast mode (see the module docstring).

    Called as ``factory(spec, inter_op, intra_op, arena, spinning, **options)`` (the
    parameters of :func:`.onnxruntime.make_session` after the path) for each session the
    runtime opens (a model's wide and narrow sessions); returns an object with
    ``run(output_names, feeds)`` and ``get_outputs()``. ``openvino=None`` detects the
    package. ``served`` maps each model name to what it is served with (``"int8"``,
    ``"openvino"`` or ``"fp32"``), for the log and tests. Raises what ONNX Runtime or
    OpenVINO raise for a file they cannot load.
    """

    def __init__(self, engines_dir: Path, openvino: bool | None = None) -> None:
        self.engines_dir = Path(engines_dir)
        self.openvino = openvino_available() if openvino is None else openvino
        self.served: dict[str, str] = {}
        self._said_no_openvino = False

    def choose(self, spec: ModelSpec) -> tuple[str, Path]:
        """(``"int8"``, ``"openvino"`` or ``"fp32"``, the file to load) for ``spec``; logs
        once per model when fast mode cannot serve it faster, saying what to do."""
        task, _ = task_and_type(spec.name)
        first = spec.name not in self.served
        if is_quantized(spec.name):
            quantized = int8_file(self.engines_dir, spec.name)
            if is_up_to_date(quantized, Path(spec.onnx_path)):
                return self._serve(spec, "int8", quantized)
            if first:
                why = "is older than the model file" if quantized.is_file() else "is missing"
                log.warning(
                    "Fast mode: %s's int8 file %s %s, so the fp32 model serves it; build it with "
                    "`immich-trt models quantize --images DIR` (a folder of your photos)",
                    spec.name, quantized, why,
                )  # fmt: skip
        elif task in OPENVINO_TASKS:
            if self.openvino:
                return self._serve(spec, "openvino", Path(spec.onnx_path))
            if not self._said_no_openvino:
                self._said_no_openvino = True
                log.warning(
                    "Fast mode: openvino is not installed, so ONNX Runtime runs the OCR models; "
                    "install it with `pip install -e '.[fast]'`"
                )
        return self._serve(spec, "fp32", Path(spec.onnx_path))

    def _serve(self, spec: ModelSpec, how: str, path: Path) -> tuple[str, Path]:
        if self.served.get(spec.name) != how:
            log.info("Fast mode: %s runs %s (%s)", spec.name, how, path)
        self.served[spec.name] = how
        return how, path

    def __call__(self, spec: ModelSpec, inter_op: int, intra_op: int, arena: bool, spinning: bool, **options):
        how, path = self.choose(spec)
        if how == "openvino":
            return OpenVinoSession(path, intra_op)
        return make_session(path, inter_op, intra_op, arena, spinning, **options)
