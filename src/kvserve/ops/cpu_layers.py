"""A stack of Llama decoder layers in one C++ call, for steps the CPU kernels cover end to end.

In a step of at most the matmuls' rows (bf16 weights: the decode matmul's, 512 with AMX, 48 on AVX2,
64 on AVX-512, 4 with AVX512_BF16, csrc/vec*.hpp; GGUF blocks: the block kernel's) the Python layers
(model/llama.py) hand every op to a C++ kernel, and between the kernels run Python: module calls, views, checks, ctypes, a fresh tensor
per op. `CpuLayerStack` runs the same kernels in the same order on the same values from C++
(kv_llama_layers), with one scratch buffer, so the hidden states and the KV cache it writes
are bit-identical to the layers'; the layers are its reference (tests/model/test_cpu_layer_stack.py).
Default model, decode step, interleaved: batch 1 22.1 -> 12.4 ms, 16 35.9 -> 25.1, 64 73.3 -> 59.1,
256 226 -> 204. (With the kernels replaced by no-ops the layers' Python is ~3.3 ms per step; between
real kernels it costs several times that.)

It applies to a model whose layers are all Llama layers, in bf16 or float32 (over a float32 or bf16 KV
cache: attention then in bf16, q / k / v rounded after rotary as layers/attention.py does), whose linears are bf16
weights in decode_matmul's layout (cpu_ops.decode_weight, bf16 models) or GGUF blocks of a kernel type
(layers/block_linear.py), no biases, no q/k norms; and to a step whose rows are at most the matmuls' row
limit and whose attention the CPU backend sends through its kernels only: fresh prompts through the
AMX prefill kernel (bf16), every other request through the paged kernel, after a shared prefix through
the AMX kernel when a cascade covers every row of the step (no long chunk after context). Elsewhere it
declines (returns None) and the layers run.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvserve.forward_context import get_attention_metadata
from kvserve.layers.block_linear import BlockLinearMethod
from kvserve.ops import cpu_build, cpu_ops, quant_ops

_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class CpuLayerStack:
    """Runs model.layers (LlamaDecoderLayer) for one step. Holds, per layer, the addresses of its
    weights and KV cache and its linears' weight types (an int64 [L, 12] table); the tensors
    themselves stay owned by the model and the runner, which keep them alive and in place for the
    engine's life."""

    def __init__(self, layers, max_rows: int) -> None:
        self.num_layers, self.max_rows = len(layers), max_rows
        first = layers[0]
        attn = first.self_attn.attn
        self.dtype = first.input_layernorm.weight.dtype  # activations
        self.cache_dtype = attn.kv_cache.dtype  # the same, or bf16 under float32 activations
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale, self.eps = attn.scale, first.input_layernorm.eps
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.intermediate = _shape(first.mlp.down_proj)[1]  # down_proj's K
        self.block_size = attn.kv_cache.shape[2]
        self.dtype_code = _DTYPES[self.dtype, self.cache_dtype]
        # Scratch bytes per row. Activations: normed, qkv, gate_up, act (+ attention out read back,
        # mixed); the cache's type: (qkv, mixed), q, attention out, prefix out; prefix lse float32:
        # see the C++. The call adds 128 bytes for its two 64-byte alignments.
        mixed, hd = self.cache_dtype != self.dtype, self.num_heads * self.head_dim
        w = hd + 2 * self.num_kv_heads * self.head_dim  # a qkv row
        act_elems = self.hidden_size + w + 3 * self.intermediate + (hd if mixed else 0)
        cache_elems = (w if mixed else 0) + 3 * hd
        self.scratch_row_bytes = (
            act_elems * self.dtype.itemsize + cache_elems * self.cache_dtype.itemsize + 4 * self.num_heads
        )
        rows = []
        for layer in layers:
            keys, values = cpu_ops.kv_halves(layer.self_attn.attn.kv_cache)
            linears = [layer.get_submodule(name) for name in _LINEARS]
            weights = [_weight(linear).data_ptr() for linear in linears]
            rows.append([
                layer.input_layernorm.weight.data_ptr(), weights[0], weights[1],
                layer.post_attention_layernorm.weight.data_ptr(), weights[2], weights[3], keys, values,
                *(_weight_type(linear) for linear in linears),
            ])  # fmt: skip
        self.pointers = torch.tensor(rows, dtype=torch.long)  # [L, 12]

    @classmethod
    def build(cls, model: torch.nn.Module, backend) -> Optional["CpuLayerStack"]:
        """The stack for `model` (a causal LM whose .model.layers are Llama layers) once its weights
        are repacked and its KV caches assigned, attention going through `backend` (the CPU
        backend's plan says which steps the paged kernel covers); None where it does not apply."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        lib = cpu_build.load()
        if not layers or lib is None or not hasattr(lib, "kv_llama_layers"):
            return None
        if getattr(backend, "name", None) != "cpu":  # attention.cpu_paged.CpuAttentionBackend
            return None
        max_rows = None
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or getattr(attn, "q_norm", None) is not None or not hasattr(layer, "mlp"):
                return None
            cache, dtype = attn.attn.kv_cache, layer.input_layernorm.weight.dtype
            if cache is None or (dtype, cache.dtype) not in _DTYPES or not cache.is_cpu or not cache.is_contiguous():
                return None
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype != dtype or not norm.weight.is_contiguous():
                    return None
            for name in _LINEARS:
                linear = layer.get_submodule(name)
                rows = _max_rows(linear, dtype)
                if not rows or getattr(linear, "bias", None) is not None:
                    return None
                max_rows = rows if max_rows is None else min(max_rows, rows)
        if not max_rows:
            return None
        return cls(layers, max_rows)

    def __call__(self, hidden: torch.Tensor, cos_sin: torch.Tensor):
        """hidden: [T, H] embeddings (bf16 or float32), cos_sin: [T, D] float32 -> (hidden, residual)
        as the layers would return them after the last layer, or None where this step is not covered."""
        m, meta = hidden.shape[0], get_attention_metadata()
        plan = meta.backend_state
        if not 0 < m <= self.max_rows or plan is None or plan.context is not None:
            return None
        cascade = plan.cascade  # covered where the kernel reads it: every row, consecutive blocks
        if cascade is not None and not cascade.in_place_over_all_rows:
            return None
        reqs = cascade.reqs if cascade is not None else plan.kernel_reqs
        if reqs.numel() + plan.fresh_starts.numel() != len(meta.query_lens):
            return None  # (a request neither fresh nor in the paged kernel's list)
        index = (meta.slot_mapping, meta.block_tables_host, meta.seq_lens, meta.query_start_loc_host, reqs,
                 plan.fresh_starts, plan.fresh_lens)  # fmt: skip
        if any(t.dtype != torch.int64 or not t.is_contiguous() or not t.is_cpu for t in index):
            return None
        if hidden.dtype != self.dtype or not hidden.is_contiguous():
            return None
        if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
            return None
        out, residual = torch.empty_like(hidden), hidden.new_empty(hidden.shape, dtype=torch.float32)
        heads, kv, d, i = self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        scratch = torch.empty(m * self.scratch_row_bytes + 128, dtype=torch.uint8)
        tables = meta.block_tables_host
        prefix = (cascade.prefix_blocks.numel(), cascade.prefix_first) if cascade is not None else (0, 0)
        dims = torch.tensor(
            [m, self.hidden_size, heads, kv, d, i, self.block_size, tables.stride(0), reqs.numel(),
             plan.fresh_starts.numel(), *prefix],
            dtype=torch.long,
        )  # fmt: skip
        done = cpu_build.load().kv_llama_layers(
            self.dtype_code, self.num_layers, self.pointers.data_ptr(), hidden.data_ptr(), out.data_ptr(), residual.data_ptr(),
            scratch.data_ptr(), dims.data_ptr(), cos_sin.data_ptr(), meta.slot_mapping.data_ptr(), tables.data_ptr(),
            meta.seq_lens.data_ptr(), meta.query_start_loc_host.data_ptr(), reqs.data_ptr(),
            plan.fresh_starts.data_ptr(), plan.fresh_lens.data_ptr(), self.eps, self.scale,
        )  # fmt: skip
        return (out, residual) if done else None


# (activations, KV cache) -> the kernel's dtype code
_DTYPES = {(torch.float32, torch.float32): 0, (torch.bfloat16, torch.bfloat16): 1, (torch.float32, torch.bfloat16): 2}


def _weight(linear) -> torch.Tensor:
    """The tensor the stack multiplies with: GGUF blocks, else the decode kernel's bf16 copy."""
    return linear.weight if isinstance(linear.linear_method, BlockLinearMethod) else linear.decode_weight


def _weight_type(linear) -> int:
    """-1 for a bf16 weight in decode_weight's layout, else the GGUF block type."""
    return linear.linear_method.qtype if isinstance(linear.linear_method, BlockLinearMethod) else -1


def _shape(linear) -> tuple[int, int]:
    """(N, K) of the matmul."""
    if isinstance(linear.linear_method, BlockLinearMethod):
        return linear.weight.shape[0], linear.in_features
    decode = linear.decode_weight  # [N / 16, K / 2, 16, 2]
    return decode.shape[0] * 16, decode.shape[1] * 2


def _max_rows(linear, dtype: torch.dtype) -> int:
    """Rows up to which the stack's matmul for this linear runs its kernel; 0 where none applies."""
    if isinstance(linear.linear_method, BlockLinearMethod):
        n, k = _shape(linear)
        return quant_ops.matmul_max_rows(linear.linear_method.qtype, k, n)
    if dtype != torch.bfloat16 or getattr(linear, "decode_weight", None) is None:
        return 0
    n, k = _shape(linear)
    return cpu_ops.decode_matmul_max_rows(k, n)
