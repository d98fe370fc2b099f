"""The Triton attention backend under Triton's interpreter (float32) against the torch reference.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then),
and another test may already have imported it in this process (xgrammar can), so the kernels run in
one spawned worker process whose environment sets it; this process imports triton only to compile
the kernels for GPU targets, which needs no GPU. Shapes are tiny: the interpreter runs each program
in numpy.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from kvserve.attention.backend import get_attention_backend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.torch_ref import TorchAttentionBackend

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (make install-test installs it)"
)

# Four requests over three steps (block ids drawn at random, so tables have holes; unused slots NaN):
# r0: a 10-token prompt, a decode, a 3-token chunk; r1: 5 tokens after 8 cached ones that are r0's
# (its table starts with r0's blocks: a shared prefix); r2: a 3-token prompt, then decodes; r3: a
# 33-token prompt, a decode, a 6-token chunk (the longest context: several tiles, several segments).
LENGTHS = [14, 13, 5, 40]
PREFIX = 8  # r1's first 8 tokens are r0's
STEPS = [
    {0: (0, 10), 2: (0, 3), 3: (0, 33)},
    {0: (10, 11), 1: (8, 13), 2: (3, 4), 3: (33, 34)},
    {0: (11, 14), 2: (4, 5), 3: (34, 40)},
]


def _interpret() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    _dot_reads_bfloat16_values()


def _dot_reads_bfloat16_values() -> None:
    """Triton's interpreter keeps bfloat16 tensors as their uint16 bits and its tl.dot multiplies
    those bits as integers (measured: outputs ~1e8 where torch_ref gives ~1), so in this worker its
    dot first widens bfloat16 operands to the float32 values they hold, as a GPU's MMA reads them.
    Nothing else of the interpreter changes (its float32 -> bfloat16 casts still truncate where a GPU
    rounds: the bfloat16 tolerances below allow that)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << 16  # bfloat16 is float32's upper half
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


