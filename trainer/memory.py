"""Host memory that a training process frees goes back to the system.

glibc serves an allocation below its mmap threshold from the heap and keeps it there when it is freed;
each time a larger mmapped block is freed it raises that threshold, up to 32 MiB. A training step frees
and reallocates large tensors (gradients, ZeRO-3's gathered parameters, activations), so after the first
steps they come from the heap and their freed memory stays resident. Measured for a 0.41B-parameter
hybrid over 3 steps (bench/rank_memory.py): one process peaked at 7.51 GiB with glibc's default and 6.60
GiB with a fixed 1 MiB threshold; ZeRO-3 over 4 ranks at 4.96-5.03 GiB per rank and 3.29-3.33 GiB. A
fixed threshold keeps every block of MMAP_THRESHOLD bytes or more in its own mapping, returned to the
system when freed (the role jemalloc or tcmalloc play in CPU training setups; here without a
dependency). Smaller blocks keep glibc's fast heap path. 128 KiB rather than 1 MiB: a pipeline stage's
activations at one sequence of 128 tokens are 0.5 MiB blocks, which fragmented the heap (tp=2 pp=2 ranks
at 2.39-2.41 GiB with 1 MiB, 2.15-2.18 GiB with 128 KiB; the one-process run unchanged, 6.58 / 6.55 GiB).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("longtrain")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 17
_state = {"done": False}


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process (once; before the model is built). False where the C
    library is not glibc (musl, macOS): nothing is changed there."""
    if _state["done"]:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _state["done"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not _state["done"]:
        log.info("mallopt(M_MMAP_THRESHOLD) refused: freed host memory may stay resident")
    return _state["done"]
