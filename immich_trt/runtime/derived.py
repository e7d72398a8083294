"""Files derived from a model file (a rewritten copy, an int8 quantization) and the
record of the source they were made from, so that a stale one is never served.

The record is a text file beside the derived file, ``<derived>.source``, holding the
source's resolved path, size in bytes and modification time in nanoseconds, and the
*variant* (the parameters of the rewrite) when there is one.
"""

from __future__ import annotations

from pathlib import Path


def source_stamp(source: Path, variant: str = "") -> str:
    """``"<resolved path>|<size>|<mtime_ns>"`` of ``source``, then ``"|<variant>"`` when
    one is given. Raises ``OSError`` when it cannot be read."""
    stat = source.stat()
    stamp = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{stamp}|{variant}" if variant else stamp


def record_source(derived: Path, source: Path, variant: str = "") -> None:
    """Record beside ``derived`` that it was made from this very ``source`` file (and how:
    ``variant``)."""
    derived.with_name(derived.name + ".source").write_text(source_stamp(source, variant), encoding="utf-8")


def is_up_to_date(derived: Path, source: Path, variant: str = "") -> bool:
    """Whether ``derived`` was written from this very ``source`` file (path, size and
    modification time recorded beside it by :func:`record_source`) with the same
    ``variant``; False when either cannot be read."""
    stamp = derived.with_name(derived.name + ".source")
    try:
        return derived.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == source_stamp(source, variant)
    except OSError:
        return False
