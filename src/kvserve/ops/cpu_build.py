"""Build and load the CPU kernel library (csrc/*.cpp) for this CPU's level, with the system C++ compiler.

The kernels are written once over a vector layer (csrc/vec.hpp) and compiled once per level:

    avx2         x86-64 with AVX2 + FMA + F16C (Haswell and later, AMD Zen 1-3)
    avx512       + AVX-512 F/BW/VL/DQ/CD (Skylake-SP, Cascade Lake)
    avx512_bf16  + AVX512_BF16 and VNNI (Cooper Lake, AMD Zen 4/5)
    amx          + AMX tiles (Sapphire Rapids and later)
    neon         aarch64 (Graviton, Ampere, Apple)

`load()` builds (once; cached under $KVSERVE_CACHE_DIR, default ~/.cache/kvserve, keyed by the
sources, the compiler and the level's flags) and loads the best level this CPU runs.
KVSERVE_CPU_ISA=avx2|avx512|avx512_bf16|amx|neon|none forces another (said on stderr): a lower
level, to measure or test it; `none` (or KVSERVE_CPU_KERNELS=0) runs the torch-native reference
ops. Without a compiler `load()` returns None and kvserve warns and runs the reference ops.

The library is a plain C ABI (no torch headers): one level builds in a few seconds.
`python -m kvserve.ops.cpu_build` builds the best level ahead of time (the Makefile does);
`--level L` another, `--levels` prints the levels this CPU runs, `--cross-aarch64` compiles the
neon level with aarch64-linux-gnu-g++ (CI's check that the sources build for Arm).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -fno-math-errno/-fno-trapping-math let floor/fmin vectorize; no -ffast-math and (with -std=c++17)
# no FMA contraction: IEEE order is kept, the same on every level.
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-std=c++17",
                "-fvisibility=hidden"]  # fmt: skip
_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd", "-mprefer-vector-width=512"]
_AVX512_BF16 = _AVX512 + ["-mavx512bf16", "-mavx512vnni"]
# level -> (compiler flags, CPU flags it needs: /proc/cpuinfo's "flags" on x86, "Features" on Arm)
LEVELS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "avx2": (_AVX2, ("avx2", "fma", "f16c", "bmi2")),
    "avx512": (_AVX512, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")),
    "avx512_bf16": (_AVX512_BF16, ("avx512_bf16", "avx512_vnni")),
    "amx": (_AVX512_BF16 + ["-mamx-tile", "-mamx-bf16"], ("amx_tile", "amx_bf16")),
    "neon": (["-march=armv8-a"], ("asimd",)),
}
X86_LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")  # each needs the flags of those before it

_lib: Optional[ctypes.CDLL] = None
_level = "none"
_tried = False


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve")
    return Path(root) / "cpu_kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_levels(flags: Optional[set[str]] = None, machine: Optional[str] = None) -> list[str]:
    """The levels this CPU runs (or one with these flags, on this machine type), lowest first;
    empty where none applies (the reference ops run)."""
    flags = _cpu_flags() if flags is None else flags
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64"):
        return ["neon"]  # NEON is part of every aarch64 CPU
    if machine not in ("x86_64", "AMD64"):
        return []
    levels = []
    for level in X86_LEVELS:
        if not set(LEVELS[level][1]) <= flags:
            break
        levels.append(level)
    return levels


def library_path(level: str, compiler: str) -> Path:
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".hpp"):
            h.update(path.name.encode() + path.read_bytes())
    h.update(" ".join([compiler, *COMMON_FLAGS, *LEVELS[level][0]]).encode())
    return cache_dir() / f"libkvserve_cpu-{level}-{h.hexdigest()[:16]}.so"


def _compiler(compiler: Optional[str]) -> str:
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++, or set CXX)")
    return compiler


def compile_library(level: str, compiler: str, out: Path) -> None:
    """Compile every source for `level` (in parallel) and link them into `out`. Raises on failure."""
    flags = [*COMMON_FLAGS, *LEVELS[level][0]]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:

        def one(src: Path) -> Path:
            obj = Path(tmp) / (src.stem + ".o")
            proc = subprocess.run([compiler, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler} failed to build {src.name} for {level}:\n{proc.stderr[-4000:]}")
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(one, sources()))
        linked = Path(tmp) / out.name
        proc = subprocess.run([compiler, *flags, "-shared", *map(str, objects), "-o", str(linked)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed to link the {level} kernels:\n{proc.stderr[-4000:]}")
        os.replace(linked, out)  # atomic: concurrent builders never see a half-written library


def build(level: Optional[str] = None, compiler: Optional[str] = None) -> Path:
    """Compile the library for `level` (default: the best this CPU runs) unless the cache holds
    it; returns its path. Raises on failure."""
    level = level or (cpu_levels() or [None])[-1]
    if level not in LEVELS:
        raise RuntimeError(f"no kernel level for this CPU ({platform.machine()}); kvserve runs the reference ops")
    compiler = _compiler(compiler)
    path = library_path(level, compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building kvserve CPU kernels (%s) with %s (once) -> %s", level, compiler, path)
    compile_library(level, compiler, path)
    return path


def selected_level() -> str:
    """The level load() uses: KVSERVE_CPU_ISA where this CPU runs it, else the best; "none" for
    the reference ops. Says on stderr when the choice is not the best."""
    levels = cpu_levels()
    best = levels[-1] if levels else "none"
    forced = os.environ.get("KVSERVE_CPU_ISA", "").strip().lower()
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        forced = "none"
    if not forced or forced == best:
        return best
    if forced != "none" and forced not in levels:
        logger.warning(
            "kvserve: KVSERVE_CPU_ISA=%s is not a level this CPU runs (it runs: %s); using %s",
            forced, ", ".join(levels) or "none", best,
        )  # fmt: skip
        return best
    logger.warning("kvserve: CPU kernels at level %s, forced by the environment (this CPU runs up to %s)", forced, best)
    return forced


def load() -> Optional[ctypes.CDLL]:
    """The loaded library, or None (kernels disabled or not buildable; warned once)."""
    global _lib, _level, _tried
    if _tried:
        return _lib
    _tried = True
    level = selected_level()
    if level == "none":
        return None
    import torch  # noqa: F401  (load torch's libgomp first: the library then shares its OpenMP pool)

    try:
        _lib = _declare(ctypes.CDLL(str(build(level))))
        _level = level
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to the reference ops
        logger.warning(
            "kvserve: CPU kernels unavailable (%s); using the slower torch-native reference ops. "
            "Install g++ (or set CXX) and restart to enable them.", e,
        )  # fmt: skip
        _lib = None
    return _lib


def level() -> str:
    """The level of the loaded library ("none" where the reference ops run)."""
    load()
    return _level


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
    lib.kv_llama_layers.argtypes = [c_int, i64, *[ptr] * 14, f32, f32]
    lib.kv_llama_layers.restype = c_int
    lib.kv_quant_dequant.argtypes = [c_int, ptr, i64, i64, ptr]
    lib.kv_quant_matmul.argtypes = [c_int, ptr, c_int, i64, i64, ptr, i64, ptr, c_int]
    lib.kv_quant_matmul_max_rows.argtypes, lib.kv_quant_matmul_max_rows.restype = [c_int, i64, i64], c_int
    lib.kv_isa.argtypes, lib.kv_isa.restype = [], ctypes.c_char_p
    lib.kv_amx_granted.argtypes, lib.kv_amx_granted.restype = [], c_int
    lib.kv_vec_selftest.argtypes, lib.kv_vec_selftest.restype = [ctypes.c_char_p, i64], c_int
    void = (lib.kv_rms_norm, lib.kv_silu_and_mul, lib.kv_rotary, lib.kv_paged_attention, lib.kv_argmax_rows,
            lib.kv_sample_rows, lib.kv_write_kv, lib.kv_decode_matmul_bf16, lib.kv_quant_dequant,
            lib.kv_quant_matmul)  # fmt: skip
    for f in void:
        f.restype = None
    return lib


def cross_compile_aarch64(compiler: str = "aarch64-linux-gnu-g++") -> Path:
    """Build the neon level with a cross compiler into a temporary folder (CI's check that the
    sources build for Arm); returns the library's path. Raises on failure."""
    out = Path(tempfile.mkdtemp(prefix="kvserve-aarch64-")) / "libkvserve_cpu-neon.so"
    compile_library("neon", _compiler(compiler), out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.ops.cpu_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=sorted(LEVELS), help="build this level (default: the best this CPU runs)")
    parser.add_argument("--levels", action="store_true", help="print the levels this CPU runs, lowest first")
    parser.add_argument("--cross-aarch64", action="store_true", help="compile the neon level with aarch64-linux-gnu-g++")
    args = parser.parse_args(argv)
    if args.levels:
        print(" ".join(cpu_levels()))
        return 0
    if args.cross_aarch64:
        print(cross_compile_aarch64(), file=sys.stderr)
        return 0
    try:
        print(build(args.level), file=sys.stderr)
    except RuntimeError as e:
        # Not fatal: kvserve falls back to the torch-native ops. Say so and how to fix it.
        print(f"warning: {e}\nkvserve will use the slower torch-native reference ops.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    sys.exit(main())
