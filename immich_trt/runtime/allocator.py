"""The C allocator's settings for the in-process runtime.

With ONNX Runtime's memory arena off (``MACHINE_LEARNING_MODEL_ARENA=false``, as Immich's
CPU image runs it), every inference allocates and frees its activations through
``malloc``. glibc gives each thread that allocates concurrently an arena of its own (up to
8 per core); memory freed in one arena is not reused by another, so resident memory creeps
up with concurrency. Measured under Immich's job mix on 2 cores (``bench/NOTES.md``):
glibc's default 2396 MB peak and rising, two arenas 1820 MB at the same speed (mimalloc,
which Immich's image preloads: 1682 MB but 14 % fewer assets/s here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameter number of ``M_ARENA_MAX`` (``malloc.h``).
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (``mallopt(M_ARENA_MAX, arenas)``, the
    ``glibc.malloc.arena_max`` tunable) for arenas created from now on: call it before the
    inference threads start. ``arenas <= 0`` leaves glibc's default. Returns whether the
    cap is in effect (False on a C library without ``mallopt``, e.g. musl, or when a
    preloaded allocator replaced malloc: then nothing changes)."""
    if arenas <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("No glibc mallopt here: malloc arenas left as the C library sets them")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1
