"""The attention interface: one write-then-attend call per layer over the paged KV cache.

KV cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = keys, 1 = values).
A backend first writes this step's k/v at meta.slot_mapping, then attends each query row to its
request's context read through meta.block_tables, causally (query i of request b sits at position
seq_lens[b] - query_len[b] + i). All layers see the same metadata; `prepare` runs once per step.
A backend that reads whole blocks and masks the unused tail sets needs_zeroed_blocks: the runner
then zeroes each block before its first use, so that slots never written hold finite values.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvserve.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name: str = "abstract"
    needs_zeroed_blocks: bool = True  # False: never reads a slot past a request's context
    # True: prepare + forward over metadata with graph_max_seq_len set can be captured in a CUDA graph:
    # per-step values read only from its device tensors, shapes and launches fixed by the bound and
    # the batch size, no host sync (worker/cuda_graphs.py captures decode-only steps only then).
    graph_safe: bool = False

    def prepare(self, meta: AttentionMetadata) -> None:
        """Precompute per-step state into meta.backend_state (called once per step, before the forward)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...


def get_attention_backend(device: str, dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """The fastest backend that applies: the CPU kernels on a CPU (float32/bfloat16, when the
    library builds), the Triton kernels on a GPU (CUDA or ROCm, when triton imports), else the
    torch-native reference."""
    from kvserve.attention.torch_ref import TorchAttentionBackend

    if torch.device(device).type == "cuda":  # ROCm builds of torch name their GPUs "cuda" too
        try:
            from kvserve.attention.triton_attn import TritonAttentionBackend
        except ImportError:
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        from kvserve.ops import cpu_build

        if cpu_build.load() is not None:
            from kvserve.attention.cpu_paged import CpuAttentionBackend

            return CpuAttentionBackend()
    return TorchAttentionBackend()
