#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize for `make bench-compare` (stage g) under .bench/llama.cpp/.
# Idempotent: every step checks whether it is already done. Never touches the project's .venv.
#
# The source is the llama.cpp that llama-cpp-python vendors (its sdist, fetched with pip, the one
# registry this project already uses); only the two C++ programs are built, natively for this CPU
# (GGML_NATIVE, as llama.cpp's own release notes recommend for a build on the machine that runs it).
# About 10 minutes on 2 cores, once, at nice 19.
#
#   .bench/llama.cpp/llama_cpp_python-<ver>.tar.gz   the sdist
#   .bench/llama.cpp/llama_cpp_python-<ver>/          unpacked; vendor/llama.cpp is the source
#   .bench/llama.cpp/build-<ver>/bin/                 llama-server, llama-quantize
#   .bench/llama.cpp/bin -> build-<ver>/bin           what compare.py runs
set -euo pipefail

cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DIR=${LLAMACPP_DIR:-.bench/llama.cpp}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-.venv/bin/python}
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$DIR/build-$VERSION"

log() { echo "[setup_llamacpp] $*" >&2; }

install_cmake() {
    if command -v cmake >/dev/null; then
        return
    fi
    log "installing cmake (apt)"
    if ! apt-get install -y -qq cmake >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y -qq cmake >/dev/null
    fi
}

fetch_source() {
    mkdir -p "$DIR"
    if [ ! -f "$SDIST" ]; then
        log "downloading the llama-cpp-python==$VERSION sdist (for its vendored llama.cpp)"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
            -d "$DIR" "llama-cpp-python==$VERSION" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    fi
    if [ ! -f "$SRC/CMakeLists.txt" ]; then
        log "unpacking $SDIST"
        tar -xzf "$SDIST" -C "$DIR"
    fi
}

build() {
    if [ -x "$BUILD/bin/llama-server" ] && [ -x "$BUILD/bin/llama-quantize" ]; then
        return
    fi
    log "building llama-server and llama-quantize in $BUILD (about 10 minutes on 2 cores, once)"
    # No tests, examples or web UI (the UI would be downloaded at build time); no HTTPS, no curl.
    nice -n 19 cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_CURL=OFF >"$BUILD.configure.log" 2>&1 || { tail -30 "$BUILD.configure.log" >&2; exit 1; }
    nice -n 19 cmake --build "$BUILD" --target llama-server llama-quantize -j"$JOBS" >"$BUILD.build.log" 2>&1 \
        || { tail -30 "$BUILD.build.log" >&2; exit 1; }
}

verify() {
    ln -sfn "build-$VERSION/bin" "$DIR/bin"
    log "checking: llama-server --version"
    "$DIR/bin/llama-server" --version 2>&1 | grep -i -m2 'version\|built' >&2
}

install_cmake
fetch_source
build
verify
