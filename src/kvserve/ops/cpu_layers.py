"""A stack of Llama decoder layers in one C++ call, for steps the CPU kernels cover end to end.

In a bf16 step of at most the decode matmul's rows (512 with AMX, 48 on AVX2, 64 on AVX-512, 4 with
AVX512_BF16; csrc/vec*.hpp) the Python layers (model/llama.py) hand every op to a C++
kernel, and between the kernels run Python: module calls, views, checks, ctypes, a fresh tensor
per op. `CpuLayerStack` runs the same kernels in the same order on the same values from C++
(kv_llama_layers_bf16), with one scratch buffer, so the hidden states and the KV cache it writes
are bit-identical to the layers'; the layers are its reference (tests/model/test_cpu_layer_stack.py).
Default model, decode step, interleaved: batch 1 22.1 -> 12.4 ms, 16 35.9 -> 25.1, 64 73.3 -> 59.1,
256 226 -> 204. (With the kernels replaced by no-ops the layers' Python is ~3.3 ms per step; between
real kernels it costs several times that.)

It applies to a model whose layers are all Llama layers with bf16 weights in decode_matmul's layout
(cpu_ops.decode_weight, at every CPU level), no biases, no q/k norms; and to a step whose rows are at most
decode_matmul's row limit and whose attention the CPU backend sends through its kernels only: fresh
prompts through the AMX prefill kernel, every other request through the paged kernel, after a
shared prefix through the AMX kernel when a cascade covers every row of the step (no long chunk
after context). Elsewhere it declines (returns None) and the layers run.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvserve.forward_context import get_attention_metadata
from kvserve.ops import cpu_build, cpu_ops

_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class CpuLayerStack:
    """Runs model.layers (LlamaDecoderLayer) for one step. Holds, per layer, the addresses of its
    weights and KV cache (an int64 [L, 8] table); the tensors themselves stay owned by the model
    and the runner, which keep them alive and in place for the engine's life."""

    def __init__(self, layers, max_rows: int) -> None:
        self.num_layers, self.max_rows = len(layers), max_rows
        first = layers[0]
        attn = first.self_attn.attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale, self.eps = attn.scale, first.input_layernorm.eps
        self.hidden_size = first.input_layernorm.weight.shape[0]
        self.intermediate = first.mlp.down_proj.decode_weight.shape[1] * 2  # [N / 16, K / 2, 16, 2]: K = I
        self.block_size = attn.kv_cache.shape[2]
        rows = []
        for layer in layers:
            keys, values = cpu_ops.kv_halves(layer.self_attn.attn.kv_cache)
            s, m = layer.self_attn, layer.mlp
            rows.append([
                layer.input_layernorm.weight.data_ptr(), s.qkv_proj.decode_weight.data_ptr(),
                s.o_proj.decode_weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                m.gate_up_proj.decode_weight.data_ptr(), m.down_proj.decode_weight.data_ptr(), keys, values,
            ])  # fmt: skip
        self.pointers = torch.tensor(rows, dtype=torch.long)  # [L, 8]

    @classmethod
    def build(cls, model: torch.nn.Module, backend) -> Optional["CpuLayerStack"]:
        """The stack for `model` (a causal LM whose .model.layers are Llama layers) once its weights
        are repacked and its KV caches assigned, attention going through `backend` (the CPU
        backend's plan says which steps the paged kernel covers); None where it does not apply."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        lib = cpu_build.load()
        if not layers or lib is None or not hasattr(lib, "kv_llama_layers_bf16"):
            return None
        if getattr(backend, "name", None) != "cpu":  # attention.cpu_paged.CpuAttentionBackend
            return None
        max_rows = None
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or getattr(attn, "q_norm", None) is not None or not hasattr(layer, "mlp"):
                return None
            cache = attn.attn.kv_cache
            if cache is None or cache.dtype != torch.bfloat16 or not cache.is_cpu or not cache.is_contiguous():
                return None
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype != torch.bfloat16 or not norm.weight.is_contiguous():
                    return None
            for name in _LINEARS:
                linear = layer.get_submodule(name)
                decode = getattr(linear, "decode_weight", None)
                if decode is None or getattr(linear, "bias", None) is not None:
                    return None
                n, k = decode.shape[0] * 16, decode.shape[1] * 2
                rows = cpu_ops.decode_matmul_max_rows(k, n)
                max_rows = rows if max_rows is None else min(max_rows, rows)
        if not max_rows:
            return None
        return cls(layers, max_rows)

    def __call__(self, hidden: torch.Tensor, cos_sin: torch.Tensor):
        """hidden: [T, H] bf16 embeddings, cos_sin: [T, D] float32 -> (hidden, residual) as the layers
        would return them after the last layer, or None where this step is not covered."""
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
        if hidden.dtype != torch.bfloat16 or not hidden.is_contiguous():
            return None
        if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
            return None
        out, residual = torch.empty_like(hidden), hidden.new_empty(hidden.shape, dtype=torch.float32)
        heads, kv, d, i = self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate
        # normed, qkv, q, attention out, gate_up, act, prefix out, prefix lse (float32, aligned): see the C++
        per_row = self.hidden_size + (heads + 2 * kv) * d + 3 * heads * d + 3 * i + 2 * heads
        scratch = hidden.new_empty(m * per_row + 32)
        tables = meta.block_tables_host
        prefix = (cascade.prefix_blocks.numel(), cascade.prefix_first) if cascade is not None else (0, 0)
        dims = torch.tensor(
            [m, self.hidden_size, heads, kv, d, i, self.block_size, tables.stride(0), reqs.numel(),
             plan.fresh_starts.numel(), *prefix],
            dtype=torch.long,
        )  # fmt: skip
        done = cpu_build.load().kv_llama_layers_bf16(
            self.num_layers, self.pointers.data_ptr(), hidden.data_ptr(), out.data_ptr(), residual.data_ptr(),
            scratch.data_ptr(), dims.data_ptr(), cos_sin.data_ptr(), meta.slot_mapping.data_ptr(), tables.data_ptr(),
            meta.seq_lens.data_ptr(), meta.query_start_loc_host.data_ptr(), reqs.data_ptr(),
            plan.fresh_starts.data_ptr(), plan.fresh_lens.data_ptr(), self.eps, self.scale,
        )  # fmt: skip
        return (out, residual) if done else None
