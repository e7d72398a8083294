"""Reading and writing ONNX files: parse errors as load errors, atomic writes, and the
test-pack mark read from a file's metadata without parsing its graph."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..runtime.derived import is_up_to_date, record_source
from .errors import ModelLoadError

__all__ = ["is_up_to_date", "load_onnx", "marked_test_pack", "metadata", "save_onnx_atomic"]

#: ONNX metadata key (``ModelProto.metadata_props``) that marks a file written by
#: ``immich-trt models make-test-pack``; its value says what kind of placeholder it is.
TEST_PACK_KEY = "immich_trt_test_pack"
#: Values of :data:`TEST_PACK_KEY`: the small pack (tiny graphs, predictable answers) and
#: the full-size pack (real architectures with random weights, for timing).
TEST_PACK_PLACEHOLDER = "placeholder"
TEST_PACK_RANDOM_WEIGHTS = "full-size random weights"

#: ``ModelProto.metadata_props`` (onnx.proto3 field 14, ``repeated StringStringEntryProto``).
_METADATA_FIELD = 14
_MAX_METADATA_BYTES = 1 << 20


def _varint(f) -> int | None:
    """A protobuf base-128 varint read from ``f``; ``None`` at end of file or past 10 bytes."""
    shift = result = 0
    for _ in range(10):
        byte = f.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
    return None


def metadata(model_file: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as ``{key: value}``, read by walking the
    top-level fields of the ``ModelProto`` (protobuf wire format: a varint key of field
    number and wire type, then a varint, 8 or 4 bytes, or a varint length and that many
    bytes) and seeking past the others, so a 1 GB graph costs a few reads. Each entry is
    parsed with onnx's ``StringStringEntryProto``. A file that is not a well-formed
    protobuf gives what was read before the damage (often ``{}``); never raises for it.
    Raises ``OSError`` when the file cannot be opened."""
    import onnx

    found: dict[str, str] = {}
    with open(model_file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            key = _varint(f)
            if key is None or key >> 3 == 0:
                break
            field, wire = key >> 3, key & 7
            if wire == 0:
                if _varint(f) is None:
                    break
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(f)
                if length is None or f.tell() + length > size:
                    break
                if field == _METADATA_FIELD and length <= _MAX_METADATA_BYTES:
                    try:
                        entry = onnx.StringStringEntryProto.FromString(f.read(length))
                    except Exception:  # noqa: BLE001 (protobuf's DecodeError: a damaged file)
                        break
                    found[entry.key] = entry.value
                else:
                    f.seek(length, os.SEEK_CUR)
            else:  # groups (3, 4) are not used by onnx.proto; anything else is damage
                break
    return found


def marked_test_pack(model_file: Path) -> str | None:
    """The :data:`TEST_PACK_KEY` value of an ONNX file (``"placeholder"``, ``"full-size
    random weights"``), or ``None`` for a real model or an unreadable file."""
    try:
        return metadata(model_file).get(TEST_PACK_KEY)
    except OSError:
        return None


def load_onnx(model_file: Path):
    """Parse an ONNX file (weights included). Raises :class:`ModelLoadError` with
    ``corrupt=True`` when it is not a valid ONNX protobuf."""
    import onnx

    try:
        return onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelLoadError(f"cannot read {model_file}: {exc}", corrupt=True) from exc


def save_onnx_atomic(model, dest: Path, source: Path | None = None, variant: str = "") -> Path:
    """Write ``model`` to ``dest`` through a temporary file and ``os.replace``; with
    ``source``, record which file it was derived from, and how (``variant``: the
    parameters of the rewrite), see :func:`..runtime.derived.is_up_to_date`."""
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
        record_source(dest, source, variant)
    return dest
