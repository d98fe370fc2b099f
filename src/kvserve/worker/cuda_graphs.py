"""CUDA graphs of decode-only steps: a ladder of batch sizes captured once at start; a step is padded
to the next captured size and replayed over persistent input buffers.

Per captured size B: views [:B] of one set of persistent buffers sized for the largest B
(DecodeBuffers: input_ids [B], positions [B], and the attention metadata of B decode rows:
slot_mapping [B], seq_lens [B], block_tables [B, W] with W = cdiv(max_model_len, block_size),
query_start_loc [B + 1] = 0..B), and the recording of backend.prepare + model.forward over them,
whose output is hidden [B, H]. The LM head stays outside the graph: logits are computed for the live
rows only, by the same code as eager steps (logits buffer, grammar masks, prompt logprobs), and a
graph would save that one GEMM's launch and nothing else. Sampling stays outside too: the runner's
one device-to-host transfer per step is unchanged.

A step replays a graph when every request has one query token (decodes, and one-token prompt
chunks), its n requests fit the largest size, and the backend is graph_safe. Rows n..B-1 are padding:
token 0 at position 0, a context of one token in the scratch block (one KV block past the block
pool's, owned by no request, zeroed at start), so a padding row writes its K/V into scratch slot 0,
attends to that slot alone, and its output is dropped. Unused table entries name the scratch block
too (torch_ref gathers whole tables).

Capture is injected (CaptureFn): cuda_graph_capture on a GPU; eager_capture, a CPU stand-in, runs
the recorded function again at each replay over the same buffers, with the metadata's host copies
frozen at capture as a graph's are, and refuses host-syncing ops while it records.
Tested on a CPU (tests/unit/test_cuda_graphs.py, tests/model/test_engine_cuda_graphs.py, and
tests/unit/test_triton_attention.py under Triton's interpreter): the ladder, the buffer fill and
padding, scratch-slot isolation, output slicing, the eager fallbacks, torch_ref's decode graph group,
the Triton plan from the bound, greedy tokens and logprobs against eager steps (torch_ref and Triton).
Awaiting a GPU run: cuda_graph_capture itself (side-stream warm-up, capture into the shared pool,
replay), whether SDPA and the Triton launches capture cleanly on a device, and the time saved.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.metadata import AttentionMetadata
from kvserve.config import EngineConfig
from kvserve.forward_context import set_forward_context
from kvserve.worker.input_batch import StepBatch

logger = logging.getLogger(__name__)

# capture(fn) records fn (which returns a tensor) and returns replay(): it redoes the recorded work
# over the same persistent buffers and returns the output, the same tensor at every replay.
CaptureFn = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]

_WARMUP_RUNS = 2  # before each capture: Triton kernels compiled, cuBLAS workspaces made


def capture_sizes(max_num_seqs: int, max_capture_size: int) -> list[int]:
    """The ladder: 1, 2, 4, ... below the cap, then the cap = min(max_num_seqs, max_capture_size)."""
    cap = min(max_num_seqs, max_capture_size)
    sizes = list(itertools.takewhile(lambda s: s < cap, (2**i for i in itertools.count())))
    return sizes + [cap] if cap >= 1 else []


def graph_capture_for(config: EngineConfig, backend: AttentionBackend) -> Optional[CaptureFn]:
    """How decode graphs are captured for this engine, or None when every step runs eagerly: not a
    CUDA device (the CPU path never captures), enforce_eager, or a backend that is not graph-safe."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return None
    if config.compilation.enforce_eager:
        logger.info("enforce_eager: no CUDA graphs, every step runs eagerly")
        return None
    if not backend.graph_safe:
        logger.info("CUDA graphs off: the %s attention backend is not graph-safe", backend.name)
        return None
    return cuda_graph_capture(device)


