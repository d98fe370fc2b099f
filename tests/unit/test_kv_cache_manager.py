"""KV-cache manager and block pool: exact block ids, prefix hits, eviction order. No torch."""
import sys

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def make_request(req_id: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None):
    hits, num_hits = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hits if num_new is None else num_new
    ids = kv.allocate_slots(req, num_new, hits)
    if ids is not None:
        req.num_computed_tokens = num_hits + num_new
    return ids, num_hits


def test_core_does_not_import_torch():
    import kvserve.core.scheduler  # noqa: F401

    assert "torch" not in {m.split(".")[0] for m in sys.modules if m.startswith("kvserve.core")}
    core_modules = [m for name, m in sys.modules.items() if name.startswith("kvserve.core")]
    for module in core_modules:
        assert "torch" not in vars(module), module.__name__


def test_allocation_hands_out_blocks_in_order_and_grows_by_whole_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))  # 10 tokens -> 3 blocks
    ids, hits = admit(kv, a)
    assert (ids, hits) == ([0, 1, 2], 0)
    a.append_output_token_ids([100, 101])  # 12 tokens: still fits in 3 blocks
    assert kv.allocate_slots(a, 2) == []
    a.num_computed_tokens = 12
    a.append_output_token_ids([102])
    assert kv.allocate_slots(a, 1) == [3]
    assert kv.get_block_ids("a") == [0, 1, 2, 3]
    assert kv.pool.get_num_free_blocks() == 4


def test_allocation_that_does_not_fit_returns_none_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)))
    assert admit(kv, a)[0] == [0, 1]
    b = make_request("b", list(range(50, 59)))  # 9 tokens -> 3 blocks, only 1 free
    assert kv.allocate_slots(b, 9) is None
    assert kv.get_block_ids("b") == []
    assert kv.pool.get_num_free_blocks() == 1


def test_prefix_hit_reuses_exact_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prefix = list(range(100, 108))  # two full blocks
    a = make_request("a", prefix + [1, 2, 3])
    assert admit(kv, a) == ([0, 1, 2], 0)
    b = make_request("b", prefix + [7, 8])
    ids, hits = admit(kv, b)
    assert hits == 8 and ids == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    # A prompt that is exactly the cached blocks still computes its last token: only 1 block hits.
    c = make_request("c", prefix)
    ids, hits = admit(kv, c)
    assert hits == 4 and ids == [0, 4]
    assert kv.stats.queries == 11 + 10 + 8 and kv.stats.hits == 8 + 4


def test_different_parent_is_a_miss_even_with_same_block_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    _, hits = admit(kv, make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 9]))
    assert hits == 0


def test_hash_collision_is_a_miss():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    b = make_request("b", [6, 7, 8, 9, 10])
    kv._update_block_hashes(b)
    b.block_hashes[0] = a.block_hashes[0]  # forge a collision: same hash, other tokens
    hits, num = kv.get_computed_blocks(b)
    assert (hits, num) == ([], 0)


def test_freed_blocks_stay_cached_and_evict_lru_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(12)) + [99])  # blocks 0,1,2 full + 3 partial
    assert admit(kv, a)[0] == [0, 1, 2, 3]
    kv.free(a)
    # Free list: untouched 4, 5, then a's blocks tail first: 3, 2, 1, 0.
    assert list(kv.pool.free_queue) == [4, 5, 3, 2, 1, 0]
    # Still a full prefix hit after the free.
    b = make_request("b", list(range(12)) + [50])
    assert admit(kv, b) == ([0, 1, 2, 4], 12)
    kv.free(b)
    assert list(kv.pool.free_queue) == [5, 3, 4, 2, 1, 0]
    # Filling the cache evicts from the head: 5, 3, 4 go before the shared prefix 2, 1, 0.
    c = make_request("c", list(range(200, 212)))
    assert admit(kv, c)[0] == [5, 3, 4]
    assert kv.pool.blocks[2].block_hash is not None
    kv.free(c)
    d = make_request("d", list(range(300, 313)))  # free list is now [2, 1, 0, 4, 3, 5]
    ids, _ = admit(kv, d)
    assert ids == [2, 1, 0, 4]
    assert kv.pool.cached.get(a.block_hashes[2]) is None
    assert kv.pool.blocks[2].block_hash == d.block_hashes[0]


def test_same_content_computed_twice_keeps_first_block_canonical():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    kv_nocache = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=False)
    a, b = make_request("a", [1, 2, 3, 4, 5]), make_request("b", [1, 2, 3, 4, 6])
    # Both allocated without looking up the cache: b's block 0 duplicates a's.
    assert kv.allocate_slots(a, 5) == [0, 1]
    assert kv.allocate_slots(b, 5) == [2, 3]
    assert kv.pool.cached[a.block_hashes[0]].block_id == 0
    assert kv.pool.blocks[2].block_hash is None
    assert kv_nocache.get_computed_blocks(make_request("c", [1, 2, 3, 4, 5])) == ([], 0)


def test_evictable_cache_hits_are_not_counted_as_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(8)) + [1])
    admit(kv, a)  # blocks 0, 1 (cached) + 2
    kv.free(a)
    b = make_request("b", list(range(8)) + list(range(50, 57)))  # 15 tokens: 2 hits + 2 new blocks
    hits, num = kv.get_computed_blocks(b)
    assert num == 8
    assert kv.allocate_slots(b, 7, hits) is None  # 3 free, but 2 of them are the hits themselves
    assert kv.pool.get_num_free_blocks() == 3
