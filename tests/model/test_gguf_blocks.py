"""GGUF weights kept in their block types (layers/block_linear.py, model/gguf_loader.py): the layers give
what dequantizing the same blocks and F.linear give, for every kernel block type, fused shards included;
the default model keeps its blocks, at about the file's size, and its logits match the dequantized model."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from conftest import build_tiny_gguf
from kvserve import LLM, SamplingParams
from kvserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvserve.layers.block_linear import BlockLinearMethod, block_bytes, keep_embedding_quantized, keep_linear_quantized
from kvserve.layers.linear import QKVParallelLinear, RowParallelLinear
from kvserve.model.config_loader import default_model_path, load_model_config
from kvserve.model.loader import load_model
from kvserve.ops import cpu_build, quant_ops
from test_llama_vs_hf import _attach_kv_caches, _prompt, _step

pytestmark = pytest.mark.isa  # again at each lower CPU level (Makefile)

TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of each block's float16 scales (the rest of a block is packed integers, any bits valid).
_F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype: int, rows: int, k: int, seed: int) -> torch.Tensor:
    """uint8 [rows, row_bytes]: random quantized values with small finite float16 scales."""
    gen = np.random.default_rng(seed)
    _, size = quant_ops.block_shape(qtype)
    data = gen.integers(0, 256, (rows, block_bytes(qtype, k) // size, size), dtype=np.uint8)
    for offset in _F16_FIELDS[T(qtype)]:
        scales = gen.uniform(-0.05, 0.05, data.shape[:2]).astype(np.float16)
        data[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(*data.shape[:2], 2)
    return torch.from_numpy(data.reshape(rows, -1))


def reference(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return quant_ops.reference_dequantize(blocks, qtype, k)


def assert_float32_sums(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y == x @ w.T up to float32 summation order: each entry within a few ulps of its terms' |sum|."""
    x = x.float()
    err = (y.float() - F.linear(x, w)).abs()
    bound = 1e-6 * F.linear(x.abs(), w.abs()) + 1e-30
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: T(t).name)
def test_fused_qkv_layer_of_blocks_matches_dequantized_linear(qtype):
    """q, k and v shards loaded as blocks into one fused layer; decode-sized and prompt-sized batches."""
    k = 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 96  # K-quants: 256-value super-blocks
    layer = QKVParallelLinear(k, head_dim=16, num_heads=3, num_kv_heads=1, dtype=torch.float32)
    keep_linear_quantized(layer, qtype)
    assert isinstance(layer.linear_method, BlockLinearMethod) and layer.weight.dtype == torch.uint8
    shards = {s: random_blocks(qtype, rows, k, seed) for s, rows, seed in (("q", 48, 1), ("k", 16, 2), ("v", 16, 3))}
    for shard, blocks in shards.items():
        layer.weight.weight_loader(layer.weight, blocks, shard)
    w = torch.cat([reference(shards[s], qtype, k) for s in "qkv"])  # [80, k]
    for rows in (1, 3, 40, 300):  # 300: past every level's decode kernel rows
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        assert_float32_sums(layer(x), x, w)
        xb = x.bfloat16()
        yb = layer(xb)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), F.linear(xb.float(), w), rtol=1e-2, atol=1e-2)


