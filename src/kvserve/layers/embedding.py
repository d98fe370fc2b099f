"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks.

Each rank holds vocab rows [rank * V_pp, (rank + 1) * V_pp) with V_pp = ceil(V / tp_size); the last
rank's rows past V are zero padding. With tp_size == 1 the partition is the whole vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvserve.layers.block_linear import embedding_lookup, gguf_matmul
from kvserve.layers.linear import float32_gemm, float32_gemm_applies, onednn_linear, pack_for_onednn
from kvserve.ops import cpu_ops


class VocabParallelEmbedding(nn.Module):
    """weight [V_pp, D] in the model dtype, or, with quant_type set (block_linear.keep_embedding_quantized),
    GGUF blocks uint8 [V_pp, row_bytes] of which a lookup dequantizes only its rows."""

    quant_type: Optional[int] = None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self._set_partition(num_embeddings, tp_rank, tp_size)
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype), requires_grad=False
        )  # [V_pp, D]
        self.weight.weight_loader = self.weight_loader

    def _set_partition(self, num_embeddings: int, tp_rank: int, tp_size: int) -> None:
        self.num_embeddings, self.tp_rank, self.tp_size = num_embeddings, tp_rank, tp_size
        self.num_embeddings_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """loaded_weight: the full [V, D] checkpoint matrix; copies this rank's rows, zeroes the padding."""
        expected = (self.num_embeddings, param.shape[1])
        if loaded_weight.shape != expected:
            raise ValueError(f"embedding shape mismatch: expected {expected}, got {tuple(loaded_weight.shape)}")
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] long -> [T, D]."""
        if self.tp_size == 1:
            return self._lookup(input_ids)
        # Each rank embeds the ids in its vocab range, zeros elsewhere; the sum over ranks is the lookup.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = self._lookup((input_ids - self.vocab_start) * mine) * mine[:, None]
        dist.all_reduce(out)
        return out

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_type is None:
            return F.embedding(ids, self.weight)
        return embedding_lookup(self.weight, self.quant_type, self.embedding_dim, ids, self.out_dtype)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection: logits = hidden @ weight.T, weight [V_pp, D] (the embedding's layout).

    With `tied_embedding`, the head has no parameter of its own and reads the embedding's weight at
    call time. The embedding is kept in a plain list so that it is not registered twice: it stays
    owned by the model body, and meta-device construction, `to_empty` and `.to()` cannot untie the two.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: Optional[torch.dtype] = None,
        tied_embedding: Optional[VocabParallelEmbedding] = None,
    ) -> None:
        if tied_embedding is None:
            super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size, dtype)
            self._tied: list[VocabParallelEmbedding] = []
        else:
            nn.Module.__init__(self)
            self._set_partition(num_embeddings, tp_rank, tp_size)
            self._tied = [tied_embedding]

    def process_weights_after_loading(self, keep_decode_copy: bool = False) -> None:
        """On a CPU in bfloat16, a second copy of the head's weight for the matmul (the embedding
        keeps its plain layout for lookups): with keep_decode_copy (memory allows it) in
        cpu_ops.decode_weight's layout, whose kernel writes float32 logits for any number of rows
        on every CPU level; else, where oneDNN has bf16 kernels, oneDNN-packed (measured 1.3-1.5x
        faster logits than F.linear for 1-256 rows on the default model; bf16 logits)."""
        weight = self._tied[0].weight if self._tied else self.weight
        if self._source().quant_type is not None:  # GGUF blocks: gguf_matmul, no second copy
            self._decode = self._packed = None
            return
        self._decode = cpu_ops.decode_weight(weight) if keep_decode_copy else None
        self._packed = pack_for_onednn(weight) if self._decode is None else None

    def _source(self) -> VocabParallelEmbedding:
        """The module whose weight the head multiplies: the tied embedding, or itself."""
        return self._tied[0] if self._tied else self

    def forward(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden: [N, D] -> logits [N, V] (a view when the vocab is padded): float32 where the decode
        kernel computes them (its float32 sums, unrounded), else in the model dtype. On the default
        model in bf16, rounding the logits to bf16 turned a near tie into an exact one and moved one
        of the 8 exactness prompts off float32's greedy tokens (8 of 8 agree with float32 logits).
        out: a float32 [N, V] buffer the kernel may write into (the logits are then a view of it)."""
        packed, decode = getattr(self, "_packed", None), getattr(self, "_decode", None)
        source = self._source()
        weight = source.weight
        logits = None
        if source.quant_type is not None:  # float32 logits from the blocks at any batch size
            logits = gguf_matmul(hidden, weight, source.quant_type, source.embedding_dim, None, torch.float32, True)
        elif decode is not None:
            logits = cpu_ops.decode_matmul(hidden, decode, out_dtype=torch.float32, out=out, any_rows=True)
        if logits is None and packed is not None:
            logits = onednn_linear(hidden, packed, None)  # [N, V_pp]
        if logits is None and float32_gemm_applies(hidden, weight):
            logits = float32_gemm(hidden, weight, None, torch.float32)
        if logits is None:
            logits = F.linear(hidden, weight)  # [N, V_pp]
        if self.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits)
            logits = torch.cat(shards, dim=-1)
        return logits[:, : self.num_embeddings]
