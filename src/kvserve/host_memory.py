"""Host memory: how much is free now (the one place that reads /proc/meminfo), and how the
process's allocator keeps what it frees."""
from __future__ import annotations

import ctypes
import os


def available_bytes() -> int:
    """MemAvailable (MemTotal on kernels without it); 0 when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return 0
    return info.get("MemAvailable", info.get("MemTotal", 0))


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Make glibc's malloc keep freed activation memory for the next step instead of handing it
    back to the OS. A forward allocates and frees tensors of a few MB (per layer, per step); by
    default glibc maps such blocks fresh and unmaps them on free (or trims the heap), so each step
    page-faults them in again. Blocks below mmap_threshold then come from the heap, and up to
    trim_threshold bytes of freed heap stay mapped. Returns False (nothing changed) without glibc
    or when the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves."""
    if any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc malloc_trim), after a one-off peak such
    as parsing a checkpoint; False without glibc."""
    trim = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return trim is not None and bool(trim(0))


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def populate(address: int, nbytes: int) -> bool:
    """Fault in (writable) every page of [address, address + nbytes) without changing its contents,
    so that later writes there take no page faults. Returns False where that is not available (not
    Linux >= 5.14, not glibc) or the memory cannot be committed (the pages then stay lazy)."""
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)
    if madvise is None:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = address // page * page
    return madvise(start, address + nbytes - start, _MADV_POPULATE_WRITE) == 0  # ctypes releases the GIL


def _libc_function(name: str, argtypes: list, restype):
    """The C library's function `name` with its ctypes signature set, or None without it (not glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function
