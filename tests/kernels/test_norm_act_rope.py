"""Fused RMSNorm(+residual), SiLU-and-mul and rotary Triton kernels against the layers they
would replace (shardserve.layers: RMSNorm, SiluAndMul, RotaryEmbedding), on fresh random inputs
at odd sizes with NaN-poisoned outputs where the kernel allocates none itself.

CPU: Triton's interpreter, tiny sizes, float32, float16 and bfloat16 (the interpreter emulates
both). GPU (marked gpu): model-sized rows (hidden 4096, intermediate 14336, 32+8 heads of 128)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.rms_norm import rms_norm  # noqa: E402
from shardserve.kernels.rotary import rotary_embedding_  # noqa: E402
from shardserve.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from shardserve.layers.activation import SiluAndMul  # noqa: E402
from shardserve.layers.layernorm import RMSNorm  # noqa: E402
from shardserve.layers.rotary import get_rope  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402

# Triton 3.x's interpreter converts float32 to bfloat16 by truncation, not round-to-nearest-even
# (about half of all conversions land one ulp off torch's), so bfloat16 runs on the GPU only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)
DTYPES = [torch.float32, torch.float16, BF16]


def _randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _assert_close(out, ref):
    assert not torch.isnan(out).any()
    if out.dtype in (torch.float16, torch.bfloat16):
        # Two roundings of a float32 result may land one half-precision ulp apart.
        torch.testing.assert_close(out, ref, rtol=4e-3, atol=4e-3)
    else:
        torch.testing.assert_close(out, ref)


def _check_rms_norm(num_tokens, hidden, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = RMSNorm(hidden, eps=1e-5, params_dtype=dtype).to(DEVICE)
    layer.weight.data = _randn(hidden, dtype=dtype, gen=gen)
    x = _randn(num_tokens, hidden, dtype=dtype, gen=gen, scale=3.0)
    residual = _randn(num_tokens, hidden, dtype=dtype, gen=gen)
    _assert_close(rms_norm(x, layer.weight, 1e-5), layer(x))
    out, new_residual = rms_norm(x, layer.weight, 1e-5, residual)
    ref_out, ref_residual = layer(x, residual)
    assert torch.equal(new_residual, ref_residual)  # the add rounds exactly like torch's
    _assert_close(out, ref_out)


def _check_silu_and_mul(num_tokens, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(num_tokens, 2 * d, dtype=dtype, gen=gen, scale=2.0)
    _assert_close(silu_and_mul(x), SiluAndMul()(x))


def _check_rotary(num_tokens, heads, kv_heads, head_size, rotary_dim, neox, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.device(DEVICE):
        rope = get_rope(head_size, rotary_dim, 4096, 500000.0, is_neox_style=neox)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    # q and k as views of one fused [T, q | k | v] tensor, as the attention layer has them.
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, gen=gen)
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    exact_q, exact_k = (_exact_rotation(x, positions, rope, head_size, rotary_dim, neox)
                        for x in (q, k))
    v_before = qkv[:, q_size + kv_size:].clone()
    rotary_embedding_(positions, q, k, rope.cos_sin_cache, head_size, rotary_dim, neox)
    # Kernel and layer round where transformers does: each product to the activation dtype,
    # then the sum, so in half precision they agree bit for bit (in float32 the compiler may
    # fuse a product into the sum). Where x1*cos and x2*sin nearly cancel that is several ulps
    # off the exact rotation, so the layer is checked against it loosely (the formula).
    for out, ref, exact in ((q, ref_q, exact_q), (k, ref_k, exact_k)):
        if dtype == torch.float32:
            _assert_close(out, ref)
        else:
            assert torch.equal(out, ref)
        torch.testing.assert_close(ref.double(), exact, rtol=0, atol=8 * _ulp(dtype))
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _exact_rotation(x, positions, rope, head_size, rotary_dim, neox):
    """float64 rotation of x [T, H * head_size] with cos/sin rounded to x's dtype (as both the
    layer and the kernel use them)."""
    t = x.shape[0]
    xd = x.double().view(t, -1, head_size)
    cos, sin = rope.cos_sin_cache[positions.long()].to(x.dtype).double().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot = xd[..., :rotary_dim]
    x1, x2 = (rot.chunk(2, dim=-1) if neox else (rot[..., 0::2], rot[..., 1::2]))
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.cat((o1, o2), -1) if neox else torch.stack((o1, o2), -1).flatten(-2)
    return torch.cat((out, xd[..., rotary_dim:]), -1).reshape(t, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 96), (3, 200)])
def test_rms_norm(num_tokens, hidden, dtype):
    _check_rms_norm(num_tokens, hidden, dtype, seed=hidden)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    _check_silu_and_mul(9, 80, dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox,rotary_dim", [(True, 64), (False, 64), (True, 32)])
def test_rotary(dtype, neox, rotary_dim):
    _check_rotary(5, 4, 2, 64, rotary_dim, neox, dtype, seed=rotary_dim)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sized(dtype):
    _check_rms_norm(4099, 4096, dtype, seed=1)
    _check_rms_norm(33, 8192, dtype, seed=2)
    _check_silu_and_mul(2049, 14336, dtype, seed=3)
    _check_rotary(4099, 32, 8, 128, 128, True, dtype, seed=4)
    _check_rotary(257, 16, 2, 64, 64, False, dtype, seed=5)
