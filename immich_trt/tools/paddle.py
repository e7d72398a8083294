"""Import a PaddleOCR inference model into the Immich model cache
(``immich-trt models import-paddle``).

A PaddleOCR inference model is a folder with the program (``inference.json``, PIR, or
the legacy ``inference.pdmodel``), its weights (``inference.pdiparams``) and its
configuration (``inference.yml``: ``PreProcess.transform_ops``, ``PostProcess``). This
module converts it offline with ``paddle2onnx`` (opset 14, no optimizer: the default
one installs packages from another index on first use) into
``<cache>/ocr/<name>/<detection|recognition>/model.onnx`` and writes into the file:

* ``character``: the recognizer's dictionary (``PostProcess.character_dict``), one per
  line, as Immich's (RapidOCR's) files carry it;
* :data:`~immich_trt.models.ocr.METADATA_KEY`: the processing the server applies
  (:mod:`immich_trt.models.ocr.processing`). With ``processing="paddle"`` (default)
  the detector's normalisation (``NormalizeImage`` mean/std/scale on the BGR image)
  and DB parameters (``thresh``, ``box_thresh``, ``unclip_ratio``, ``max_candidates``,
  ``use_dilation``, PaddleOCR's defaults where absent) come from ``inference.yml``;
  with ``"immich"`` the detector is served with Immich's PP-OCRv5 constants. The
  recognizer's input height and minimum width (``RecResizeImg.image_shape``) always
  come from ``inference.yml``. The resize limit is the request's ``maxResolution``
  (Immich's setting), as for every model; the yml's ``DetResizeForTest`` is reported.

Refused, with the reason: post-processing other than DB detection (``DBPostProcess``)
or CTC recognition (``CTCLabelDecode``), an RGB-ordered or non-3-channel input, a
detector or recognizer whose graph fixes the input size Immich varies, a dictionary
that does not match the network's classes, and a conversion that fails.
Needs the ``[paddle]`` extra (``paddlepaddle``, ``paddle2onnx``, ``pyyaml``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import clean_name
from ..models.ocr.catalog import paddle_normalisation
from ..models.ocr.processing import (
    IMMICH_DETECTION,
    METADATA_KEY,
    DetectionProcessing,
    RecognitionProcessing,
    to_metadata,
)
from ..models.onnxfile import save_onnx_atomic
from ..models.registry import PADDLE_MODELS, PPOCRV6_MODELS, ModelTask, ModelType, model_path

log = logging.getLogger(__name__)

PROCESSING_CHOICES = ("paddle", "immich")
#: ONNX opset of the conversion (what ``paddle2onnx`` and Immich's files use for PP-OCR).
OPSET = 14
#: PaddleOCR ``DBPostProcess`` defaults for keys an ``inference.yml`` leaves out.
PADDLE_DB_DEFAULTS = {"thresh": 0.3, "box_thresh": 0.7, "max_candidates": 1000, "unclip_ratio": 2.0, "use_dilation": False}


class PaddleImportError(ValueError):
    """The folder holds no PaddleOCR model this server can serve (the message says why)."""


@dataclass(frozen=True)
class PaddleModel:
    """The files and configuration of one PaddleOCR inference model folder."""

    folder: Path
    program: Path  # inference.json (PIR) or *.pdmodel (legacy)
    params: Path
    config: dict[str, Any]

    @property
    def model_name(self) -> str:
        return str((self.config.get("Global") or {}).get("model_name") or self.folder.name)

    @property
    def post_process(self) -> dict[str, Any]:
        post = self.config.get("PostProcess")
        if not isinstance(post, dict) or "name" not in post:
            raise PaddleImportError(f"{self.folder}/inference.yml has no PostProcess.name")
        return post

    def transform(self, name: str) -> dict[str, Any] | None:
        """The arguments of ``PreProcess.transform_ops`` entry ``name`` ({} when it
        has none), or None when the list has no such entry."""
        ops = (self.config.get("PreProcess") or {}).get("transform_ops") or []
        for op in ops:
            if isinstance(op, dict) and name in op:
                return op[name] or {}
        return None

    @property
    def task(self) -> ModelType:
        """``detection`` for ``DBPostProcess``, ``recognition`` for ``CTCLabelDecode``."""
        name = self.post_process["name"]
        if name == "DBPostProcess":
            return ModelType.DETECTION
        if name == "CTCLabelDecode":
            return ModelType.RECOGNITION
        raise PaddleImportError(
            f"{self.model_name}: PostProcess '{name}' cannot be served; Immich's OCR runs DB text detection "
            "(DBPostProcess) and CTC recognition (CTCLabelDecode) only"
        )


def read_model_folder(folder: Path) -> PaddleModel:
    """Find the program, weights and ``inference.yml`` of a PaddleOCR model folder.
    Raises :class:`PaddleImportError` naming what is missing."""
    import yaml

    folder = Path(folder)
    if not folder.is_dir():
        raise PaddleImportError(f"{folder} is not a folder")
    program = folder / "inference.json"
    if not program.is_file():
        legacy = sorted(folder.glob("*.pdmodel"))
        if not legacy:
            raise PaddleImportError(f"{folder} has neither inference.json nor a .pdmodel program")
        program = legacy[0]
    params = program.with_suffix(".pdiparams")
    if not params.is_file():
        candidates = sorted(folder.glob("*.pdiparams"))
        if len(candidates) != 1:
            raise PaddleImportError(f"{folder} has no {params.name} (the weights)")
        params = candidates[0]
    config_file = folder / "inference.yml"
    if not config_file.is_file():
        raise PaddleImportError(f"{folder} has no inference.yml (pre/post-processing and dictionary)")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PaddleImportError(f"{config_file} is not readable YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise PaddleImportError(f"{config_file} is not a mapping")
    return PaddleModel(folder, program, params, config)


def _number(value: Any, what: str) -> float:
    """A yml number, also written as a fraction (``1./255.``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:/\s*([0-9.eE+-]+)\s*)?", value)
        if match:
            try:
                number = float(match.group(1))
                return number / float(match.group(2)) if match.group(2) else number
            except (ValueError, ZeroDivisionError):
                pass
    raise PaddleImportError(f"{what} is not a number: {value!r}")


