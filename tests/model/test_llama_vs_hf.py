"""kvserve's Llama-family model and loaders against Hugging Face transformers, in float32.

Tiny random models are built with transformers, saved as safetensors and loaded back with kvserve;
the real default model (SmolLM2-135M GGUF) checks the GGUF path, q/k un-permutation included.
The kvserve model runs the way the model runner drives it: paged KV caches on every Attention
layer, batch layout from build_attention_metadata, passed through set_forward_context.
"""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvserve.attention.cpu_paged import CpuAttentionBackend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.attention.torch_ref import TorchAttentionBackend
from kvserve.forward_context import set_forward_context
from kvserve.layers.attention import Attention
from kvserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvserve.layers.rotary import rope_inv_freq
from kvserve.model.config_loader import default_model_path, load_model_config
from kvserve.model.loader import load_model
from kvserve.ops import cpu_ops

BLOCK_SIZE = 4
NUM_BLOCKS = 32
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _save_tiny_hf_model(tmp_path, config_cls, model_cls, max_shard_size="5GB", **overrides) -> torch.nn.Module:
    """A random HF model with weights large enough that attention is far from uniform, saved to tmp_path."""
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=max_shard_size)
    return hf


def _attach_kv_caches(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            shape = (2, NUM_BLOCKS, BLOCK_SIZE, module.num_kv_heads, module.head_dim)
            module.kv_cache = torch.zeros(shape, dtype=dtype)
            module.backend = TorchAttentionBackend()


def _step(model, chunks: list[list[int]], seq_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor:
    """One packed forward: request b feeds chunks[b], its last len(chunks[b]) tokens of seq_lens[b]. -> [T, hidden]."""
    query_lens = [len(c) for c in chunks]
    meta = build_attention_metadata(query_lens, seq_lens, block_tables, BLOCK_SIZE)
    input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
    with torch.no_grad(), set_forward_context(meta):
        return model(input_ids, positions)


def _hf_outputs(hf, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (last hidden state [T, hidden], logits [T, vocab]) for one unpadded prompt."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0]


def _prompt(n: int, seed: int, vocab: int = TINY["vocab_size"]) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _load_kvserve(path, dtype: str = "float32") -> torch.nn.Module:
    model = load_model(load_model_config(str(path), dtype=dtype))
    _attach_kv_caches(model, getattr(torch, dtype))
    return model


def _assert_matches_hf(model, hf, ids: list[int], hidden: torch.Tensor, atol: float = 1e-4) -> None:
    hf_hidden, hf_logits = _hf_outputs(hf, ids)
    assert hf_logits.std() > 0.5, "test model too flat to be a meaningful comparison"
    torch.testing.assert_close(hidden, hf_hidden, atol=atol, rtol=1e-4)
    torch.testing.assert_close(model.compute_logits(hidden), hf_logits, atol=atol, rtol=1e-4)


TINY_MODELS = {
    "llama_gqa_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Sharded checkpoint (model.safetensors.index.json + several files).
    "qwen2_bias_sharded": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                           dict(num_key_value_heads=2, max_shard_size="40KB")),
    # head_dim 32 != hidden / heads, per-head q/k norm.
    "qwen3_qk_norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                      dict(num_key_value_heads=1, head_dim=32)),
    # original context 64 puts head_dim 16's frequencies in all three llama3 bands.
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    dict(num_key_value_heads=4, rope_theta=10000.0, rope_scaling=dict(
                        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64))),
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_pair(request, tmp_path):
    """(kvserve model, HF model, name) for each tiny architecture variant."""
    config_cls, model_cls, overrides = TINY_MODELS[request.param]
    overrides = dict(overrides)
    shard = overrides.pop("max_shard_size", "5GB")
    hf = _save_tiny_hf_model(tmp_path, config_cls, model_cls, max_shard_size=shard, **overrides)
    if shard != "5GB":
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    return _load_kvserve(tmp_path), hf, request.param


def test_prefill_matches_hf(tiny_pair):
    model, hf, name = tiny_pair
    ids = _prompt(21, seed=1)
    hidden = _step(model, [ids], [len(ids)], [list(range(6))])
    _assert_matches_hf(model, hf, ids, hidden)


def test_chunked_prefill_then_decode_matches_hf(tiny_pair):
    model, hf, _ = tiny_pair
    ids = _prompt(21, seed=2)
    table = [[7, 3, 11, 0, 5, 9]]  # non-contiguous blocks
    first = _step(model, [ids[:9]], [9], table)
    second = _step(model, [ids[9:20]], [20], table)
    decode = _step(model, [ids[20:]], [21], table)
    _assert_matches_hf(model, hf, ids, torch.cat([first, second, decode]))


def test_packed_batch_of_two_prompts_matches_hf(tiny_pair):
    model, hf, _ = tiny_pair
    a, b = _prompt(13, seed=3), _prompt(22, seed=4)
    hidden = _step(model, [a, b], [len(a), len(b)], [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]])
    _assert_matches_hf(model, hf, a, hidden[: len(a)])
    _assert_matches_hf(model, hf, b, hidden[len(a) :])


def test_bfloat16_error_is_bfloat16_sized(tmp_path):
    """In bfloat16, kvserve is as close to HF float32 as HF's own bfloat16 run is (HF's bf16 math is ours)."""
    config_cls, model_cls, overrides = TINY_MODELS["llama_gqa_tied"]
    hf = _save_tiny_hf_model(tmp_path, config_cls, model_cls, **overrides)
    model = _load_kvserve(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = _prompt(21, seed=6)
    logits = model.compute_logits(_step(model, [ids], [len(ids)], [list(range(6))]))
    assert logits.dtype == torch.float32
    hf_logits = _hf_outputs(hf, ids)[1]
    hf_bf16_logits = _hf_outputs(hf.to(torch.bfloat16), ids)[1].float()
    hf_error = (hf_bf16_logits - hf_logits).abs().max()
    assert (logits - hf_logits).abs().max() <= 2 * hf_error


def test_bfloat16_on_the_cpu_backend_is_bfloat16_sized(tmp_path, monkeypatch):
    """The CPU backend's kernels in bfloat16 (head size 64: the AMX prefill kernel where the CPU has
    it, else SDPA) stay as close to HF float32 as HF's own bfloat16 run."""
    config_cls, model_cls, overrides = TINY_MODELS["llama_gqa_tied"]
    hf = _save_tiny_hf_model(tmp_path, config_cls, model_cls, **{**overrides, "hidden_size": 256})
    model = _load_kvserve(tmp_path, dtype="bfloat16")
    backend = CpuAttentionBackend()
    for module in model.modules():
        if isinstance(module, Attention):
            assert module.head_dim == 64
            module.backend = backend
    applied = []
    prefill = cpu_ops.prefill_attention
    monkeypatch.setattr(cpu_ops, "prefill_attention", lambda *a: applied.append(prefill(*a)) or applied[-1])
    ids = _prompt(37, seed=7)  # 37 rows: a partial tile of 16 and a partial block of keys
    logits = model.compute_logits(_step(model, [ids], [len(ids)], [list(range(10))]))
    assert applied and all(a == cpu_ops.amx_in_use() for a in applied)  # AMX: kernel
    hf_logits = _hf_outputs(hf, ids)[1]
    hf_error = (_hf_outputs(hf.to(torch.bfloat16), ids)[1].float() - hf_logits).abs().max()
    assert (logits - hf_logits).abs().max() <= 2 * hf_error


@pytest.mark.parametrize(
    "scaling",
    [
        dict(rope_type="linear", factor=4.0),
        dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=512),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512, beta_fast=16,
             mscale=0.8, mscale_all_dim=0.6),
    ],
    ids=["linear", "llama3", "yarn", "yarn_mscale"],
)
def test_rope_scaling_matches_transformers(scaling):
    hf_config = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=4, max_position_embeddings=2048,
        rope_parameters={**scaling, "rope_theta": 500000.0},
    )
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")
    inv_freq, factor = rope_inv_freq(128, 500000.0, scaling, 2048)
    torch.testing.assert_close(inv_freq, hf_inv_freq, atol=0, rtol=1e-6)
    assert factor == pytest.approx(hf_factor)


