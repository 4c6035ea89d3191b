"""store_kv (Triton) against store_kv_ref: fresh random tokens at odd sizes, padding slots (-1)
skipped, strided key/value views, and every other cache slot left untouched.

CPU: runs through Triton's interpreter (float32, tiny). GPU: the same cases compiled plus
bfloat16/float16 and a large batch (marked gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.paged_attention_ref import store_kv_ref  # noqa: E402
from shardserve.kernels.store_kv import store_kv  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402


def _check(num_tokens: int, num_kv_heads: int, head_size: int, block_size: int,
           num_blocks: int, dtype: torch.dtype, seed: int, num_padding: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    # A wider [tokens, q|k|v] tensor, as the attention layer hands over its k/v views.
    kv = num_kv_heads * head_size
    qkv = torch.randn(num_tokens, 3 * kv, generator=gen).to(dtype).to(DEVICE)
    key = qkv[:, kv:2 * kv].view(num_tokens, num_kv_heads, head_size)
    value = qkv[:, 2 * kv:].view(num_tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if num_padding:
        slots[torch.randperm(num_tokens, generator=gen)[:num_padding]] = -1
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    # Random (not zero) prior contents: a write to the wrong slot or a skipped write shows.
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    store_kv_ref(key, value, k_ref, v_ref, slots)
    # A copy is exact: compare bit for bit.
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("num_kv_heads,head_size", [(1, 64), (2, 128), (3, 80), (8, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_matches_reference(num_kv_heads, head_size, block_size):
    _check(num_tokens=37, num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size,
           num_blocks=7, dtype=torch.float32, seed=num_kv_heads * 100 + block_size)


def test_store_kv_skips_padding_slots():
    _check(num_tokens=29, num_kv_heads=2, head_size=64, block_size=16, num_blocks=5,
           dtype=torch.float32, seed=3, num_padding=9)


def test_store_kv_empty_batch():
    _check(num_tokens=0, num_kv_heads=2, head_size=64, block_size=16, num_blocks=2,
           dtype=torch.float32, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_size,block_size", [(8, 128, 16), (2, 64, 32),
                                                               (4, 256, 16)])
def test_store_kv_half_precision_large(dtype, num_kv_heads, head_size, block_size):
    _check(num_tokens=4099, num_kv_heads=num_kv_heads, head_size=head_size,
           block_size=block_size, num_blocks=613, dtype=dtype, seed=11, num_padding=37)