def _check_bgr(model: PaddleModel) -> None:
    decode = model.transform("DecodeImage")
    mode = str((decode or {}).get("img_mode", "BGR")).upper()
    if mode != "BGR":
        raise PaddleImportError(f"{model.model_name}: DecodeImage.img_mode {mode}; the server feeds BGR images")


def detection_processing(model: PaddleModel, processing: str) -> tuple[DetectionProcessing, list[str]]:
    """The detector's processing (``"paddle"``: from ``inference.yml``; ``"immich"``:
    Immich's constants) and notes on what the yml says but the server does not apply."""
    _check_bgr(model)
    notes = []
    resize = model.transform("DetResizeForTest")
    if resize:
        notes.append(f"DetResizeForTest {resize} not applied: the request's maxResolution bounds the shorter side")
    if processing == "immich":
        return IMMICH_DETECTION, notes
    post = {**PADDLE_DB_DEFAULTS, **model.post_process}
    normalize = model.transform("NormalizeImage")
    if normalize is None:
        raise PaddleImportError(f"{model.model_name}: no NormalizeImage in PreProcess; use --processing immich")
    if str(normalize.get("order", "hwc")).lower() != "hwc":
        raise PaddleImportError(f"{model.model_name}: NormalizeImage.order {normalize.get('order')} is not hwc")
    scale = _number(normalize.get("scale", 1.0 / 255.0), "NormalizeImage.scale")
    mean = tuple(_number(v, "NormalizeImage.mean") for v in normalize.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(_number(v, "NormalizeImage.std") for v in normalize.get("std", (0.229, 0.224, 0.225)))
    try:
        subtract, multiply = paddle_normalisation(mean, std, scale)
        result = DetectionProcessing(
            subtract=subtract,
            multiply=multiply,
            thresh=_number(post["thresh"], "PostProcess.thresh"),
            box_thresh=_number(post["box_thresh"], "PostProcess.box_thresh"),
            unclip_ratio=_number(post["unclip_ratio"], "PostProcess.unclip_ratio"),
            max_candidates=int(_number(post["max_candidates"], "PostProcess.max_candidates")),
            use_dilation=bool(post["use_dilation"]),
            source=f"{model.model_name} inference.yml",
        )
    except ValueError as exc:
        raise PaddleImportError(f"{model.model_name}: {exc}") from exc
    if str(post.get("score_mode", "fast")) != "fast":
        notes.append(f"score_mode {post['score_mode']} not applied: the request's scoreMode decides (fast by default)")
    return result, notes


def recognition_processing(model: PaddleModel) -> tuple[RecognitionProcessing, list[str]]:
    """The recognizer's input shape from ``RecResizeImg.image_shape`` ``[3, H, W]`` and
    its dictionary. Raises :class:`PaddleImportError` when either is unusable."""
    _check_bgr(model)
    resize = model.transform("RecResizeImg")
    shape = (resize or {}).get("image_shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise PaddleImportError(f"{model.model_name}: no RecResizeImg.image_shape [3, H, W] in PreProcess")
    channels, height, width = (int(_number(v, "RecResizeImg.image_shape")) for v in shape)
    if channels != 3:
        raise PaddleImportError(f"{model.model_name}: {channels}-channel recognizer input; the server feeds 3 (BGR)")
    try:
        result = RecognitionProcessing(height=height, min_width=width, source=f"{model.model_name} inference.yml")
    except ValueError as exc:
        raise PaddleImportError(f"{model.model_name}: {exc}") from exc
    return result, []


def characters(model: PaddleModel) -> list[str]:
    """``PostProcess.character_dict`` as strings. Raises :class:`PaddleImportError`
    when it is missing or empty."""
    chars = model.post_process.get("character_dict")
    if not isinstance(chars, list) or not chars:
        raise PaddleImportError(f"{model.model_name}: inference.yml has no PostProcess.character_dict")
    out = ["" if c is None else str(c) for c in chars]
    if any("\n" in c or "\r" in c for c in out):
        raise PaddleImportError(f"{model.model_name}: a dictionary entry holds a line break")
    return out


def convert(model: PaddleModel) -> bytes:
    """The model as ONNX bytes (``paddle2onnx.export``, opset :data:`OPSET`, no optimizer).
    Raises :class:`PaddleImportError` when ``paddle2onnx`` is missing or fails."""
    import warnings

    try:
        with warnings.catch_warnings():  # paddle warns about a missing compiler cache on import
            warnings.simplefilter("ignore")
            import paddle2onnx
    except ImportError as exc:
        raise PaddleImportError(
            f"paddle2onnx cannot be imported ({exc}); install the [paddle] extra: pip install 'immich-trt[paddle]'"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="import-paddle-") as tmp:
        out = Path(tmp) / "model.onnx"
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                paddle2onnx.export(
                    str(model.program), str(model.params), save_file=str(out), opset_version=OPSET, optimize_tool="None"
                )
        except Exception as exc:  # paddle2onnx logs its own error and then fails on the missing result
            raise PaddleImportError(f"paddle2onnx could not convert {model.program}: {exc}") from exc
        finally:
            for line in captured.getvalue().splitlines():
                log.debug("paddle2onnx: %s", line)
        if not out.is_file() or out.stat().st_size == 0:
            raise PaddleImportError(f"paddle2onnx wrote nothing for {model.program}")
        return out.read_bytes()


def _drop_unused_initializers(graph) -> None:
    """Remove initializers no node reads (paddle2onnx leaves some; ONNX Runtime warns)."""
    used: set[str] = set()

    def collect(g) -> None:
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    collect(attr.g)
                for sub in attr.graphs:
                    collect(sub)

    collect(graph)
    used.update(o.name for o in graph.output)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _check_io(onnx_bytes: bytes, task: ModelType, n_chars: int | None, height: int | None) -> None:
    """Run the converted graph once on a small input (ONNX Runtime) and check what the
    server relies on: detection ``[N, 3, H, W]`` -> ``[N, 1, H, W]`` with free H and W;
    recognition ``[N, 3, height, W]`` with free W -> ``[N, T, C]``, ``C`` the dictionary
    plus blank (and space)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dims = list(inp.shape)
    if len(dims) != 4 or dims[1] not in (3, "3"):
        raise PaddleImportError(f"the converted graph takes {dims}, not [N, 3, H, W]")
    if task is ModelType.DETECTION:
        if isinstance(dims[2], int) or isinstance(dims[3], int):
            raise PaddleImportError(f"the detector's input size is fixed ({dims}); Immich's detector input varies")
        out = session.run(None, {inp.name: np.zeros((1, 3, 64, 96), np.float32)})[0]
        if out.shape != (1, 1, 64, 96):
            raise PaddleImportError(f"the detector maps a 64x96 input to {list(out.shape)}, not [1, 1, 64, 96]")
        return
    if isinstance(dims[3], int):
        raise PaddleImportError(f"the recognizer's input width is fixed ({dims}); line crops vary in width")
    if isinstance(dims[2], int) and dims[2] != height:
        raise PaddleImportError(f"the graph takes lines {dims[2]} px high, inference.yml says {height}")
    out = session.run(None, {inp.name: np.zeros((1, 3, height, 4 * height), np.float32)})[0]
    classes = out.shape[-1]
    if out.ndim != 3 or classes not in (n_chars + 1, n_chars + 2):
        raise PaddleImportError(
            f"the recognizer predicts {classes} classes ({list(out.shape)}); its dictionary of {n_chars} "
            f"characters needs {n_chars + 2} (blank, characters, space) or {n_chars + 1}"
        )


@dataclass(frozen=True)
class ImportResult:
    path: Path
    task: ModelType
    processing: DetectionProcessing | RecognitionProcessing
    characters: int | None
    notes: tuple[str, ...]


def check_name(name: str) -> str:
    """The cleaned model name to import under. Raises :class:`PaddleImportError` for
    an empty name, one holding Immich's language separator ``__``, or a name the server
    already serves from its own files."""
    cleaned = clean_name(name)
    if not cleaned or cleaned != name:
        raise PaddleImportError(f"model name {name!r} must be a plain name (no '/', ':', '\\\\' or '.')")
    if "__" in cleaned:
        raise PaddleImportError(f"model name {name!r}: '__' separates Immich's language prefix; choose another")
    if cleaned in PADDLE_MODELS or cleaned in PPOCRV6_MODELS:
        raise PaddleImportError(f"'{name}' is a model the server obtains itself; import under another name")
    return cleaned


def import_paddle(
    folder: Path,
    name: str,
    cache_folder: Path,
    task: str | None = None,
    processing: str = "paddle",
    force: bool = False,
) -> ImportResult:
    """Convert the PaddleOCR model in ``folder`` into
    ``<cache_folder>/ocr/<name>/<task>/model.onnx`` (see the module docstring).

    ``task``: ``"detection"``/``"recognition"`` or None (from ``PostProcess.name``);
    ``processing``: ``"paddle"`` or ``"immich"`` (the detector's normalisation and DB
    parameters). An existing file is replaced only with ``force``.
    Raises :class:`PaddleImportError` with the reason for anything it cannot serve."""
    import onnx

    if processing not in PROCESSING_CHOICES:
        raise PaddleImportError(f"processing must be one of {PROCESSING_CHOICES}, not {processing!r}")
    cleaned = check_name(name)
    model = read_model_folder(folder)
    found = model.task
    if task is not None and ModelType(task) is not found:
        raise PaddleImportError(f"{model.model_name} is a {found} model (PostProcess {model.post_process['name']}), not {task}")
    dest = model_path(cache_folder, ModelTask.OCR, cleaned, found)
    if dest.exists() and not force:
        raise PaddleImportError(f"{dest} exists; pass --force to replace it")

    chars: list[str] | None = None
    if found is ModelType.DETECTION:
        params, notes = detection_processing(model, processing)
        height = None
    else:
        params, notes = recognition_processing(model)
        chars = characters(model)
        height = params.height
    onnx_bytes = convert(model)
    proto = onnx.load_model_from_string(onnx_bytes)
    _drop_unused_initializers(proto.graph)
    onnx_bytes = proto.SerializeToString()
    _check_io(onnx_bytes, found, len(chars) if chars else None, height)

    for key in ("character", METADATA_KEY):
        for prop in [p for p in proto.metadata_props if p.key == key]:
            proto.metadata_props.remove(prop)
    if chars is not None:
        proto.metadata_props.add(key="character", value="\n".join(chars))
    proto.metadata_props.add(key=METADATA_KEY, value=to_metadata(params))
    proto.producer_name = proto.producer_name or "paddle2onnx"
    proto.doc_string = f"{model.model_name} converted from PaddlePaddle by immich-trt models import-paddle"
    save_onnx_atomic(proto, dest)
    stale = dest.with_name("characters.txt")
    if stale.exists():
        os.unlink(stale)  # the metadata is the dictionary now
    return ImportResult(dest, found, params, len(chars) if chars else None, tuple(notes))
