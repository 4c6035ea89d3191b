"""The fused kernels round where transformers rounds, checked bit for bit in bfloat16 and
float16 against transformers' own code at small odd sizes.

transformers' Llama/Qwen path in half precision (models/llama/modeling_llama.py):

    residual add   h = residual + x                                  rounded
    LlamaRMSNorm   y = w * (float32(h) * rsqrt(mean(h^2) + eps)).to(dtype)   rounded twice
    rotary         q * cos + rotate_half(q) * sin                    each product, then the sum
    LlamaMLP       act_fn(gate) * up                                 silu rounded, then the product

Bit-identity needs the float32 steps to agree too, so the inputs keep them order-free: RMSNorm
rows are small integers times a power of two, whose squares sum exactly in float32 in any order
(the kernel's tree reduction and torch's loop then agree), and the mean is taken as torch takes
it on CUDA, sum * float32(1/n) (`_rms_norm_like_llama`; on the GPU transformers' LlamaRMSNorm
itself is the reference). Rotary products of two half-precision values are exact in float32, so
only the rounding points matter.

On the CPU the kernels run in Triton's interpreter, whose float32 -> bfloat16 conversion
truncates where the GPU rounds to nearest even; `rne_bfloat16` makes it round like the GPU for
these tests, so the bf16 cases check rounding points on the CPU too (without it about half of
all conversions would land an ulp off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRMSNorm, apply_rotary_pos_emb)

from shardserve.kernels.rms_norm import rms_norm  # noqa: E402
from shardserve.kernels.rotary import rotary_embedding_  # noqa: E402
from shardserve.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from shardserve.layers.rotary import get_rope  # noqa: E402
from tests.kernels.kernel_cases import DEVICE, INTERPRET  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def rne_bfloat16(monkeypatch):
    """In Triton's interpreter, round float32 -> bfloat16 to nearest even, as the GPU does."""
    if not INTERPRET:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not (hasattr(builder, "cast_impl") and hasattr(interpreter, "TensorHandle")):
        pytest.skip("this Triton's interpreter has no cast_impl to round bfloat16 with")
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(bits.view(np.uint16).reshape(data.shape), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)


def _int_rows(num_tokens, hidden, dtype, gen, shift):
    """Integers in [-40, 40] times 2^-shift: exact in bf16 and fp16, and any float32 sum of
    their squares (< 2^24 at these sizes) is exact."""
    ints = torch.randint(-40, 41, (num_tokens, hidden), generator=gen)
    return (ints.double() * 2.0 ** -shift).to(dtype).to(DEVICE)


