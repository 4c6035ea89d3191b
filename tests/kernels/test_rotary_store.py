"""rotary_store_kv_ (one launch: RoPE of q and k in place, then k and v into the paged cache)
against the two kernels it replaces (rotary_embedding_ then store_kv: bit for bit in every
dtype) and against their torch references (RotaryEmbedding.forward_native + store_kv_ref), at
odd sizes: 7 tokens, GQA 6 query heads over 2 KV heads (and MQA at head 80), head_size 64 and
128, partial rotary, neox and GPT-J styles, padding slots (-1). The cache starts as NaN: slots
no token owns must stay NaN, written ones must hold no NaN; v must stay as it was.

CPU: Triton's interpreter, where the torch reference matches bit for bit too, except bfloat16:
the interpreter's float32 -> bfloat16 conversion truncates (the GPU rounds to nearest even; see
test_bf16_rounding.py), the same way in both kernel paths, so bfloat16 is compared with the two
kernels only. GPU: bit for bit against the two kernels, within a last-bit rounding against torch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.forward_context import set_forward_context  # noqa: E402
from shardserve.kernels.paged_attention_ref import store_kv_ref  # noqa: E402
from shardserve.kernels.rotary import rotary_embedding_  # noqa: E402
from shardserve.kernels.rotary_store import rotary_store_kv_  # noqa: E402
from shardserve.kernels.store_kv import store_kv  # noqa: E402
from shardserve.layers.attention import Attention  # noqa: E402
from shardserve.layers.rotary import get_rope  # noqa: E402
from shardserve.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.kernels.kernel_cases import (  # noqa: E402
    DEVICE, FP8_DTYPES, FP8_IDS, FP8_STORE_NEEDS_GPU, INTERPRET, make_batch)

MAX_POS = 4096
INT_OF = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_heads, num_kv_heads, head_size, rotary_dim, neox)
SHAPES = [(6, 2, 64, 64, True), (6, 2, 128, 128, False), (6, 2, 128, 64, True),
          (6, 2, 64, 32, False), (3, 1, 80, 80, True)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal that also matches NaN with NaN (the poisoned cache) bit for bit."""
    ints = INT_OF[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


class Case:
    """A fused [T, q | k | v] tensor (q, k, v are views of it, as the model has them), cos/sin
    positions, slots with padding rows, and a NaN-filled paged cache."""

    def __init__(self, num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int,
                 rotary_dim: int, neox: bool, dtype: torch.dtype, seed: int,
                 num_padding: int = 2, block_size: int = 16, num_blocks: int = 5,
                 kv_dtype: torch.dtype | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.device(DEVICE):
            self.rope = get_rope(head_size, rotary_dim, MAX_POS, 500000.0, is_neox_style=neox)
        self.shape = (num_tokens, num_heads, num_kv_heads, head_size)
        q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv = (torch.randn(num_tokens, sum(self.sizes), generator=gen) * 3).to(dtype)
        self.qkv = self.qkv.to(DEVICE)
        self.positions = torch.randint(0, MAX_POS, (num_tokens,), generator=gen).to(DEVICE)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
        slots[torch.randperm(num_tokens, generator=gen)[:num_padding]] = -1
        self.slot_mapping = slots.to(DEVICE)
        cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
        self.k_cache = torch.full(cache_shape, float("nan"), dtype=kv_dtype or dtype,
                                  device=DEVICE)
        self.v_cache = torch.full(cache_shape, float("nan"), dtype=kv_dtype or dtype,
                                  device=DEVICE)

    def tensors(self):
        """Fresh copies: (qkv, q [T, H, D], k, v [T, Hkv, D] views of it, k_cache, v_cache)."""
        num_tokens, num_heads, num_kv_heads, head_size = self.shape
        qkv = self.qkv.clone()
        q, k, v = qkv.split(self.sizes, dim=-1)
        return (qkv, q.view(num_tokens, num_heads, head_size),
                k.view(num_tokens, num_kv_heads, head_size),
                v.view(num_tokens, num_kv_heads, head_size),
                self.k_cache.clone(), self.v_cache.clone())

    def fused(self):
        qkv, q, k, v, k_cache, v_cache = self.tensors()
        rope = self.rope
        rotary_store_kv_(self.positions, q, k, v, k_cache, v_cache, self.slot_mapping,
                         rope.cos_sin_cache, rope.rotary_dim, rope.is_neox_style)
        return qkv, k_cache, v_cache

    def two_kernels(self):
        qkv, q, k, v, k_cache, v_cache = self.tensors()
        rope, num_tokens = self.rope, self.shape[0]
        rotary_embedding_(self.positions, q.view(num_tokens, -1), k.view(num_tokens, -1),
                          rope.cos_sin_cache, rope.head_size, rope.rotary_dim, rope.is_neox_style)
        store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return qkv, k_cache, v_cache

    def torch_reference(self):
        qkv, q, k, v, k_cache, v_cache = self.tensors()
        num_tokens = self.shape[0]
        rot_q, rot_k = self.rope.forward_native(self.positions, q.reshape(num_tokens, -1),
                                                k.reshape(num_tokens, -1))
        store_kv_ref(rot_k.view_as(k), v, k_cache, v_cache, self.slot_mapping)
        q.copy_(rot_q.view_as(q))
        k.copy_(rot_k.view_as(k))
        return qkv, k_cache, v_cache


def _check_poison(case: Case, qkv: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> None:
    """Written slots hold values, every other slot is still NaN, v is unchanged."""
    slots = case.slot_mapping[case.slot_mapping >= 0]
    for cache in (k_cache, v_cache):
        flat = cache.float().view(-1, *cache.shape[2:])  # float: fp8 caches too
        written = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        written[slots] = True
        assert not torch.isnan(flat[written]).any()
        assert torch.isnan(flat[~written]).all()
    v_start = case.sizes[0] + case.sizes[1]
    assert _same_bits(qkv[:, v_start:], case.qkv[:, v_start:])


def _check(case: Case, dtype: torch.dtype) -> None:
    fused = case.fused()
    _check_poison(case, *fused)
    # The same code at the same rounding points as the two kernels: bit for bit.
    for got, want in zip(fused, case.two_kernels()):
        assert _same_bits(got, want)
    if dtype == torch.bfloat16 and INTERPRET:
        return  # the interpreter truncates bfloat16 (module docstring)
    for got, want in zip(fused, case.torch_reference()):
        if INTERPRET:
            assert _same_bits(got, want)  # the interpreter rounds each step like torch
        else:
            # Compiled, the rotation lands a last bit away from torch's in places: in float32
            # a product may fuse into the sum (an FMA; test_norm_act_rope.py), and in half
            # precision the rotary kernel itself disagrees with torch on Triton 3.6 / H200
            # (test_bf16_rounding.py's rotary cases). A few ulps of the inputs' size are
            # allowed (they reach about 15 here, where an ulp is 8 eps); the bit-for-bit check
            # is the one against the two kernels above.
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got, want, rtol=2 * eps, atol=32 * eps, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,rotary_dim,neox", SHAPES)
def test_rotary_store_matches_the_two_kernels_and_torch(num_heads, num_kv_heads, head_size,
                                                        rotary_dim, neox, dtype):
    case = Case(7, num_heads, num_kv_heads, head_size, rotary_dim, neox, dtype,
                seed=head_size + rotary_dim + neox)
    _check(case, dtype)


def test_rotary_store_all_padding_still_rotates():
    """CUDA-graph padding rows (slot -1) are rotated like the rotary kernel rotates them, and
    the cache is not touched."""
    case = Case(3, 6, 2, 64, 64, True, torch.float32, seed=1, num_padding=3)
    qkv, k_cache, v_cache = case.fused()
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()
    assert _same_bits(qkv, case.two_kernels()[0])
    assert not _same_bits(qkv, case.qkv)


def test_rotary_store_int32_positions_and_empty_batch():
    case = Case(7, 6, 2, 64, 64, False, torch.float16, seed=2)
    case.positions = case.positions.to(torch.int32)
    _check(case, torch.float16)
    empty = Case(0, 6, 2, 64, 64, True, torch.float16, seed=3, num_padding=0)
    qkv, k_cache, v_cache = empty.fused()
    assert qkv.numel() == 0 and torch.isnan(k_cache).all()


# ---- the backend and the attention layer ----------------------------------------------------

def test_backend_declines_what_the_kernel_does_not_cover():
    """rotate_and_store returns False and leaves everything as it was for a rotary module it
    does not know or a different head size: the attention layer then rotates and stores."""
    case = Case(7, 6, 2, 64, 64, True, torch.float32, seed=4)
    qkv, q, k, v, k_cache, v_cache = case.tensors()
    with torch.device(DEVICE):
        other_head = get_rope(32, 32, MAX_POS, 10000.0)
    for rotary in (other_head, lambda positions, q, k: (q, k)):
        assert not TritonAttentionBackend.rotate_and_store(
            case.positions, q, k, v, k_cache, v_cache, case.slot_mapping, rotary)
    assert _same_bits(qkv, case.qkv) and torch.isnan(k_cache).all()
    assert TritonAttentionBackend.rotate_and_store(
        case.positions, q, k, v, k_cache, v_cache, case.slot_mapping, case.rope)
    assert _same_bits(k_cache, case.fused()[1])


@pytest.mark.parametrize("specs", [[(5, 1), (0, 1), (17, 1)], [(0, 6), (9, 1), (3, 4)]],
                         ids=["decode_step", "mixed_step"])
def test_attention_layer_fused_equals_rotate_then_store(specs):
    """Attention(q, k, v, positions, rotary) on the Triton backend (one fused launch) gives the
    output, q, k and cache of rotating first and calling Attention(q, k, v) (float16: the
    rotary kernel and the torch rotation agree bit for bit there)."""
    num_heads, num_kv_heads, head_size, dtype = 6, 2, 64, torch.float16
    batch = make_batch(specs, num_heads, num_kv_heads, head_size, 16, dtype, seed=len(specs))
    md = batch.metadata
    positions = torch.cat([torch.arange(c, c + q) for c, q in specs]).to(DEVICE)
    num_tokens = positions.shape[0]
    with torch.device(DEVICE):
        rope = get_rope(head_size, head_size, MAX_POS, 10000.0, is_neox_style=True)
    gen = torch.Generator().manual_seed(7)
    width = (num_heads + 2 * num_kv_heads) * head_size
    qkv0 = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    results = []
    for fused in (True, False):
        layer = Attention(num_heads, head_size, head_size ** -0.5, num_kv_heads, layer_idx=0)
        layer.bind_kv_cache(batch.k_cache.clone(), batch.v_cache.clone(), TritonAttentionBackend)
        qkv = qkv0.clone()
        q, k, v = qkv.split([num_heads * head_size, num_kv_heads * head_size,
                             num_kv_heads * head_size], dim=-1)
        with set_forward_context(md):
            if fused:
                out = layer(q, k, v, positions, rope)
            else:
                q, k = rope(positions, q, k)
                out = layer(q, k, v)
                qkv[:, :q.shape[1]], qkv[:, q.shape[1]:q.shape[1] + k.shape[1]] = q, k
        results.append((out, qkv, layer.k_cache, layer.v_cache))
    for got, want in zip(*results):
        assert _same_bits(got, want)


# ---- GPU only -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_size,rotary_dim,neox",
                         [(32, 8, 128, 128, True), (28, 4, 128, 64, True), (16, 2, 64, 64, False),
                          (8, 1, 256, 256, True)])
def test_gpu_model_sized(num_heads, num_kv_heads, head_size, rotary_dim, neox, dtype):
    case = Case(4099, num_heads, num_kv_heads, head_size, rotary_dim, neox, dtype, seed=5,
                num_padding=37, num_blocks=613)
    _check(case, dtype)


@pytest.mark.skipif(INTERPRET, reason=FP8_STORE_NEEDS_GPU)
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES, ids=FP8_IDS)
def test_rotary_store_into_fp8_cache(kv_dtype):
    """--kv-cache-dtype fp8: the fused kernel rounds the rotated k and v into the one-byte cache
    (saturating past the format's largest value) exactly as rotary then store_kv do, and as the
    torch path does up to a rounding step where the rotation itself differs in a last bit."""
    case = Case(9, 6, 2, 64, 64, True, torch.bfloat16, seed=31, kv_dtype=kv_dtype)
    case.qkv = case.qkv * 200  # values up to ~2000: e4m3 (max 448) saturates
    fused = case.fused()
    _check_poison(case, *fused)
    for got, want in zip(fused, case.two_kernels()):
        assert _same_bits(got, want)
    limit = torch.finfo(kv_dtype).max
    written = fused[1].float()[~torch.isnan(fused[1].float())]
    assert written.abs().max() <= limit
    if kv_dtype == torch.float8_e4m3fn:
        assert (written.abs() == limit).any(), "no value reached the saturation point"
    step = torch.finfo(kv_dtype).eps  # one fp8 rounding step, relative
    for got, want in zip(fused[1:], case.torch_reference()[1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=step, atol=1e-3,
                                   equal_nan=True)
