"""Triton kernel: SwiGLU's silu(gate) * up over a stacked [gate | up] row, in one pass (torch
runs silu, then the multiply, reading and writing the intermediate in between).

Reference: `shardserve.layers.activation.SiluAndMul`, i.e. transformers' act(gate) * up. As
torch does in half precision, silu is computed in float32 and rounded to the input dtype before
the multiply, which is rounded again. The float32 silu is torch's CUDA formula,
x / (1 + expf(-x)) with the accurate expf (libdevice) and a correctly rounded division, not
Triton's default fast exp2-based exp and approximate division, whose last-bit differences
would now and then round silu to the other neighbouring bf16 value.

Grid: (tokens, ceil(d / BLOCK)).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait

# Triton's interpreter (CPU tests) runs no libdevice calls; its tl.exp is numpy's, accurate too.
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr,
                         LIBDEVICE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release_and_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    if LIBDEVICE:
        exp_neg = libdevice.exp(-gate)
    else:
        exp_neg = tl.exp(-gate)
    act = tl.math.div_rn(gate, 1.0 + exp_neg).to(x_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    assert x2.stride(-1) == 1
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(d), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            out, x2, d, x2.stride(0), out.stride(0), BLOCK=block, LIBDEVICE=_LIBDEVICE,
            num_warps=4, **pdl_launch(x.device))
    return out.view(*x.shape[:-1], d)
