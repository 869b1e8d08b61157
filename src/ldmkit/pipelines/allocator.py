"""glibc malloc settings for CPU inference: keep freed activation memory for the next UNet call.

By default glibc serves every allocation above a (dynamic) threshold with a fresh `mmap` and gives
it back on free, so each UNet call re-faults its activations' pages from the kernel; and it trims
the heap's free top after each call. Activations of a 512² SD call are 5-40 MB each, hundreds per
call. Serving them from the heap and keeping it: a whole SD 1.5 image in bf16 40.3 -> 37.7 s here
(medians of three, `python benchmarks/allocator.py`; diffusers gains as much from the same settings).
The price: memory freed after a peak stays with the process (up to TRIM_THRESHOLD bytes at the
heap's top) instead of returning to the system; the effect on the peak itself is not measured
separately. Results are bit-identical: only where memory comes from changes.

It is process-wide, so `Pipeline.load` (and with it the CLI and the server) applies it once;
LDMKIT_MALLOC=default turns it off. Linux with glibc only; elsewhere it does nothing."""

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
TOP_PAD = 512 << 20  # grow the heap in big steps: fewer brk calls

_applied: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings once per process. Returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("LDMKIT_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    return _applied
