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
from tests.kernels.kernel_cases import (  # noqa: E402
    DEVICE, FP8_DTYPES, FP8_IDS, FP8_STORE_NEEDS_GPU, INTERPRET)


def _check(num_tokens: int, num_kv_heads: int, head_size: int, block_size: int,
           num_blocks: int, dtype: torch.dtype, seed: int, num_padding: int = 0,
           cache_dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    # A wider [tokens, q|k|v] tensor, as the attention layer hands over its k/v views.
    kv = num_kv_heads * head_size
    qkv = (torch.randn(num_tokens, 3 * kv, generator=gen) * scale).to(dtype).to(DEVICE)
    key = qkv[:, kv:2 * kv].view(num_tokens, num_kv_heads, head_size)
    value = qkv[:, 2 * kv:].view(num_tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    if num_padding:
        slots[torch.randperm(num_tokens, generator=gen)[:num_padding]] = -1
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    # Random (not zero) prior contents: a write to the wrong slot or a skipped write shows.
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype or dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype or dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    store_kv_ref(key, value, k_ref, v_ref, slots)
    # A copy (or the same rounding to fp8) is exact: compare bit for bit.
    assert torch.equal(_bits(k_cache), _bits(k_ref))
    assert torch.equal(_bits(v_cache), _bits(v_ref))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.element_size() == 1 else x




@pytest.mark.skipif(INTERPRET, reason=FP8_STORE_NEEDS_GPU)
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_store_kv_into_fp8_cache(cache_dtype):
    """--kv-cache-dtype fp8: float32 rows rounded into a one-byte cache as torch rounds them,
    values past e4m3's 448 saturated (scale 300 puts many there), padding skipped."""
    _check(num_tokens=23, num_kv_heads=2, head_size=64, block_size=16, num_blocks=4,
           dtype=torch.float32, seed=8, num_padding=3, cache_dtype=cache_dtype, scale=300.0)


def test_to_cache_dtype_saturates():
    from shardserve.kernels.paged_attention_ref import to_cache_dtype
    x = torch.tensor([1e6, -1e6, 0.3, float("nan")], dtype=torch.bfloat16)
    for dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        got = to_cache_dtype(x, dtype).float()
        assert got[:2].tolist() == [limit, -limit]
        assert abs(got[2].item() - 0.3) < 0.3 * torch.finfo(dtype).eps
        assert torch.isnan(got[3])
    assert to_cache_dtype(x, torch.bfloat16) is x


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_store_kv_fp8_large(dtype, cache_dtype):
    _check(num_tokens=4099, num_kv_heads=8, head_size=128, block_size=16, num_blocks=613,
           dtype=dtype, seed=12, num_padding=37, cache_dtype=cache_dtype, scale=100.0)