def test_tensor_parallel_shards_reassemble_full_projections():
    """Each rank's shard of a fused column layer, and the sum over ranks of a row layer, equal the full matmul."""
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    q, k, v = torch.randn(64, 32), torch.randn(16, 32), torch.randn(16, 32)  # 4 q heads, 1 kv head, D = 16
    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    h, down = torch.randn(5, 48), torch.randn(32, 48)
    for tp_size in (1, 2):
        row_sum = 0
        for rank in range(tp_size):
            qkv = QKVParallelLinear(32, 16, 4, 1, tp_rank=rank, tp_size=tp_size)
            for shard_id, w in (("q", q), ("k", k), ("v", v)):
                qkv.weight.weight_loader(qkv.weight, w, shard_id)
            q_out, k_out, v_out = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
            q_rows = slice(rank * 64 // tp_size, (rank + 1) * 64 // tp_size)
            torch.testing.assert_close(q_out, x @ q[q_rows].T)
            torch.testing.assert_close(k_out, x @ k.T)  # the single kv head is replicated
            torch.testing.assert_close(v_out, x @ v.T)

            gate_up = MergedColumnParallelLinear(32, [48, 48], tp_rank=rank, tp_size=tp_size)
            gate_up.weight.weight_loader(gate_up.weight, gate, 0)
            gate_up.weight.weight_loader(gate_up.weight, up, 1)
            rows = slice(rank * 48 // tp_size, (rank + 1) * 48 // tp_size)
            torch.testing.assert_close(gate_up(x), torch.cat([x @ gate[rows].T, x @ up[rows].T], dim=-1))

            down_proj = RowParallelLinear(48, 32, tp_rank=rank, tp_size=tp_size)
            down_proj.weight.weight_loader(down_proj.weight, down)
            # The partial product of this rank's input columns (forward would all-reduce it).
            row_sum = row_sum + down_proj.linear_method.apply(down_proj, h[:, rows], None)
        torch.testing.assert_close(row_sum, h @ down.T)


def test_loader_names_missing_weights(tmp_path):
    config_cls, model_cls, overrides = TINY_MODELS["llama_gqa_tied"]
    _save_tiny_hf_model(tmp_path, config_cls, model_cls, **overrides)
    path = str(tmp_path / "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.norm.weight"]
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 2 weights") as err:
        load_model(load_model_config(str(tmp_path), dtype="float32"))
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value) and "model.norm.weight" in str(err.value)


def _write_config(folder, **fields) -> str:
    os.makedirs(folder, exist_ok=True)
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**base, **fields}, f)
    return str(folder)


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    folder = _write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        load_model_config(folder)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(err.value)