def test_prompt_sized_batch_is_bit_for_bit_the_dequantized_gemm():
    """Past the kernel's rows: exact dequantization, then the same float32 GEMM as F.linear."""
    k, n = 128, 40
    layer = RowParallelLinear(k, n, dtype=torch.float32)
    keep_linear_quantized(layer, T.Q4_1)
    blocks = random_blocks(T.Q4_1, n, k, seed=7)
    layer.weight.weight_loader(layer.weight, blocks)
    rows = max(quant_ops.matmul_max_rows(T.Q4_1, k, n), 1) + 1
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), F.linear(x, reference(blocks, T.Q4_1, k)))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K], ids=lambda t: T(t).name)
def test_embedding_and_tied_head_of_blocks(qtype):
    vocab, dim = 50, 256
    emb = VocabParallelEmbedding(vocab, dim, dtype=torch.bfloat16)
    keep_embedding_quantized(emb, qtype)
    blocks = random_blocks(qtype, vocab, dim, seed=3)
    emb.weight.weight_loader(emb.weight, blocks)
    w = reference(blocks, qtype, dim)  # [V, D]
    ids = torch.tensor([0, 49, 7, 7])
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, w[ids].bfloat16())
    head = ParallelLMHead(vocab, dim, dtype=torch.bfloat16, tied_embedding=emb)
    head.process_weights_after_loading(keep_decode_copy=True)
    hidden = torch.randn(5, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    logits = head(hidden)
    assert logits.dtype == torch.float32  # unrounded sums at any batch size
    assert_float32_sums(logits, hidden, w)


@pytest.fixture(scope="module")
def default_models():
    path = default_model_path()
    kept = load_model(load_model_config(path, dtype="float32"))
    dense = load_model(load_model_config(path, dtype="float32", quantization="none"))
    return path, kept, dense


def test_default_model_keeps_its_blocks_at_about_the_file_size(default_models):
    path, kept, dense = default_models
    assert dense.config.quantization is None and dense.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    if cpu_build.load() is None:  # no kernel library (KVSERVE_CPU_ISA=none)
        assert kept.config.quantization is None  # dequantized at load, as asked for by "none"
        return
    assert kept.config.quantization == "gguf"
    layer = kept.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.linear_method.qtype == T.Q4_1 and linear.weight.dtype == torch.uint8
    assert kept.model.embed_tokens.quant_type == T.Q8_0
    weight_bytes = sum(p.numel() * p.element_size() for p in kept.parameters())
    assert weight_bytes <= 1.3 * os.path.getsize(path), (weight_bytes, os.path.getsize(path))


_RSS_SCRIPT = """
import sys
def rss():
    fields = dict(line.split(":") for line in open("/proc/self/status"))
    return 1024 * sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssFile"))
from kvserve.model.config_loader import load_model_config
from kvserve.model.loader import load_model
from kvserve.ops import cpu_build
cpu_build.load()
del_me = load_model(load_model_config(sys.argv[2], dtype="float32"))  # the first load's one-off costs (libraries)
del del_me
before = rss()
model = load_model(load_model_config(sys.argv[1], dtype="float32"))
print(rss() - before)
"""


def test_default_model_resident_memory_is_about_the_file_size(tiny_gguf):
    """What loading the default model adds to the process's resident memory (a fresh process: the
    weights, what parsing the file leaves behind, allocator overhead) stays within 1.3x of the file."""
    import subprocess
    import sys

    path = default_model_path()
    if cpu_build.load() is None:
        pytest.skip("GGUF blocks are kept only with the CPU kernels (KVSERVE_CPU_ISA=none dequantizes)")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, tiny_gguf], capture_output=True, text=True, check=True)
    added = int(out.stdout.split()[-1])
    assert added <= 1.3 * os.path.getsize(path), (added / 1e6, os.path.getsize(path) / 1e6)


def test_default_model_logits_match_the_dequantized_model(default_models):
    _, kept, dense = default_models
    ids = [1] + _prompt(30, seed=11, vocab=kept.config.vocab_size)
    logits = []
    for model in (kept, dense):
        _attach_kv_caches(model)
        prefill = _step(model, [ids[:-1]], [len(ids) - 1], [list(range(8))])  # prompt-sized rows
        decode = _step(model, [ids[-1:]], [len(ids)], [list(range(8))])  # one decode row
        logits.append(torch.cat([model.compute_logits(prefill[-1:]), model.compute_logits(decode)]))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-3, rtol=1e-4)


def test_quantization_choices_are_checked(tmp_path):
    with pytest.raises(ValueError, match="quantization"):
        load_model_config(default_model_path(), quantization="int3")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_tiny_gguf_served_from_blocks_matches_the_dequantized_model(tiny_gguf):
    """The engine end to end (batched prompts and decodes, Q4_0 / Q4_1 / Q8_0 layers, a Q8_0 embedding
    and tied head): in float32 the same greedy tokens as the same file dequantized at load, logprobs
    within 1e-4; in bf16 (activations and KV cache; the blocks still dequantize to float32) the first
    token's logprob within bf16's error of float32's."""
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 3000, (n,), generator=g).tolist()} for n in (1, 7, 40, 130, 3)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    runs = {}
    for quantization, dtype in ((None, "float32"), ("none", "float32"), (None, "bfloat16")):
        llm = LLM(tiny_gguf, tokenizer=default_model_path(), dtype=dtype, quantization=quantization,
                  kv_cache_memory_bytes=64 << 20)  # fmt: skip
        expected = "gguf" if quantization is None and cpu_build.load() is not None else None
        assert llm.llm_engine.config.model.quantization == expected
        runs[quantization, dtype] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for kept, dense, bf16 in zip(runs[None, "float32"], runs["none", "float32"], runs[None, "bfloat16"]):
        assert kept.token_ids == dense.token_ids
        for a, b, token in zip(kept.logprobs, dense.logprobs, kept.token_ids):
            assert abs(a[token].logprob - b[token].logprob) < 1e-4
        first = kept.token_ids[0]
        if first in bf16.logprobs[0]:
            assert abs(bf16.logprobs[0][first].logprob - kept.logprobs[0][first].logprob) < 5e-2
