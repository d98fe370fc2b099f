"""The only owner of block tables. Callers get block ids or None ("does not fit"), nothing else.

Per request, block table = req_to_blocks[request_id]: append-only while the request holds blocks;
block i holds the KV of token positions [i * block_size, (i + 1) * block_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from kvserve.core.block_pool import BlockPool, KVCacheBlock, hash_block
from kvserve.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache
    requests: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of a request already in the index
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.get_num_free_blocks()

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request's full blocks, and how many tokens it covers.

        At least one token is always left to compute, so the step produces logits to sample from.
        Does not take references: pass the blocks to allocate_slots.
        """
        if not self.enable_caching:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        parent = None
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            tokens = tuple(request.all_token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.get_cached_block(block_hash, parent, tokens)
            if block is None:
                break
            hits.append(block)
            parent = block_hash
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
    ) -> Optional[list[int]]:
        """Make room for num_new_tokens more tokens after the request's computed ones (plus the
        cache-hit blocks, which count as computed). Returns the ids of blocks newly appended to the
        request's table (cache hits first), or None if the free list cannot cover it (nothing changes)."""
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        admitting = not blocks
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - len(blocks) - len(new_computed_blocks)
        # Cache hits sitting in the free list are not available to be handed out as new blocks.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.get_num_free_blocks() - num_evictable_hits:
            if admitting:
                del self.req_to_blocks[request.request_id]
            return None

        if admitting and self.enable_caching:
            self.stats.requests += 1
            self.stats.queries += request.num_tokens
            self.stats.hits += len(new_computed_blocks) * self.block_size
        self.pool.touch(new_computed_blocks)
        new_blocks = list(new_computed_blocks) + self.pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return [b.block_id for b in new_blocks]

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so that its shared prefix is evicted last."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while len(hashes) < request.num_tokens // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(request.all_token_ids[i * bs : (i + 1) * bs])))

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Index every block that is full once num_tokens tokens are written (their KV is written
        by the step being scheduled, before any later step can read it)."""
        if not self.enable_caching:
            return
        self._update_block_hashes(request)
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = min(num_tokens // self.block_size, len(request.block_hashes))
        bs = self.block_size
        for i in range(start, end):
            parent = request.block_hashes[i - 1] if i > 0 else None
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.pool.cache_full_block(blocks[i], request.block_hashes[i], parent, tokens)
        self.num_cached_blocks[request.request_id] = max(start, end)
