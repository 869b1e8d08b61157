"""glibc malloc settings for CPU inference: keep freed activation memory for the next UNet call.

By default glibc serves every allocation above a (dynamic) threshold with a fresh `mmap` and gives
it back on free, so each UNet call re-faults its activations' pages from the kernel; and it trims
the heap's free top after each call. Activations of a 512² SD call are 5-40 MB each, hundreds per
call. Serving them from the heap and keeping it: a whole SD 1.5 image in bf16 40.3 -> 37.7 s here
(medians of three, `python benchmarks/allocator.py`; diffusers gains as much from the same settings).
The price: memory freed after a peak stays with the process (up to TRIM_THRESHOLD bytes at the
heap's top, and in every thread's arena) instead of returning to the system, until `release_freed`
gives it back: the server calls it whenever its queue runs empty. The effect on the peak itself is not
measured separately. Results are bit-identical: only where memory comes from changes.

It is process-wide, so `Pipeline.load` (and with it the CLI and the server) applies it once;
LDMKIT_MALLOC=default turns it off. Linux with glibc only; elsewhere it does nothing."""

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
TOP_PAD = 512 << 20  # grow the heap in big steps: fewer brk calls

_applied: bool | None = None


@functools.cache
def _libc():
    """glibc, or None (another libc or platform); opened once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # musl and other libcs have neither
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Apply the settings once per process. Returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    libc = _libc()
    if libc is None or os.environ.get("LDMKIT_MALLOC", "") == "default":
        return False
    mallopt = libc.mallopt
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


def release_freed() -> bool:
    """Give the memory freed so far back to the system: glibc's `malloc_trim(0)` returns the free top of
    the main heap and the whole free pages inside every arena (each thread that allocated has one, and the
    settings above keep what they freed). A few milliseconds; the next call re-faults what it needs. Returns
    whether anything was returned (False elsewhere than glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
