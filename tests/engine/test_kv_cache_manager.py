"""KV-cache manager and block pool, pure Python: accounting, prefix hits, eviction order."""

from shardserve.engine.kv_cache_manager import KVCacheManager
from shardserve.engine.request import Request
from shardserve.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), frozenset({0}))


def allocate_prompt(mgr: KVCacheManager, req: Request) -> int:
    hits, num_hit = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, req.num_tokens - num_hit, hits, num_hit) is not None
    mgr.record_prefix_lookup(req, num_hit)  # as the scheduler does on admission
    req.num_computed_tokens = req.num_tokens
    return num_hit


def test_allocation_and_free_return_every_block():
    mgr = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    req = make_request("a", list(range(10)))
    allocate_prompt(mgr, req)
    assert len(mgr.get_block_ids("a")) == 3
    assert mgr.num_free_blocks == 7
    req.append_output_token(99)
    req.append_output_token(98)  # 12 tokens: still 3 blocks
    assert mgr.allocate_slots(req, 2) == []
    req.num_computed_tokens = 12
    req.append_output_token(97)
    assert len(mgr.allocate_slots(req, 1)) == 1
    mgr.free(req)
    assert mgr.num_free_blocks == 10
    assert mgr.usage == 0.0


def test_allocation_fails_cleanly_when_pool_is_short():
    mgr = KVCacheManager(num_blocks=2, block_size=4, enable_caching=True)
    req = make_request("a", list(range(12)))
    assert mgr.allocate_slots(req, 12) is None
    assert mgr.num_free_blocks == 2
    assert mgr.get_block_ids("a") == []


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    mgr = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_request("a", list(range(10)))
    assert allocate_prompt(mgr, a) == 0
    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert allocate_prompt(mgr, b) == 8  # two full blocks shared
    assert mgr.get_block_ids("b")[:2] == mgr.get_block_ids("a")[:2]
    assert mgr.pool.blocks[mgr.get_block_ids("a")[0]].ref_cnt == 2
    # An identical 8-token prompt may reuse only one block: the last token must be computed.
    c = make_request("c", list(range(8)))
    assert allocate_prompt(mgr, c) == 4
    assert mgr.stats.queries == 10 + 11 + 8 and mgr.stats.hits == 12
    for r in (a, b, c):
        mgr.free(r)
    assert mgr.num_free_blocks == 16


def test_different_prefix_does_not_hit():
    mgr = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    allocate_prompt(mgr, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: chained hashes must not match.
    assert allocate_prompt(mgr, make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0


def test_cached_blocks_survive_free_and_are_evicted_lru_tail_first():
    mgr = KVCacheManager(num_blocks=6, block_size=2, enable_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])  # 3 blocks, 2 full (cached)
    allocate_prompt(mgr, a)
    a_blocks = mgr.get_block_ids("a")
    mgr.free(a)
    assert mgr.num_free_blocks == 6
    # Reused after free: a prefix hit on the freed-but-cached blocks.
    a2 = make_request("a2", [1, 2, 3, 4, 7])
    assert allocate_prompt(mgr, a2) == 4
    assert mgr.get_block_ids("a2")[:2] == a_blocks[:2]
    mgr.free(a2)
    # Fill the pool with unrelated work: untouched free blocks go first, then the freed
    # tail (the partial block, then the second full one), the first block last.
    b = make_request("b", [9] * 7)  # 4 blocks
    allocate_prompt(mgr, b)
    assert mgr.pool.get_cached_block(a2.block_hashes[0]) is not None
    c = make_request("c", [8] * 3)  # 2 more blocks: evicts a's cached blocks, tail first
    allocate_prompt(mgr, c)
    assert mgr.pool.get_cached_block(a2.block_hashes[1]) is None
    assert mgr.num_free_blocks == 0


def test_prompt_logprobs_requests_skip_the_cache():
    mgr = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    allocate_prompt(mgr, make_request("a", list(range(9))))
    assert allocate_prompt(mgr, make_request("b", list(range(9)), prompt_logprobs=1)) == 0


def test_hit_on_unreferenced_block_counts_against_free_pool():
    mgr = KVCacheManager(num_blocks=3, block_size=2, enable_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    allocate_prompt(mgr, a)
    mgr.free(a)
    b = make_request("b", [1, 2, 3, 4, 6, 7, 8])  # hits 2 blocks, needs 2 more: only 1 left
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 4
    assert mgr.allocate_slots(b, 3, hits, num_hit) is None
    assert mgr.num_free_blocks == 3
