"""Maps requests to KV-cache blocks and finds prefix-cache hits. Pure Python, no torch.

Prefix caching: each full block of a request's tokens gets a hash chained from its parent's,

    h0 = hash((None, tokens[0:B]))   h1 = hash((h0, tokens[B:2B]))   ...

so one hash names a whole prefix. A new request walks its hashes and reuses the cached blocks
up to the first miss. Only full blocks are cached; the partly filled last block is private.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.engine.block_pool import BlockPool, KVCacheBlock
from shardserve.engine.request import Request


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Python's own hash: fast, and the hashes never leave the engine-core process (the router
    # hashes prompts itself), so they need not agree across processes (hash(None) does not,
    # before Python 3.12). A 64-bit collision needs ~2^32 distinct cached blocks to be likely.
    return hash((parent_hash, token_ids))


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # how many of a request's blocks are hashed
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def _update_block_hashes(self, request: Request) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request: (blocks, number of tokens they hold).

        At least one token is always left to compute, because the model must run on the
        last token to produce the next one. Requests asking for prompt logprobs skip the
        cache: those logprobs need the logits of every prompt position.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup in the hit-rate stats. Counted on admission, not
        in get_computed_blocks: a request that waits for memory is looked up again each step,
        and counting every try would weigh its prompt many times."""
        if self.enable_caching and request.sampling_params.prompt_logprobs is None:
            self.stats.queries += request.num_tokens
            self.stats.hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_new_computed_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Make room for num_new_tokens more tokens of the request (after its computed ones
        and any prefix hit). Returns the newly allocated blocks, or None when the pool cannot
        supply them (then nothing changed)."""
        if not new_computed_blocks:
            # The common decode case: the request's last block still has room.
            held = self.req_to_blocks.get(request.request_id)
            num_total = request.num_computed_tokens + num_new_tokens
            if held is not None and num_total <= len(held) * self.block_size:
                if self.enable_caching:
                    self._cache_full_blocks(request, held, num_total)
                return []
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = -(-num_total // self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(new_computed_blocks))
        # Prefix-hit blocks nobody references sit in the free queue: taking them uses it up too.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_evictable_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        blocks.extend(new_blocks)
        if self.enable_caching:
            # Tokens scheduled now are written to the cache during this step, before any later
            # step can read them, so their full blocks can be offered to other requests already.
            self._cache_full_blocks(request, blocks, num_total)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        rid = request.request_id
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks. The tail goes to the front of the eviction order:
        a prefix's last blocks are the least likely to be shared."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free_blocks(list(reversed(blocks)))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