def test_config_dtype_and_eos_resolution(tmp_path):
    folder = _write_config(tmp_path, dtype="float16", eos_token_id=2)
    assert load_model_config(folder).dtype == "bfloat16"  # float16 checkpoints run as bfloat16 on CPU
    assert load_model_config(folder, dtype="float32").dtype == "float32"
    assert load_model_config(folder).eos_token_ids == (2,)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    assert load_model_config(folder).eos_token_ids == (2, 7)
    with pytest.raises(ValueError, match="float16"):
        load_model_config(folder, dtype="fp16")


@pytest.fixture(scope="module")
def smollm2_pair():
    """(kvserve model, HF model) for the default GGUF model, both float32, loaded once for the module."""
    path = default_model_path()
    model = load_model(load_model_config(path, dtype="float32"))
    _attach_kv_caches(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return model, hf


def test_default_gguf_model_matches_hf(smollm2_pair):
    model, hf = smollm2_pair
    assert model.config.architecture == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    ids = [1] + _prompt(29, seed=5, vocab=model.config.vocab_size)
    hidden = _step(model, [ids], [len(ids)], [list(range(8))])
    hf_logits = _hf_outputs(hf, ids)[1]
    torch.testing.assert_close(model.compute_logits(hidden), hf_logits, atol=1e-3, rtol=1e-4)
