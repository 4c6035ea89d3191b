"""Triton kernel: one tensor-parallel rank's part of a vocabulary-parallel embedding lookup.

Each rank holds rows [vocab_start, vocab_start + rows) of the embedding table
(layers/embedding.py). A token's vector comes from the one rank holding its row; every other
rank contributes zeros, and the all-reduce that follows (fused into the first decoder layer's
RMSNorm, models/pipeline.py) sums them into the whole embedding. In torch that is six kernels
(two compares, an and, a shift, the gather, a masked fill), each a launch of its own in every
decode step's CUDA graph; here it is one:

    out[t] = weight[ids[t] - vocab_start]   if vocab_start <= ids[t] < vocab_start + rows
             0                               otherwise

Reference: `vocab_embedding_ref` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait


@triton.jit
def _vocab_embedding_kernel(out_ptr, ids_ptr, weight_ptr, vocab_start, num_rows, dim,
                            stride_w, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release_and_wait(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    local = tl.load(ids_ptr + token) - vocab_start
    inside = (local >= 0) & (local < num_rows)
    row = tl.where(inside, local, 0)
    width = tl.where(inside, dim, 0)  # columns to read: none for an id another rank holds
    for start in range(0, dim, BLOCK):
        mask = start + cols < dim
        v = tl.load(weight_ptr + row * stride_w + start + cols, mask=start + cols < width,
                    other=0.0)
        tl.store(out_ptr + token * dim + start + cols, v, mask=mask)


def vocab_embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """[*ids.shape, dim] rows of weight (this rank's table, rows [vocab_start, ...) of the
    vocabulary) for the ids it holds, zeros for the others."""
    rows, dim = weight.shape
    assert weight.stride(1) == 1
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), dim, dtype=weight.dtype, device=weight.device)
    if flat.numel():
        block = min(triton.next_power_of_2(dim), 4096)
        _vocab_embedding_kernel[(flat.numel(),)](
            out, flat, weight, vocab_start, rows, dim, weight.stride(0), BLOCK=block,
            num_warps=min(max(block // 512, 1), 8), **pdl_launch(weight.device))
    return out.view(*ids.shape, dim)


def vocab_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
    inside = (ids >= vocab_start) & (ids < vocab_start + weight.shape[0])
    out = torch.nn.functional.embedding((ids - vocab_start) * inside, weight)
    return out.masked_fill(~inside.unsqueeze(-1), 0)
