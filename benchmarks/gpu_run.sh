#!/usr/bin/env bash
# The one command for a lent GPU (issue 17), from the repository root: `bash benchmarks/gpu_run.sh`.
# Runs benchmarks/gpu_check.py --device cuda (extra arguments go to it, e.g. --shapes Qwen2.5-0.5B);
# prints to stdout and, when OUT is set, keeps a copy in $OUT/gpu_check.txt.
#
# The GPU machine has no network; it has torch, transformers, triton, safetensors, tokenizers, jinja2,
# numpy, pyyaml, requests, tqdm, ... but not gguf, which kvserve's offline path imports at load
# (src/kvserve/ops/quant_ops.py; pydantic, fastapi and uvicorn are the server's, not imported by
# `from kvserve import LLM`). So gguf's wheel travels in .whl/ (git-ignored: name ".whl" in the device
# tool's carry). Made once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf==0.19.0
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/kvserve-site
if compgen -G ".whl/*.whl" >/dev/null; then
  # pure-Python wheels: unzipping is installing, where pip is missing
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl 2>/dev/null ||
    for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$site"; done
fi
export PYTHONPATH="$site:src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  log="$OUT/gpu_check.txt"
fi
python3 benchmarks/gpu_check.py --device cuda "$@" 2>&1 | tee "$log"