class DecodeBuffers:
    """The decode graphs' persistent inputs, sized for the largest captured batch; each graph reads
    views [:B] of them. Only fill() writes them, before a replay."""

    def __init__(self, max_size: int, block_size: int, max_model_len: int, scratch_block: int, device) -> None:
        self.block_size, self.max_model_len, self.scratch_block = block_size, max_model_len, scratch_block
        self.width = -(-max_model_len // block_size)  # W: table entries that cover any context
        long = dict(dtype=torch.long, device=device)
        # Filled as padding rows throughout, which is what each graph is captured over.
        self.input_ids = torch.zeros(max_size, **long)
        self.positions = torch.zeros(max_size, **long)
        self.slot_mapping = torch.full((max_size,), scratch_block * block_size, **long)
        self.seq_lens = torch.ones(max_size, **long)
        self.block_tables = torch.full((max_size, self.width), scratch_block, **long)
        # Table columns any fill has written so far (monotone): columns past it still hold the scratch
        # block in every row, so a fill rewrites only these, not all W = max_model_len / block_size
        # (at max_model_len 32,768 and 256 rows, a whole [256, 2,048] table took 7.3 ms per step).
        self.columns_written = 1
        self.query_start_loc = torch.arange(max_size + 1, **long)  # one query per row: fixed

    def metadata(self, size: int) -> AttentionMetadata:
        """The persistent metadata of the size-`size` graph: device tensors are views of the buffers;
        host copies describe the padding it is captured over and are never updated."""
        return AttentionMetadata(
            num_tokens=size, block_size=self.block_size, slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], query_lens=[1] * size, seq_lens_host=[1] * size,
            query_start_loc_host=torch.arange(size + 1), block_tables_host=torch.full((size, self.width), self.scratch_block),
            positions=self.positions[:size], graph_max_seq_len=self.max_model_len,
        )  # fmt: skip

    def fill(self, input_ids: list[int], seq_lens: list[int], block_tables: list[list[int]], size: int) -> None:
        """One decode step of n = len(seq_lens) requests into rows 0..n-1 (request b: token
        input_ids[b] at position seq_lens[b] - 1, K/V slot from its table), padding into rows n..size-1."""
        n, bs = len(seq_lens), self.block_size
        lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)  # [n]
        self.columns_written = width = max(self.columns_written, int(lens.max(initial=1)))
        # Rows 0..size-1 rewritten whole up to every column ever written: no entry of an earlier, longer
        # table is left in them (torch_ref's graph group gathers every entry of a row). In numpy: a
        # few us per array op where torch's CPU ops take tens.
        tables = np.full((size, width), self.scratch_block, dtype=np.int64)  # host
        entries = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(lens.sum()))
        tables[:n][np.arange(width) < lens[:, None]] = entries  # row-major: each row's entries in order
        seq = np.ones(size, dtype=np.int64)
        seq[:n] = seq_lens
        pos = seq - 1  # [size]: the query's position (padding: 0)
        slots = tables[np.arange(size), pos // bs] * bs + pos % bs  # padding: scratch slot 0
        ids = np.zeros(size, dtype=np.int64)
        ids[:n] = input_ids
        for buf, host in ((self.input_ids, ids), (self.positions, pos), (self.slot_mapping, slots),
                          (self.seq_lens, seq), (self.block_tables[:, :width], tables)):  # fmt: skip
            host = torch.from_numpy(host)
            buf[:size].copy_(host, non_blocking=True)  # no stream sync; the host tensors are this step's own


class CudaGraphRunner:
    """The captured decode graphs of one model runner, and the choice of graph for a step."""

    def __init__(
        self, model: torch.nn.Module, backend: AttentionBackend, buffers: DecodeBuffers, sizes: list[int],
        capture: CaptureFn,
    ) -> None:  # fmt: skip
        self.sizes, self.buffers = sorted(sizes), buffers
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        start = time.perf_counter()
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
            meta = buffers.metadata(size)  # kept alive by the closure (a plan's buffers hang off it)
            self._replays[size] = capture(lambda size=size, meta=meta: self._forward(model, backend, meta, size))
        logger.info("CUDA graphs of decode steps captured in %.1f s for batch sizes %s",
                    time.perf_counter() - start, ", ".join(map(str, self.sizes)))  # fmt: skip

    def _forward(self, model: torch.nn.Module, backend: AttentionBackend, meta: AttentionMetadata, size: int):
        """What a graph records: prepare (per-step state from the device tensors) + forward -> [size, H]."""
        with set_forward_context(meta):
            backend.prepare(meta)
            return model(self.buffers.input_ids[:size], meta.positions)

    def size_for(self, batch: StepBatch) -> Optional[int]:
        """The captured size a step replays at: the smallest >= its requests when every request has
        one query token; None (run it eagerly) for a step with prompt tokens or past the largest."""
        n = len(batch.query_lens)
        if n > self.sizes[-1] or max(batch.query_lens) != 1:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def run(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """hidden [n, H] of the step's n requests through its graph, or None when size_for is None.
        A view of the graph's output: read it before the next replay."""
        size = self.size_for(batch)
        if size is None:
            return None
        self.buffers.fill(batch.input_ids, batch.seq_lens, batch.block_tables, size)
        return self._replays[size]()[: len(batch.query_lens)]


def cuda_graph_capture(device: torch.device) -> CaptureFn:
    """Capture on a GPU, as PyTorch's docs prescribe: each function warmed up on a side stream
    (kernels compiled and workspaces made outside the capture), then recorded into a CUDAGraph; all
    graphs share one memory pool (replays never overlap: one step at a time)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


def eager_capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The CPU stand-in for cuda_graph_capture (tests): records fn by running it once, refusing the
    ops a capture cannot hold (they read values on the host); a replay runs fn again over the same
    persistent buffers and writes into the captured output, as a graph replay does."""
    with _NoHostSync():
        out = fn()

    def replay() -> torch.Tensor:
        return out.copy_(fn())

    return replay


class _NoHostSync(TorchDispatchMode):
    """Raises on ops that read a tensor's values on the host or size a result by them: on a GPU they
    sync with the host, which a CUDA graph capture cannot contain."""

    _SYNCING = {
        torch.ops.aten._local_scalar_dense.default,  # .item(), int(t), bool(t)
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
        torch.ops.aten.repeat_interleave.Tensor,
    }
    _INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        by_mask = func in self._INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in self._SYNCING or by_mask:
            raise RuntimeError(f"{func} inside a CUDA graph capture: it reads tensor values on the host")
        return func(*args, **(kwargs or {}))
