"""Build and load the CPU kernel library (csrc/cpu_kernels.cpp) with the system C++ compiler.

The library is a plain C ABI (no torch headers), so it builds in about two seconds. It is cached
under $KVSERVE_CACHE_DIR (default ~/.cache/kvserve) keyed by the source, the flags and the CPU, so
`make install` builds it once and every later start loads it. Without a compiler, or with
KVSERVE_CPU_KERNELS=0, `load()` returns None and kvserve runs the torch-native reference ops.

Run `python -m kvserve.ops.cpu_build` to build it ahead of time (the Makefile does).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# -fno-math-errno/-fno-trapping-math let floor/fmin vectorize; no -ffast-math: IEEE order is kept.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math",
         "-fopenmp", "-shared", "-fPIC", "-std=c++17"]  # fmt: skip

_lib: Optional[ctypes.CDLL] = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve")
    return Path(root) / "cpu_kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def library_path(compiler: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler] + FLAGS).encode() + _cpu_id().encode())
    return cache_dir() / f"libkvserve_cpu-{key.hexdigest()[:16]}.so"


def build(compiler: Optional[str] = None) -> Path:
    """Compile the library unless the cache holds it; returns its path. Raises on failure."""
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++, or set CXX)")
    path = library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building kvserve CPU kernels with %s (once) -> %s", compiler, path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE}:\n{proc.stderr[-4000:]}")
        os.replace(out, path)  # atomic: concurrent builders never see a half-written library
    return path


def load() -> Optional[ctypes.CDLL]:
    """The loaded library, or None (kernels disabled or not buildable; warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    import torch  # noqa: F401  (load torch's libgomp first: the library then shares its OpenMP pool)

    try:
        _lib = _declare(ctypes.CDLL(str(build())))
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the reference ops
        logger.warning(
            "kvserve: CPU kernels unavailable (%s); using the slower torch-native reference ops. "
            "Install g++ (or set CXX) and restart to enable them.", e,
        )  # fmt: skip
        _lib = None
    return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, f32, ptr, c_int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.kv_rms_norm.argtypes = [c_int, ptr, ptr, ptr, ptr, i64, i64, f32]
    lib.kv_silu_and_mul.argtypes = [c_int, ptr, ptr, i64, i64]
    lib.kv_rotary.argtypes = [c_int, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64]
    lib.kv_paged_attention.argtypes = [
        c_int, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32, i64, ptr, ptr
    ]
    lib.kv_argmax_rows.argtypes = [c_int, ptr, ptr, i64, i64, i64]
    lib.kv_sample_rows.argtypes = [c_int, ptr, ptr, i64, i64, i64, ptr, ptr]
    lib.kv_write_kv.argtypes = [c_int, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, i64]
    lib.kv_decode_matmul_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, c_int, c_int]
    lib.kv_decode_matmul_max_rows.argtypes = [i64, i64, c_int]
    lib.kv_decode_matmul_max_rows.restype = c_int
    lib.kv_prefill_attention_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, f32]
    lib.kv_prefill_attention_bf16.restype = c_int
    lib.kv_prefix_attention_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, f32]
    lib.kv_prefix_attention_bf16.restype = c_int
    lib.kv_llama_layers_bf16.argtypes = [i64, *[ptr] * 14, f32, f32]
    lib.kv_llama_layers_bf16.restype = c_int
    void = (lib.kv_rms_norm, lib.kv_silu_and_mul, lib.kv_rotary, lib.kv_paged_attention, lib.kv_argmax_rows,
            lib.kv_sample_rows, lib.kv_write_kv, lib.kv_decode_matmul_bf16)  # fmt: skip
    for f in void:
        f.restype = None
    return lib


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        print(build(), file=sys.stderr)
    except RuntimeError as e:
        # Not fatal: kvserve falls back to the torch-native ops. Say so and how to fix it.
        print(f"warning: {e}\nkvserve will use the slower torch-native reference ops.", file=sys.stderr)
