"""Reading and writing ONNX files: parse errors as load errors, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .base import ModelLoadError


def load_onnx(model_file: Path):
    """Parse an ONNX file (weights included). Raises :class:`ModelLoadError` with
    ``corrupt=True`` when it is not a valid ONNX protobuf."""
    import onnx

    try:
        return onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelLoadError(f"cannot read {model_file}: {exc}", corrupt=True) from exc


def _stamp(source: Path, variant: str = "") -> str:
    stat = source.stat()
    stamp = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{stamp}|{variant}" if variant else stamp


def save_onnx_atomic(model, dest: Path, source: Path | None = None, variant: str = "") -> Path:
    """Write ``model`` to ``dest`` through a temporary file and ``os.replace``; with
    ``source``, record which file it was derived from, and how (``variant``: the
    parameters of the rewrite), see :func:`is_up_to_date`."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=dest.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if source is not None:
        dest.with_name(dest.name + ".source").write_text(_stamp(source, variant), encoding="utf-8")
    return dest


def is_up_to_date(derived: Path, source: Path, variant: str = "") -> bool:
    """Whether ``derived`` was written from this very ``source`` file (path, size and
    modification time recorded beside it) with the same ``variant``."""
    stamp = derived.with_name(derived.name + ".source")
    return derived.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == _stamp(source, variant)
