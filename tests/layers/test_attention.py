"""Attention(q, k, v, positions, rotary) on the torch reference backend (the CPU path) is
exactly the former model-side sequence, rotary(positions, q, k) then Attention(q, k, v): same
output, same cache, bit for bit, with the paged cache and in the profiling run (no cache)."""

from __future__ import annotations

import pytest
import torch

from shardserve.forward_context import AttentionMetadata, set_forward_context
from shardserve.layers.attention import Attention, TorchAttentionBackend
from shardserve.layers.rotary import get_rope

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 32, 4, 9


def _metadata(specs: list[tuple[int, int]]) -> tuple[AttentionMetadata, torch.Tensor]:
    """(num_cached, q_len) per request, blocks handed out in reverse order -> (metadata,
    positions of this step's tokens)."""
    blocks = list(range(NUM_BLOCKS))[::-1]
    tables, slots, positions, starts = [], [], [], [0]
    for cached, q_len in specs:
        n = -(-(cached + q_len) // BLOCK_SIZE)
        table, blocks = blocks[:n], blocks[n:]
        tables.append(table + [0] * (3 - n))
        for p in range(cached, cached + q_len):
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            positions.append(p)
        starts.append(starts[-1] + q_len)
    seq_lens = [c + q for c, q in specs]
    md = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(q for _, q in specs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    return md, torch.tensor(positions)


@pytest.mark.parametrize("neox,rotary_dim", [(True, 32), (False, 32), (True, 16)])
@pytest.mark.parametrize("with_cache", [True, False], ids=["paged", "profiling"])
def test_rotary_passed_in_equals_rotating_first(neox, rotary_dim, with_cache):
    gen = torch.Generator().manual_seed(rotary_dim + neox)
    rope = get_rope(HEAD_SIZE, rotary_dim, 64, 10000.0, is_neox_style=neox)
    md, positions = _metadata([(5, 3), (0, 4), (9, 1)])
    if not with_cache:
        md, positions = None, torch.arange(7)
    num_tokens = positions.shape[0]
    sizes = [NUM_HEADS * HEAD_SIZE, NUM_KV_HEADS * HEAD_SIZE, NUM_KV_HEADS * HEAD_SIZE]
    qkv = torch.randn(num_tokens, sum(sizes), generator=gen)
    # Random cache contents stand for the earlier tokens' keys and values.
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    caches = [torch.randn(cache_shape, generator=gen) for _ in range(2)]
    outs = []
    for rotary_in_layer in (True, False):
        layer = Attention(NUM_HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, NUM_KV_HEADS, layer_idx=0)
        if with_cache:
            layer.bind_kv_cache(caches[0].clone(), caches[1].clone(), TorchAttentionBackend)
        q, k, v = qkv.clone().split(sizes, dim=-1)
        with torch.no_grad(), set_forward_context(md):
            if rotary_in_layer:
                out = layer(q, k, v, positions, rope)
            else:
                q, k = rope(positions, q, k)
                out = layer(q, k, v)
        outs.append((out, layer.k_cache, layer.v_cache))
    (out, k_cache, v_cache), (ref_out, ref_k, ref_v) = outs
    assert torch.equal(out, ref_out)
    if with_cache:
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
        # And RoPE was applied: the stored keys are the rotated ones.
        rot_k = rope(positions, qkv[:, :sizes[0]], qkv[:, sizes[0]:sum(sizes[:2])])[1]
        stored = k_cache.view(-1, NUM_KV_HEADS, HEAD_SIZE)[md.slot_mapping]
        assert torch.equal(stored, rot_k.view_as(stored))
