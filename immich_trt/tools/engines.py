"""Triton model repositories from the Immich model cache: the models it holds, and the
CPU target (``immich-trt build-engines --target cpu``): a python-backend model running
each ONNX file with onnxruntime, written by :mod:`immich_trt.runtime.repository`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config import Settings
from ..models import build_model
from ..models.base import ModelContext
from ..models.registry import ModelTask, ModelType, resolve
from ..runtime.base import ModelSpec
from ..runtime.repository import write_model

log = logging.getLogger(__name__)


def cached_specs(settings: Settings, only: list[str] | None = None) -> list[ModelSpec]:
    """Specs of every servable model whose ONNX file is in the Immich model cache
    (``<cache>/<task>/<model>/<type>/model.onnx``), derived files prepared."""
    ctx = ModelContext(settings=settings)  # prepares files only: no runtime
    specs: dict[str, ModelSpec] = {}
    for path in sorted(Path(settings.cache_folder).glob("*/*/*/model.onnx")):
        model_type, name, task = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        try:
            source, _ = resolve(name, model_type, task, settings.cache_folder)
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
    repository.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, engines_dir=repository)  # derived files live beside their config
    written = []
    for spec in cached_specs(settings, only):
        write_model(repository, spec, settings)
        written.append(spec.name)
    return written
