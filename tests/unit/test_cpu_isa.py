"""CPU kernel levels (ops/cpu_build.py): which levels a CPU runs, forcing a lower one, and the
vector layer (csrc/vec*.hpp) of the loaded level against its scalar definition."""
import ctypes
import os
import subprocess
import sys

import pytest

from kvserve.ops import cpu_build

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

EPYC_ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2"}
SKYLAKE_SP = EPYC_ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
SAPPHIRE_RAPIDS = SKYLAKE_SP | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}


def test_levels_follow_the_cpu_flags():
    assert cpu_build.cpu_levels({"sse4_2", "avx"}, "x86_64") == []  # no AVX2: the reference ops
    assert cpu_build.cpu_levels(EPYC_ZEN3, "x86_64") == ["avx2"]
    assert cpu_build.cpu_levels(SKYLAKE_SP, "x86_64") == ["avx2", "avx512"]
    assert cpu_build.cpu_levels(SAPPHIRE_RAPIDS, "x86_64") == ["avx2", "avx512", "avx512_bf16", "amx"]
    assert cpu_build.cpu_levels(SAPPHIRE_RAPIDS - {"avx512_bf16"}, "x86_64") == ["avx2", "avx512"]  # levels nest
    assert cpu_build.cpu_levels({"fp", "asimd"}, "aarch64") == ["neon"]


def test_the_loaded_library_is_the_selected_level():
    lib = cpu_build.load()
    assert lib is not None, "g++ must be installed: the Makefile's tests need the CPU kernels"
    assert cpu_build.level() == lib.kv_isa().decode() == cpu_build.selected_level()
    forced = os.environ.get("KVSERVE_CPU_ISA")
    assert cpu_build.level() == (forced or cpu_build.cpu_levels()[-1])


def test_vector_layer_equals_its_scalar_definition():
    """Each op of the loaded level's vector layer, bit for bit against plain scalar code: bf16
    rounding (ties, NaN, denormals), fma, div, exp, the reduction tree, masks, pair dot products."""
    msg = ctypes.create_string_buffer(512)
    assert cpu_build.load().kv_vec_selftest(msg, len(msg)) == 0, msg.value.decode()


def test_forcing_a_level_says_so_on_stderr():
    levels = cpu_build.cpu_levels()
    code = "from kvserve.ops import cpu_build; print(cpu_build.level())"
    env = dict(os.environ, KVSERVE_CPU_ISA=levels[0])
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [levels[0]]
    if len(levels) > 1:
        assert f"level {levels[0]}, forced" in run.stderr
    other = "neon" if levels[0] != "neon" else "amx"  # one this CPU cannot run: the best level, and a warning
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, KVSERVE_CPU_ISA=other),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.stdout.split() == [levels[-1]] and f"KVSERVE_CPU_ISA={other} is not a level this CPU runs" in run.stderr
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, KVSERVE_CPU_ISA="none"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.stdout.split() == ["none"]