def _rms_norm_like_llama(x, weight, eps):
    """LlamaRMSNorm.forward step for step, with mean() written out as torch's CUDA mean
    computes it (sum times float32(1/n)); on the CPU torch divides the sum by n instead."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    inv = torch.tensor(np.float32(1.0) / np.float32(x.shape[-1]), device=x.device)
    variance = h.pow(2).sum(-1, keepdim=True) * inv
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def _hf_rms_norm(weight, eps):
    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(device=DEVICE, dtype=weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 96), (3, 200), (5, 64)])
def test_rms_norm_and_residual_add_round_like_transformers(num_tokens, hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    eps = 1e-5
    weight = (torch.randn(hidden, generator=gen) * 0.5 + 1).to(dtype).to(DEVICE)
    x = _int_rows(num_tokens, hidden, dtype, gen, shift=3)
    residual = _int_rows(num_tokens, hidden, dtype, gen, shift=4)
    hf_norm = _hf_rms_norm(weight, eps)
    with torch.inference_mode():
        # The reference is transformers' order; where the CPU's mean and CUDA's agree (n a
        # power of two) or on the GPU, it is transformers' module itself.
        for rows in (x, residual + x):
            ref = _rms_norm_like_llama(rows, weight, eps)
            if hidden & (hidden - 1) == 0 or DEVICE == "cuda":
                assert torch.equal(ref, hf_norm(rows))
        assert torch.equal(rms_norm(x, weight, eps), _rms_norm_like_llama(x, weight, eps))
        out, new_residual = rms_norm(x, weight, eps, residual)
        hf_sum = residual + x  # transformers: hidden_states = residual + hidden_states (bf16)
        assert torch.equal(new_residual, hf_sum)
        assert torch.equal(out, _rms_norm_like_llama(hf_sum, weight, eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,heads,kv_heads", [(5, 3, 1), (9, 4, 2)])
def test_rotary_rounds_like_transformers(num_tokens, heads, kv_heads, dtype):
    """Neox-style full rotary, exactly as transformers' apply_rotary_pos_emb does it with the
    cos/sin that LlamaRotaryEmbedding hands it (our table, cast to the activation dtype)."""
    head_size = 64
    gen = torch.Generator().manual_seed(num_tokens)
    with torch.device(DEVICE):
        rope = get_rope(head_size, head_size, 4096, 100000.0)
    q_size, kv_size = heads * head_size, kv_heads * head_size
    qkv = (torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 4).to(dtype).to(DEVICE)
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    cos, sin = rope.cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = (torch.cat((t, t), -1).to(dtype)[None] for t in (cos, sin))  # [1, T, D]
    q4 = q.reshape(1, num_tokens, heads, head_size).transpose(1, 2)
    k4 = k.reshape(1, num_tokens, kv_heads, head_size).transpose(1, 2)
    ref_q, ref_k = apply_rotary_pos_emb(q4, k4, cos, sin)
    ref_q = ref_q.transpose(1, 2).reshape(num_tokens, -1)
    ref_k = ref_k.transpose(1, 2).reshape(num_tokens, -1)
    rotary_embedding_(positions, q, k, rope.cos_sin_cache, head_size, head_size, True)
    assert torch.equal(q, ref_q)
    assert torch.equal(k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox,rotary_dim", [(False, 64), (True, 32)])
def test_rotary_variants_round_like_the_torch_layer(neox, rotary_dim, dtype):
    """GPT-J style and partial rotary, which transformers' Llama has no code for: bit-identical
    to the torch layer, which rounds at the same points."""
    head_size, heads, kv_heads, num_tokens = 64, 3, 1, 7
    gen = torch.Generator().manual_seed(rotary_dim)
    with torch.device(DEVICE):
        rope = get_rope(head_size, rotary_dim, 4096, 10000.0, is_neox_style=neox)
    q = (torch.randn(num_tokens, heads * head_size, generator=gen) * 4).to(dtype).to(DEVICE)
    k = (torch.randn(num_tokens, kv_heads * head_size, generator=gen) * 4).to(dtype).to(DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    with torch.device("cpu"):
        cpu_rope = get_rope(head_size, rotary_dim, 4096, 10000.0, is_neox_style=neox)
    # The torch path of the layer (on the GPU the layer itself would call the kernel).
    ref_q, ref_k = cpu_rope(positions.cpu(), q.cpu(), k.cpu())
    rotary_embedding_(positions, q, k, rope.cos_sin_cache, head_size, rotary_dim, neox)
    assert torch.equal(q.cpu(), ref_q)
    assert torch.equal(k.cpu(), ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,d", [(9, 80), (3, 333)])
def test_silu_and_mul_rounds_like_transformers(num_tokens, d, dtype):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(num_tokens, 2 * d, generator=gen) * 3).to(dtype).to(DEVICE)
    gate, up = x[:, :d], x[:, d:]
    ref = F.silu(gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), ACT2FN["silu"]
    out = silu_and_mul(x)
    if DEVICE == "cuda":
        # The same float32 formula as torch's CUDA silu (accurate expf, IEEE division).
        assert torch.equal(out, ref)
        return
    # The interpreter's exp is numpy's and the CPU's silu uses another vectorised exp: the two
    # float32 silu values may differ in the last bit, which in about two elements in ten
    # thousand rounds to the neighbouring half-precision value. A kernel that skipped the
    # rounding of silu before the multiply would differ in a large share of them.
    diff = out != ref
    assert diff.float().mean().item() <= 0.01
    ulp = torch.finfo(dtype).eps
    assert torch.all((out[diff].double() - ref[diff].double()).abs()
                     <= 2 * ulp * ref[diff].double().abs())
