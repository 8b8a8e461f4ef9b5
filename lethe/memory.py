"""Hand freed memory back to the operating system between large phases of an edit.

PyTorch's CPU allocator frees tensors with ``free()``; glibc keeps much of that memory in its heaps for reuse,
so a process's resident size stays at the high-water mark of every phase before it, and a MEMIT call that
optimises its targets in batches climbs with each batch. ``release()`` asks glibc to return what it holds free
(``malloc_trim``); elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> None:
    """Return free heap memory to the OS where the C library can (glibc); a no-op elsewhere."""
    trim = _trim()
    if trim is not None:
        trim(0)
