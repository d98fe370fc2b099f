"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): just the math.

Tokens of all requests in a step are packed along one dim T (no batch dim); where each request's
tokens sit and what they attend to reaches `Attention` through the forward context, never through
this file. Variants differ only by config flags: `attention_bias` (Qwen2: bias on q/k/v) and
`qk_norm` (Qwen3: per-head RMSNorm on q and k before rotary).

Parameter names match Hugging Face checkpoints except the fused projections, which
`packed_modules_mapping` maps back to the checkpoint's separate tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from kvserve.config import ModelConfig
from kvserve.layers.activation import SiluAndMul
from kvserve.layers.attention import Attention
from kvserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            dtype=dtype,
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=False, dtype=dtype
        )
        # Qwen3: RMSNorm over each head's D values of q and k, before rotary.
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype) if config.qk_norm else None
        self.rotary_emb = rotary_emb  # one instance shared by all layers
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, config.head_dim, config.head_dim**-0.5
        )

    def forward(self, cos_sin: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """cos_sin: [T, D] rotary table rows of the tokens' positions, hidden: [T, hidden] -> [T, hidden]."""
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 * Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)  # per head: [T, Hq, D]
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        q, k = self.rotary_emb(cos_sin, q, k)
        return self.o_proj(self.attn(q, k, v))  # attn: [T, Hq * D]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=False, dtype=dtype)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, rotary_emb, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype)

    def forward(
        self, cos_sin: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual add deferred into the next norm.

        hidden: [T, hidden] model dtype; residual: [T, hidden] float32 (layers/norm.py says why), None
        before the first layer. Invariant: the true residual stream after this layer is hidden + residual."""
        if residual is None:
            residual, hidden = hidden.float(), self.input_layernorm(hidden)  # float(): a copy unless float32
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.rotary_emb = rotary_emb  # one table for all layers; each attention applies it
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(config, rotary_emb, dtype) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # Set by the model runner where it applies: callable(hidden, cos_sin) -> (hidden, residual)
        # after all layers, or None for steps it does not cover (ops/cpu_layers.CpuLayerStack).
        self.layer_stack = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        cos_sin = self.rotary_emb.cos_sin(positions)  # [T, D], shared by every layer
        stacked = self.layer_stack(hidden, cos_sin) if self.layer_stack is not None else None
        if stacked is not None:  # the same layers, run in one call (ops/cpu_layers.py)
            hidden, residual = stacked
        else:
            for layer in self.layers:
                hidden, residual = layer(cos_sin, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (fused parameter's module name, shard id for its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dtype = getattr(torch, config.dtype)
        self.model = LlamaModel(config, dtype)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, tied_embedding=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] long (packed tokens of many requests) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(
        self, hidden: torch.Tensor, upcast: bool = True, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden: [N, hidden] (usually one row per request) -> logits [N, vocab], float32 unless
        upcast=False (then as the head computes them, float32 or the model dtype: the greedy sampler
        takes argmax without a float32 copy). out: a float32 [N, vocab] buffer the head may fill."""
        logits = self.lm_head(hidden, out)
        return logits.float() if upcast else logits