@pytest.fixture(scope="module")
def interpreter():
    """One worker process with TRITON_INTERPRET=1 for the whole module (it imports torch once)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_interpret) as pool:
        yield pool


def run_steps(hq: int, hkv: int, d: int, bs: int, split: bool, dtype: torch.dtype = torch.float32):
    """In the worker: the three steps through the Triton backend (cache filled with NaN) and the
    reference (cache filled with 50.0: finite, as it needs). Returns per step (triton out, reference
    out), both final caches, and the most segments any step's plan used."""
    from kvserve.attention.triton_attn import TritonAttentionBackend

    torch.manual_seed(0)
    num_blocks = 48
    free = torch.randperm(num_blocks).tolist()
    tables = [[free.pop() for _ in range(-(-n // bs))] for n in LENGTHS]
    tables[1][: PREFIX // bs] = tables[0][: PREFIX // bs]
    ks, vs, qs = ([torch.randn(n, h, d).to(dtype) for n in LENGTHS] for h in (hkv, hkv, hq))
    ks[1][:PREFIX], vs[1][:PREFIX] = ks[0][:PREFIX], vs[0][:PREFIX]
    # Split on: segments of one 16-key tile wherever the step has fewer than 10,000 programs.
    kwargs = dict(target_programs=10_000, min_segment_tiles=1, tile=16) if split else dict(max_segments=1)
    triton_backend, reference = TritonAttentionBackend(**kwargs), TorchAttentionBackend()
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=dtype)
    ref_cache = torch.full_like(cache, 50.0)
    outs, segments = [], 1
    for step in STEPS:
        reqs = sorted(step)
        rows = [slice(*step[r]) for r in reqs]
        q, k, v = (torch.cat([x[r][s] for r, s in zip(reqs, rows)]) for x in (qs, ks, vs))
        meta_args = ([s.stop - s.start for s in rows], [s.stop for s in rows], [tables[r] for r in reqs], bs)
        meta = build_attention_metadata(*meta_args)
        triton_backend.prepare(meta)
        out = triton_backend.forward(q, k, v, cache, meta, d**-0.5)
        (plan,) = meta.backend_state.values()
        segments = max(segments, plan.parts[1].shape[2] if plan.parts is not None else 1)
        ref_meta = build_attention_metadata(*meta_args)
        reference.prepare(ref_meta)
        outs.append((out, reference.forward(q, k, v, ref_cache, ref_meta, d**-0.5)))
    return outs, cache, ref_cache, segments


@needs_triton
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
@pytest.mark.parametrize(
    "hq,hkv,d,bs",
    [(2, 2, 64, 4), (8, 2, 64, 8), (4, 4, 128, 8), (8, 2, 128, 4), (6, 2, 80, 8)],
    ids=["mha-64", "gqa4-64", "mha-128", "gqa4-128", "gqa3-80"],
)
def test_triton_backend_matches_reference(interpreter, hq, hkv, d, bs, split):
    """Fresh prompts, decodes, chunks after cached context and after a shared prefix, ragged
    lengths, tables with holes; blocks of 4 or 8 slots under 16-key tiles (one tile spans blocks).
    Last, a group of 3 (16 rows hold 5 queries x 3 heads and one unused row) and a head size padded
    to 128."""
    outs, cache, ref_cache, segments = interpreter.submit(run_steps, hq, hkv, d, bs, split).result()
    # Split: at most 40 keys, 3 tiles of 16, one per segment: 3 segments (not a power of two: the
    # reduction masks a 4th), and the shorter requests' last segments empty.
    assert segments == (3 if split else 1)
    for out, expected in outs:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The step's k/v went to exactly the reference's slots; no other slot was written.
    torch.testing.assert_close(torch.where(cache.isnan(), 50.0, cache), ref_cache, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize(
    "hq,hkv,d,bs,split", [(8, 2, 128, 4, True), (6, 2, 80, 8, False)], ids=["gqa4-128-split", "gqa3-80"]
)
def test_triton_backend_matches_reference_in_bfloat16(interpreter, hq, hkv, d, bs, split):
    """The same steps with bfloat16 q, k, v and cache (the GPU's serving dtype): outputs within a
    bfloat16 rounding or two of torch_ref's (measured 0.0156 at |out| < 4; the interpreter truncates p
    and the output to bfloat16 where a GPU rounds), the cache written bit for bit."""
    outs, cache, ref_cache, _ = interpreter.submit(run_steps, hq, hkv, d, bs, split, torch.bfloat16).result()
    for out, expected in outs:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, expected, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(torch.where(cache.isnan(), 50.0, cache), ref_cache, atol=0, rtol=0)


def run_cascade(hq: int, hkv: int, d: int, split: bool):
    """In the worker: one step of 5 requests that all start with the same 6 blocks of 4 slots (24
    keys: not a whole number of 16-key tiles) and every query past them: two decodes, a 3-token
    chunk, a 7-token chunk and a decode after a context of 50 (several tiles past the prefix); block
    ids at random, the rest of each table its own. Through the Triton backend with the cascade
    (thresholds lowered to this size) and through torch_ref. Returns (triton out, reference out, the
    plan's cascade length, its parts)."""
    from kvserve.attention.triton_attn import TritonAttentionBackend

    torch.manual_seed(1)
    bs, num_blocks, prefix = 4, 64, 24
    contexts, chunks = [24, 30, 26, 40, 50], [1, 1, 3, 7, 1]  # cached keys before the step, its queries
    free = torch.randperm(num_blocks).tolist()
    shared = [free.pop() for _ in range(prefix // bs)]
    tables = [shared + [free.pop() for _ in range(-(-(c + n) // bs) - len(shared))] for c, n in zip(contexts, chunks)]
    cache = torch.full((2, num_blocks, bs, hkv, d), float("nan"))
    ref_cache = torch.full_like(cache, 50.0)
    prefix_kv = torch.randn(2, prefix, hkv, d)
    for c, table in zip(contexts, tables):  # the shared keys once, then each request's own cached ones
        kv = torch.cat([prefix_kv, torch.randn(2, c - prefix, hkv, d)], dim=1)
        for pos in range(c):
            for x in (cache, ref_cache):
                x[:, table[pos // bs], pos % bs] = kv[:, pos]
    q, k, v = (torch.randn(sum(chunks), h, d) for h in (hq, hkv, hkv))
    meta_args = (chunks, [c + n for c, n in zip(contexts, chunks)], tables, bs)
    kwargs = dict(min_cascade_tokens=16, min_cascade_requests=5, cascade_block_m=32, tile=16)
    kwargs.update(dict(target_programs=10_000, min_segment_tiles=1) if split else dict(max_segments=1))
    backend, reference = TritonAttentionBackend(**kwargs), TorchAttentionBackend()
    meta = build_attention_metadata(*meta_args)
    backend.prepare(meta)
    out = backend.forward(q, k, v, cache, meta, d**-0.5)
    (plan,) = meta.backend_state.values()
    ref_meta = build_attention_metadata(*meta_args)
    reference.prepare(ref_meta)
    expected = reference.forward(q, k, v, ref_cache, ref_meta, d**-0.5)
    return out, expected, plan.cascade.length if plan.cascade else None, plan.parts[1].shape[2]


@needs_triton
@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split-kv"])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (6, 2, 80)], ids=["mha-64", "gqa4-128", "gqa3-80"])
def test_cascade_over_a_shared_prefix_matches_reference(interpreter, hq, hkv, d, split):
    """The shared blocks' keys in one pass for all rows (part 0), each request's keys from there in
    the other parts (one, or split in tile-sized segments: 3 for the longest), merged: torch_ref's
    output."""
    out, expected, length, parts = interpreter.submit(run_cascade, hq, hkv, d, split).result()
    assert length == 24
    assert parts == (1 + 3 if split else 2)  # (51 keys - 24) / 16-key tiles from tile 1: tiles 1, 2, 3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cascade_only_where_every_request_shares_enough():
    """No cascade: below the request count, below the shared length, when one request's first block
    differs, or when a query sits inside the shared blocks; a cascade otherwise, for whole blocks."""
    from kvserve.attention.triton_attn import TritonAttentionBackend

    backend = TritonAttentionBackend(min_cascade_tokens=8, min_cascade_requests=3)
    shared = [7, 3, 9]
    tables = [shared + [10 + i] for i in range(3)]

    def cascade(query_lens, seq_lens, tables=tables):
        return backend._cascade(build_attention_metadata(query_lens, seq_lens, tables, 4), 1)

    assert cascade([1, 1, 1], [14, 13, 15]).length == 12
    assert cascade([1, 1, 1], [14, 10, 15]).length == 8  # request 1's query is at position 9: 2 whole blocks
    assert cascade([1, 1], [14, 13], tables[:2]) is None  # 2 requests
    assert cascade([1, 1, 1], [14, 8, 15]) is None  # only one whole block before position 7
    assert cascade([1, 1, 1], [14, 13, 15], [[1, 3, 9, 10], *tables[1:]]) is None
    assert cascade([1, 1, 1], [14, 13, 15], [[7, 3, 2, 10], *tables[1:]]).length == 8


PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time"]


def generate_greedy(model_dir: str, max_tokens=(8, 8, 8, 8), triton_graphs: bool = False) -> dict[str, list]:
    """In the worker: the tiny model's greedy tokens and logprobs (float32, CPU) through the engine
    twice, attention through the Triton backend (split-KV forced on) and through torch_ref, its
    reference; all else is the same code in the same process. The KV caches start as NaN: the Triton
    backend asks for no zeroed blocks, so a read of an unwritten slot would show; torch_ref's blocks
    are zeroed on first use by the runner, as it asks. triton_graphs: the Triton engine's decode
    steps go through decode graphs (cuda_graphs.eager_capture, the CPU stand-in for a capture);
    results["graph_steps"] lists its steps' (requests, size replayed or None)."""
    from kvserve import LLM, SamplingParams
    from kvserve.attention.triton_attn import TritonAttentionBackend
    from kvserve.worker import cuda_graphs, model_runner

    # Under graphs, 4 segments at most (planned for max_model_len, so always 4): the interpreter runs
    # each program in numpy.
    segments = 4 if triton_graphs else 16
    backends = {
        "triton": lambda: TritonAttentionBackend(
            target_programs=10_000, max_segments=segments, min_segment_tiles=1, tile=16
        ),
        "torch": TorchAttentionBackend,
    }
    params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=1, ignore_eos=True) for n in max_tokens]
    choose, capture, results = model_runner.get_attention_backend, model_runner.graph_capture_for, {}
    for name, make in backends.items():
        model_runner.get_attention_backend = lambda device, dtype, make=make: make()
        if triton_graphs and name == "triton":
            model_runner.graph_capture_for = lambda config, backend: cuda_graphs.eager_capture
        try:
            llm = LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, max_num_seqs=4)
        finally:  # the worker lives on: the runner's own choices are back once the engine is built
            model_runner.get_attention_backend, model_runner.graph_capture_for = choose, capture
        runner = llm.llm_engine.runner
        assert runner.backend.name == name
        graphs = runner.graphs
        assert (graphs is not None) == (triton_graphs and name == "triton")
        if graphs is not None:
            run, steps = graphs.run, results.setdefault("graph_steps", [])

            def recording_run(batch, run=run, graphs=graphs, steps=steps):
                steps.append((len(batch.query_lens), graphs.size_for(batch)))
                return run(batch)

            graphs.run = recording_run
        for cache in runner.kv_caches:
            cache.fill_(float("nan"))
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        results[name] = [(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]) for c in outs]
    return results


@needs_triton
def test_engine_through_triton_backend_gives_the_same_greedy_tokens(interpreter, tiny_llama_dir):
    """The runner with the Triton backend over fresh prompts and decodes (a context past one block,
    split-KV steps): the same tokens as with torch_ref, logprobs within float32 rounding (measured
    <= 1.1e-5 on this model; a bf16 or TF32 rounding anywhere in attention moves them 1e-3 to 1e-2)."""
    assert_same_greedy(interpreter.submit(generate_greedy, tiny_llama_dir).result())


@needs_triton
def test_decode_graphs_through_triton_backend_give_the_same_greedy_tokens(interpreter, tiny_llama_dir):
    """Decode steps of 4, 3, 2 and 1 requests replayed at sizes 4, 4, 2 and 1 (worker/cuda_graphs.py,
    the CPU capture stand-in), attention planned for the graphs' bound (max_model_len 512: 4
    segments of the keys, all but the first empty for these contexts) with seq_lens read from the device buffers,
    padding rows in the scratch block, every unwritten slot NaN: torch_ref's eager tokens."""
    runs = interpreter.submit(generate_greedy, tiny_llama_dir, (2, 3, 4, 5), True).result()
    assert {(4, 4), (3, 4), (2, 2), (1, 1)} <= set(runs.pop("graph_steps"))
    assert_same_greedy(runs)


@needs_triton
def test_decode_graph_plan_depends_on_the_bound_not_the_step():
    """A decode graph's plan is made once, at capture, from metadata whose host copies hold the
    capture-time padding: its segments follow graph_max_seq_len (here 16 tiles of 32 keys: 16
    segments), where an eager step of the same contexts plans none."""
    from kvserve.attention.triton_attn import TritonAttentionBackend
    from kvserve.worker.cuda_graphs import DecodeBuffers

    backend = TritonAttentionBackend(target_programs=10_000, min_segment_tiles=1, tile=32)
    q = torch.empty(4, 8, 64)
    graph_meta = DecodeBuffers(8, 16, 512, scratch_block=9, device="cpu").metadata(4)
    assert graph_meta.seq_lens_host == [1] * 4  # what a host-planned step would have seen
    assert backend.plan(graph_meta, q, 2).parts[1].shape == (4, 8, 16)  # [T, Hq, segments]
    assert backend.plan(build_attention_metadata([1] * 4, [5, 1, 12, 30], [[0, 1]] * 4, 16), q, 2).parts is None


def generate_after_shared_prefix(model_dir: str) -> dict:
    """In the worker: a 40-token prefix computed once (prefix caching keeps its 2 full blocks), then
    6 prompts that start with it, together, greedy, through the Triton backend (cascade thresholds
    lowered to this size: 16 shared keys, 4 requests) and through torch_ref. Returns each backend's
    tokens and logprobs, and the Triton steps' cascade lengths."""
    from kvserve import LLM, SamplingParams
    from kvserve.attention import triton_kernels
    from kvserve.attention.triton_attn import TritonAttentionBackend
    from kvserve.worker import model_runner

    prefix = list(range(100, 140))
    prompts = [{"prompt_token_ids": prefix + [200 + i] * (1 + i)} for i in range(6)]
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, ignore_eos=True)
    lengths: list[int] = []
    launch = triton_kernels.paged_attention

    def recording(*args, **kwargs):
        cascade = args[10] if len(args) > 10 else kwargs.get("cascade")
        lengths.append(cascade.length if cascade is not None else 0)
        return launch(*args, **kwargs)

    triton_kernels.paged_attention = recording
    backends = {
        "triton": lambda: TritonAttentionBackend(min_cascade_tokens=16, min_cascade_requests=4, tile=16),
        "torch": TorchAttentionBackend,
    }
    choose, results = model_runner.get_attention_backend, {}
    try:
        for name, make in backends.items():
            model_runner.get_attention_backend = lambda device, dtype, make=make: make()
            llm = LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, block_size=16)
            model_runner.get_attention_backend = choose
            for cache in llm.llm_engine.runner.kv_caches:
                cache.fill_(float("nan") if name == "triton" else 0.0)
            llm.generate([{"prompt_token_ids": prefix}], SamplingParams(max_tokens=1), use_tqdm=False)
            outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            results[name] = [(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]) for c in outs]
    finally:
        model_runner.get_attention_backend, triton_kernels.paged_attention = choose, launch
    results["cascades"] = lengths
    return results


@needs_triton
def test_engine_cascade_after_a_cached_prefix_gives_the_same_greedy_tokens(interpreter, tiny_llama_dir):
    """Prompts that hit the same cached blocks: their prompt step and decode steps take the cascade
    over the 32 shared keys (2 blocks of 16); tokens equal torch_ref's, logprobs within float32 rounding."""
    runs = interpreter.submit(generate_after_shared_prefix, tiny_llama_dir).result()
    cascades = runs.pop("cascades")
    assert 32 in cascades and cascades.count(32) >= 5 * 2, cascades  # 5 steps x the tiny model's 2 layers
    prompts = [f"prefix + {i + 1} x token {200 + i}" for i in range(6)]
    assert_same_greedy(runs, prompts)


def assert_same_greedy(runs: dict[str, list], prompts: list[str] = PROMPTS) -> None:
    for prompt, (ids, lps), (want_ids, want_lps) in zip(prompts, runs["triton"], runs["torch"], strict=True):
        assert ids == want_ids, f"{prompt!r}: triton {ids}, torch_ref {want_ids}"
        torch.testing.assert_close(
            torch.tensor(lps), torch.tensor(want_lps), atol=1e-4, rtol=0,
            msg=lambda m, prompt=prompt, lps=lps, want=want_lps: f"{prompt!r}: {m}\ntriton    {lps}\ntorch_ref {want}",
        )  # fmt: skip


# What each kernel argument is, for compiling without launching.
ARG_TYPES = {
    "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64", "query_start_ptr": "*i64", "slot_ptr": "*i64",
    "part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "scale_log2": "fp32",
    "num_reqs": "i32", "num_segments": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_bt": "i32",
    "stride_k": "i32", "stride_v": "i32", "v_offset": "i64", "kv_start": "i32", "kv_end": "i32", "seg_base": "i32",
    "num_parts": "i32",
}  # fmt: skip


@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("backend,arch", [("cuda", 90), ("hip", "gfx942")], ids=["sm90", "gfx942"])
def test_kernels_compile_for_gpus(backend, arch):
    """Each kernel, as the backend launches it (bfloat16 GQA 4:1 head size 128 split; float32 one
    pass, a group of 3, head size 80; a cascade's shared pass, GQA 7:1), compiles to a CUDA (H100) or ROCm (MI300) binary: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvserve.attention import triton_kernels as kernels

    target = GPUTarget(backend, arch, 32 if backend == "cuda" else 64)  # warp size

    def compile_kernel(fn, dtype: str, consts: dict):
        types = {n: ARG_TYPES.get(n, f"*{dtype}") for n in fn.arg_names}  # the rest: q, k, v, cache, out
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        return triton.compile(ASTSource(fn, sig, consts), target=target)

    binary = "cubin" if backend == "cuda" else "hsaco"
    variants = [  # the last: a cascade's shared pass (64 rows per program)
        (torch.bfloat16, "bf16", (8, 2, 128), True, 16), (torch.float32, "fp32", (6, 2, 80), False, 16),
        (torch.bfloat16, "bf16", (14, 2, 64), True, 64),
    ]
    for dtype, name, (hq, hkv, d), split, block_m in variants:
        consts = kernels.attention_constants(dtype, hq, hkv, d, block_size=16, block_m=block_m, tile=32, split=split)
        assert binary in compile_kernel(kernels._attention_kernel, name, consts).asm
    assert binary in compile_kernel(kernels._reduce_kernel, "bf16", kernels.reduce_constants(128, 5)).asm
    assert binary in compile_kernel(kernels._write_kv_kernel, "bf16", kernels.write_constants(2, 128)).asm


def choose_backend_on_gpu() -> str:
    """In the worker: the backend a CUDA (or ROCm) device gets where triton imports."""
    return get_attention_backend("cuda", torch.bfloat16).name


@needs_triton
def test_gpu_gets_triton_backend_when_triton_imports(interpreter):
    assert interpreter.submit(choose_backend_on_gpu).result() == "triton"


def test_gpu_falls_back_to_reference_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "kvserve.attention.triton_attn", raising=False)
    monkeypatch.delitem(sys.modules, "kvserve.attention.triton_kernels", raising=False)
    assert get_attention_backend("cuda", torch.bfloat16).name == "torch"
    assert get_attention_backend("cpu", torch.float32).name in ("cpu", "torch")
