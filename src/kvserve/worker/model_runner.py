"""One forward + sampling per step. Owns the model, the KV cache tensors and the input batch.

Step: apply scheduler diffs -> pack tokens -> forward over all of them (on a GPU, decode-only steps
replay a CUDA graph: worker/cuda_graphs.py) -> logits only at the rows that sample (and prompt-logprob
rows) -> sample -> one transfer to the host.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from kvserve import host_memory
from kvserve.attention import get_attention_backend
from kvserve.attention.metadata import build_attention_metadata
from kvserve.config import EngineConfig
from kvserve.core.sched_output import SchedulerOutput
from kvserve.forward_context import set_forward_context
from kvserve.layers.attention import Attention
from kvserve.model.loader import load_model
from kvserve.ops import gpu_ops
from kvserve.ops.cpu_layers import CpuLayerStack
from kvserve.worker.cuda_graphs import CudaGraphRunner, DecodeBuffers, capture_sizes, graph_capture_for
from kvserve.worker.grammar_mask import apply_grammar_bitmask
from kvserve.worker.input_batch import InputBatch, StepBatch
from kvserve.worker.sampler import Sampler, SamplerOutput, gather_logprobs
from kvserve.worker.sampling_metadata import SamplingMetadata

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (token ids [k+1], logprobs [k+1], rank of the first) for one position; column 0 = the chosen token.
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # req_id -> (first prompt position, logprobs of positions first.. predicting the next prompt token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


def kv_cache_bytes_per_block(config: EngineConfig) -> int:
    m = config.model
    elem = torch.tensor([], dtype=DTYPES[config.cache.cache_dtype]).element_size()
    return 2 * m.num_hidden_layers * config.cache.block_size * m.num_key_value_heads * m.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Optional[torch.nn.Module] = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.model.dtype]  # activations
        self.cache_dtype = DTYPES[config.cache.cache_dtype]  # the KV cache and attention (layers/attention.py)
        if self.device.type == "cpu":
            host_memory.keep_freed_memory()  # each step's activations reuse the last step's pages
        self.model = model if model is not None else load_model(config.model, self.device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = get_attention_backend(config.device, self.cache_dtype)
        # The GPU's fused norms, rotary and SiLU (ops/gpu_ops.py), on before any forward or capture.
        gpu_ops.configure(config.compilation.custom_ops, config.device)
        self.sampler = Sampler()
        self.input_batch = InputBatch(self.device)
        self.kv_caches: list[torch.Tensor] = []
        # Decode graphs (worker/cuda_graphs.py): how they are captured (None: every step eager, as on
        # a CPU), and once the KV cache exists, the captured graphs.
        self._graph_capture = graph_capture_for(config, self.backend)
        self.graphs: Optional[CudaGraphRunner] = None
        # float32 [rows, vocab], grown to the most rows sampled in one step: the head's logits go here
        # (CPU decode kernel, bf16 models: the only writer) so that a step does not page-fault them in
        # (256 rows x 49,152: 50 MB, past glibc's largest mmap threshold, so a fresh tensor is mapped
        # anew every step: +13 ms). None where nothing would write into it.
        self._logits_buffer: Optional[torch.Tensor] = None
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            self._logits_buffer = torch.empty(0, config.model.vocab_size, dtype=torch.float32)

    def determine_num_blocks(self) -> int:
        """KV blocks that fit the budget: kv_cache_memory_bytes, else a fraction of the memory
        available now (after the weights are loaded)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        budget = cache.kv_cache_memory_bytes
        if budget is None:
            budget = int(_available_memory(self.device) * cache.kv_cache_memory_fraction)
        return budget // kv_cache_bytes_per_block(self.config)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One [2, num_blocks, block_size, Hkv, D] tensor per layer, left uninitialised: touching
        gigabytes up front costs seconds of page faults at start-up. A backend that reads a block's
        unwritten tail (masked out) needs it free of NaN: then each block is zeroed on first use.
        With decode graphs, one more block (index num_blocks, outside the block pool's ids) is their
        scratch block; the graphs are captured once the caches exist."""
        m, bs = self.config.model, self.config.cache.block_size
        scratch = 1 if self._graph_capture is not None else 0
        shape = (2, num_blocks + scratch, bs, m.num_key_value_heads, m.head_dim)
        self.kv_caches = [torch.empty(shape, dtype=self.cache_dtype, device=self.device) for _ in self.attn_layers]
        self._never_used = torch.ones(num_blocks, dtype=torch.bool)  # host mask of blocks not yet zeroed
        for layer, cache in zip(self.attn_layers, self.kv_caches):
            layer.kv_cache, layer.backend = cache, self.backend
        body = getattr(self.model, "model", None)
        if self.device.type == "cpu" and hasattr(body, "layer_stack"):  # it holds the caches' addresses
            body.layer_stack = CpuLayerStack.build(self.model, self.backend)
        if self.device.type == "cpu" and self.config.cache.prefault_in_background:
            caches = list(self.kv_caches)  # the thread holds them until it is done
            threading.Thread(target=_prefault, args=(caches,), name="kvserve-kv-prefault", daemon=True).start()
        if scratch:
            self._capture_graphs(scratch_block=num_blocks)

    @torch.inference_mode()
    def _capture_graphs(self, scratch_block: int) -> None:
        """The decode graphs, one per size of the ladder up to min(max_num_seqs, the capture cap)."""
        sched = self.config.scheduler
        sizes = capture_sizes(sched.max_num_seqs, self.config.compilation.max_cudagraph_capture_size)
        if not sizes:
            return
        for cache in self.kv_caches:  # padding rows write and read only this block: finite from the start
            cache[:, scratch_block].zero_()
        bs = self.config.cache.block_size
        buffers = DecodeBuffers(sizes[-1], bs, sched.max_model_len, scratch_block, self.device)
        try:
            self.graphs = CudaGraphRunner(self.model, self.backend, buffers, sizes, self._graph_capture)
        except Exception as e:  # (out of memory, an op that cannot be captured): serve eagerly, say why
            logger.warning("CUDA graph capture failed (%s: %s); every step runs eagerly. Pass --enforce-eager "
                           "to skip the capture.", type(e).__name__, e)  # fmt: skip
            self.graphs = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def execute_model(self, sched_out: SchedulerOutput) -> ModelRunnerOutput:
        self.input_batch.apply(sched_out)
        if sched_out.is_empty:
            return ModelRunnerOutput()
        if self.backend.needs_zeroed_blocks:
            self._zero_fresh_blocks(sched_out)
        batch = self.input_batch.build(sched_out)
        hidden, starts = self._forward(batch)  # [T, H]; [B + 1]: request b's rows are starts[b]:starts[b + 1]
        results = {}
        if batch.sampling_rows:
            results["sample"] = self._sample(batch, sched_out, starts, hidden)
        if batch.prompt_logprob_spans:
            results["prompt"] = self._prompt_logprobs(batch, starts.tolist(), hidden)
        results = _to_host(results, self.device)

        out = ModelRunnerOutput()
        if "sample" in results:
            self._record_samples(batch, results["sample"], out)
        if "prompt" in results:
            self._record_prompt_logprobs(batch, results["prompt"], out)
        return out

    def _forward(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden states [T, H] of the step's packed rows and query_start_loc on the host [B + 1]:
        through a decode graph where one applies (a view of its output: read before the next step)."""
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is not None:  # decode-only: request b's one row is row b
            return hidden, torch.arange(len(batch.req_ids) + 1)
        meta = build_attention_metadata(
            batch.query_lens, batch.seq_lens, batch.block_tables, self.config.cache.block_size, self.device
        )
        self.backend.prepare(meta)
        input_ids = torch.tensor(batch.input_ids, dtype=torch.long, device=self.device)
        with set_forward_context(meta):
            hidden = self.model(input_ids, meta.positions)  # [T, H]
        return hidden, meta.query_start_loc_host

    def _sample(
        self, batch: StepBatch, sched_out: SchedulerOutput, starts: torch.Tensor, hidden: torch.Tensor
    ) -> SamplerOutput:
        rows = (starts[1:][batch.sampling_rows] - 1).to(self.device)  # last row of each sampling request
        n, buffer = rows.shape[0], self._logits_buffer
        if buffer is not None and buffer.shape[0] < n:
            buffer = self._logits_buffer = buffer.new_empty(n, buffer.shape[1])
        # [S, V] float32 or the model dtype; read only by this step's sampler
        logits = self.model.compute_logits(hidden[rows], upcast=False, out=None if buffer is None else buffer[:n])
        if sched_out.grammar_bitmask is not None:  # only when some row samples under a grammar
            row_of = {batch.req_ids[b]: i for i, b in enumerate(batch.sampling_rows)}
            apply_grammar_bitmask(logits, sched_out.grammar_bitmask, [row_of[r] for r in sched_out.grammar_req_ids])
        states = [self.input_batch.requests[batch.req_ids[b]] for b in batch.sampling_rows]
        meta = SamplingMetadata.build(
            [s.sampling_params for s in states],
            [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states],
            [s.generator for s in states],
            self.config.model.vocab_size,
            self.device,
        )
        return self.sampler(logits, meta)

    def _record_samples(self, batch: StepBatch, sampled: SamplerOutput, out: ModelRunnerOutput) -> None:
        """Append each sampled token to the runner's copy of its request; fill the step's output."""
        token_ids = sampled.sampled_token_ids.tolist()
        states = [self.input_batch.requests[batch.req_ids[b]] for b in batch.sampling_rows]
        for state, token_id in zip(states, token_ids):
            state.token_ids.append(token_id)
            out.sampled[state.req_id] = [token_id]
        if sampled.logprobs is None:
            return
        ids, lps, ranks = sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist(), sampled.sampled_token_ranks.tolist()
        for row, state in enumerate(states):
            if state.sampling_params.logprobs is not None:
                k = state.sampling_params.logprobs + 1
                out.logprobs[state.req_id] = (ids[row][:k], lps[row][:k], ranks[row])

    def _record_prompt_logprobs(self, batch: StepBatch, result, out: ModelRunnerOutput) -> None:
        ids, lps, ranks = (t.tolist() for t in result)
        offset = 0
        for b, first, count in batch.prompt_logprob_spans:
            state = self.input_batch.requests[batch.req_ids[b]]
            k = state.sampling_params.prompt_logprobs + 1
            entries = [(ids[i][:k], lps[i][:k], ranks[i]) for i in range(offset, offset + count)]
            out.prompt_logprobs[state.req_id] = (first, entries)
            state.num_prompt_logprobs_done = first + count
            offset += count

    def _zero_fresh_blocks(self, sched_out: SchedulerOutput) -> None:
        new_ids = [b for r in sched_out.scheduled_new_reqs for b in r.block_ids]
        new_ids += [b for r in sched_out.scheduled_cached_reqs for b in r.new_block_ids]
        if not new_ids:
            return
        ids = torch.tensor(new_ids, dtype=torch.long)
        fresh = ids[self._never_used[ids]]
        if fresh.numel():
            self._never_used[fresh] = False
            fresh = fresh.to(self.device)
            for cache in self.kv_caches:
                cache.index_fill_(1, fresh, 0)

    def _prompt_logprobs(self, batch: StepBatch, starts: list[int], hidden: torch.Tensor):
        """Logprobs of each prompt token given the ones before it, for the prompt positions in this chunk."""
        rows, targets, k = [], [], 0
        for b, first, count in batch.prompt_logprob_spans:
            state = self.input_batch.requests[batch.req_ids[b]]
            chunk_start = batch.seq_lens[b] - batch.query_lens[b]  # position of the chunk's first row
            rows.extend(range(starts[b] + first - chunk_start, starts[b] + first - chunk_start + count))
            targets.extend(state.token_ids[first + 1 : first + 1 + count])
            k = max(k, state.sampling_params.prompt_logprobs)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        logprobs = torch.log_softmax(logits, dim=-1)
        return gather_logprobs(logprobs, torch.tensor(targets, device=self.device), k)


def _prefault(caches: list[torch.Tensor]) -> None:
    """Fault the KV cache's pages in, contents untouched (host_memory.populate), while the server
    waits for requests: each first write to a page costs a fault (~4 us in this VM), which would
    otherwise land inside the first steps that reach it. Served 64 concurrent streams of 256/128
    tokens, 2 GiB cache, in pairs: median ITL 81.7 / 91.0 vs 85.3 / 97.5 ms, output 556 / 489 vs 550 /
    473 tok/s. vLLM zero-fills its cache before it serves; here the server is ready meanwhile."""
    start = time.perf_counter()
    for cache in caches:
        if not host_memory.populate(cache.data_ptr(), cache.numel() * cache.element_size()):
            logger.info("KV cache pages not faulted in ahead (madvise MADV_POPULATE_WRITE failed: it needs Linux "
                        ">= 5.14 and memory to back them); each is faulted in on first use")
            return
    logger.info("KV cache pages faulted in ahead in %.1f s", time.perf_counter() - start)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_memory.available_bytes()


def _to_host(results: dict, device: torch.device) -> dict:
    """The step's single device-to-host transfer: start every copy, then wait once."""

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to("cpu", non_blocking=True)
        if isinstance(x, tuple):
            return tuple(move(t) for t in x)
        if isinstance(x, SamplerOutput):
            return SamplerOutput(*(move(getattr(x, f)) for f in x.__dataclass_fields__))
        return x

    moved = {k: move(v) for k, v in results.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return moved
