"""glibc malloc settings for Flashback's processes.

Every request allocates a few buffers of 0.1-1 MiB (the decompressed body, the scanner's
columns, the records built from them) and frees them before the next one. With glibc's
defaults, chunks above the (dynamic) mmap threshold are mapped and unmapped each time, and
the arenas of the HTTP threads give their free top back to the kernel above 128 KiB
(``madvise``): every request then faults its buffers in again, zeroed page by page. In the
cluster adapter, HTTP server with logs that acknowledge at once, 9.8 M samples of the bench
dump: 0.93-1.03 CPU s per million samples with the defaults, 0.77-0.80 with the settings
below; a fifth of the process's CPU was page faults, ``clear_page`` and ``madvise``.

Chunks up to ``MMAP_THRESHOLD`` come from the arenas, and an arena keeps up to
``TRIM_THRESHOLD`` free at its top. Environment variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``, ...) take precedence: if any ``MALLOC_``
variable is set, nothing is changed. Other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20


def glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Applies the settings above; returns whether they were applied."""
    libc = glibc()
    if libc is None or any(k.startswith("MALLOC_") for k in environ):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the settings", extra={"mmap_threshold": MMAP_THRESHOLD,
                                                             "trim_threshold": TRIM_THRESHOLD})
    return ok
