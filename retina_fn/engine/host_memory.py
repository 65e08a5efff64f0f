"""How the process's C allocator hands memory back: a measured CPU-training setting.

A CPU train step allocates and frees the same large activation buffers (megabytes each) every step. glibc's
malloc serves blocks above its mmap threshold with fresh mappings and trims freed memory at the top of the
heap back to the system, so each step pays the page faults of touching that memory anew. Keeping freed
memory in the process (a fixed 32 MiB mmap threshold, trimming only beyond 1 GiB of free heap) made the
demo's train step 6 to 12% faster on the 2-core CPU (docs/benchmarks.md); the resident size stays near
the peak instead of shrinking between steps. Only glibc has mallopt; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Tells glibc's malloc to keep freed blocks for reuse instead of returning them to the system, when the
    step runs on the CPU (the case it was measured for; a GPU step's buffers are the device allocator's).

    Process-wide and idempotent; call it once at start-up of a training or benchmark process.

    Args:
      device: the device the step runs on; anything but the CPU leaves the allocator as it is.

    Returns:
      True when the settings were applied (glibc, CPU), False otherwise.
    """
    if torch.device(device).type != "cpu":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in the C library (%s): allocator left as it is", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    return applied
