import ctypes
import mmap
import platform
import resource

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


def _minor_faults_while_writing(address: int, nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(address, 1, nbytes)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.system() != "Linux", reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_populate_faults_pages_in_ahead_and_keeps_their_contents():
    nbytes = 64 << 20
    control, prefaulted = mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)  # fresh anonymous mappings
    address = ctypes.addressof(ctypes.c_char.from_buffer(prefaulted))
    prefaulted[:5] = b"kvkv!"  # this page is present already; the rest are not
    assert host_memory.populate(address + 1, nbytes - 1)  # any range: whole pages around it
    assert prefaulted[:5] == b"kvkv!" and prefaulted[5:4096] == bytes(4091) and prefaulted[-1] == 0
    lazy = _minor_faults_while_writing(ctypes.addressof(ctypes.c_char.from_buffer(control)), nbytes)
    ahead = _minor_faults_while_writing(address, nbytes)
    assert ahead * 10 < lazy, (ahead, lazy)  # 4 KiB pages: ~16,000 faults on first write, ~0 after populate
