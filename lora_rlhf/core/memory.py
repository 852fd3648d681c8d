"""Give memory that Python and torch have freed back to the device, so the next piece of work starts clean.

On the CPU, glibc keeps the pages of freed tensors mapped (most activations are a few MB, served from its heap):
after PPO-ptx, the demo's `pipeline` process held GBs of freed heap that its eval stage then counted as its own
(3.92 GB measured, where eval alone peaks at 1.4-1.5 GB), and that other programs could not use.
`malloc_trim(0)` returns every free page to the kernel. On CUDA the caching allocator holds freed blocks the same
way; `empty_cache` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


def trim_heap() -> None:
    """Hand the CPU heap's free pages back to the OS (glibc's malloc_trim; a no-op on other C libraries)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_freed(device: torch.device) -> None:
    """Collect garbage, then hand the freed memory of `device` back (CUDA cache; glibc heap on the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_heap()

