import ctypes
import platform

import pytest

from kvserve import host_memory


def test_available_bytes_is_positive_on_linux():
    assert host_memory.available_bytes() > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_thresholds(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert host_memory.keep_freed_memory()
    # a 4 MB block now comes from the heap (below the 32 MB threshold) instead of its own mapping:
    # glibc marks mapped chunks with bit 1 of the size word just before the pointer
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(4 << 20)
    size_word = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(p)
    assert size_word & 2 == 0


def test_keep_freed_memory_leaves_the_users_setting(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert not host_memory.keep_freed_memory()
