"""Triton kernel: RMSNorm with the residual add fused in (one read of x and residual, one write
of each output, instead of torch's add, square, mean, rsqrt, multiply, cast and multiply passes).

Reference: `shardserve.layers.layernorm.RMSNorm` (forward(x) and forward(x, residual)), i.e.
transformers' residual add and LlamaRMSNorm, whose rounding points it keeps step for step:

    s = x + residual          rounded to the input dtype; stored as the next residual
    v = mean(float32(s)^2)    float32; the mean as torch takes it on CUDA: sum * float32(1/n)
    y = s * rsqrt(v + eps)    float32, then rounded to the input dtype
    out = weight * y          rounded to the output dtype

so half-precision results agree with transformers on the GPU to the last bit except where the
float32 sum of squares, reduced in another order, lands on the other side of a rounding
boundary.

One program normalizes one row of `hidden` elements held in one BLOCK (next power of two).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, hidden,
                     inv_hidden, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) * inv_hidden
    y = (xf * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _inv(n: int) -> float:
    """float32(1 / n), the factor torch's CUDA mean multiplies the sum by. Dividing by n
    instead gives a variance one float32 ulp off in 8% (n = 576) to 33% (n = 1536) of rows
    when n is not a power of two."""
    return float(np.float32(1.0) / np.float32(n))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Like RMSNorm.forward: x [..., hidden] -> y, or with residual -> (y, x + residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    num_rows = x2.shape[0]
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        assert r2.stride(-1) == 1
        residual_out = torch.empty_like(x2)
    else:
        r2 = residual_out = x2  # unused
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            out, residual_out, x2, r2, weight, hidden, _inv(hidden), eps,
            x2.stride(0), r2.stride(0), out.stride(0), residual_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16), **pdl_launch(x.device))
    out = out.view(x.shape)
    if residual is None:
        return out
    return out, residual_out.view(x.shape)
