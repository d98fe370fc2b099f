"""Physical KV blocks: reference counts, the prefix-cache index, and the free list.

The free list doubles as the eviction list: a block whose ref count drops to 0 keeps its hash and
stays findable by a prefix lookup until it is handed out again. Blocks are handed out from the head
of the free list (least recently freed first) and returned to its tail.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Set while the block holds a full, hashed block of tokens (cached); cleared on eviction.
    block_hash: Optional[int] = None
    parent_hash: Optional[int] = None
    token_ids: Optional[tuple[int, ...]] = None  # the block's tokens, to guard against hash collisions


def hash_block(parent_hash: Optional[int], token_ids: tuple[int, ...]) -> int:
    """Chained hash: a block's identity depends on every token before it, through its parent."""
    return hash((parent_hash, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt == 0, in eviction order (head first).
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVCacheBlock] = {}  # block hash -> block holding it

    def get_num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_cached_block(
        self, block_hash: int, parent_hash: Optional[int], token_ids: tuple[int, ...]
    ) -> Optional[KVCacheBlock]:
        """The cached block with this content, or None. Compares tokens and parent so that a hash
        collision is a miss, never wrong KV."""
        block = self.cached.get(block_hash)
        if block is None or block.parent_hash != parent_hash or block.token_ids != token_ids:
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on (cache-hit) blocks; a free one leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop n blocks from the head of the free list, evicting their cached content."""
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def cache_full_block(
        self, block: KVCacheBlock, block_hash: int, parent_hash: Optional[int], token_ids: tuple[int, ...]
    ) -> None:
        """Register a block that now holds a full block of tokens. If another block already holds
        the same content, the first stays the canonical one and this block stays uncached."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self.cached[block_hash] = block

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference on each block; blocks reaching 0 join the free list's tail in the
        given order (so callers pass a request's blocks tail-first: its last blocks evict first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed more often than taken"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = block.parent_hash = block.token_ids = None

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks
