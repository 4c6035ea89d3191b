"""Random paged-attention batches for the kernel tests, built so that mistakes show:

- physical blocks are a random permutation, so a kernel that ignores the block table reads
  the wrong keys;
- every cache slot no request owns holds NaN, and block-table padding points at a block of NaN,
  so reading a key past seq_len (or through an unused table entry) poisons the output;
- the queries are a strided view of a wider [tokens, q|k|v] tensor, as the model passes them;
- the output is filled with NaN before the kernel runs, so rows it never writes fail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shardserve.forward_context import AttentionMetadata
from shardserve.kernels.paged_attention_ref import paged_attention_ref, store_kv_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.6's interpreter rounds float32 -> fp8 wrongly where rounding up crosses a power of
# two (7.87 -> 4, 125.2 -> 64 in e4m3); compiled kernels use the GPU's conversion. Tests of
# kernels that write fp8 run on the GPU only (reading fp8 is exact in the interpreter too).
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]  # --kv-cache-dtype fp8_e4m3 / fp8_e5m2
FP8_IDS = ["e4m3", "e5m2"]
FP8_STORE_NEEDS_GPU = "Triton's interpreter rounds float32 -> fp8 wrongly (kernel_cases.py)"
# ‖out - ref‖ / ‖ref‖ against a float64 reference, whole batch and per token.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@dataclass
class PagedBatch:
    query: torch.Tensor          # [T, H, D], strided view
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    metadata: AttentionMetadata  # slot_mapping = the slots of this step's tokens
    scale: float


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_batch(specs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_size: int,
               block_size: int, dtype: torch.dtype, seed: int, device: str = DEVICE,
               extra_table_cols: int = 2, kv_dtype: torch.dtype | None = None) -> PagedBatch:
    """specs: (num_cached_tokens, q_len) per request; seq_len = their sum. kv_dtype: the
    cache's element type (fp8 caches hold the keys and values rounded by store_kv_ref)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in specs]
    q_lens = [q for _, q in specs]
    blocks_per_req = [cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    poison_block = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen).tolist()
    max_blocks = max(blocks_per_req + [1]) + extra_table_cols
    tables = torch.full((len(specs), max_blocks), poison_block, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_req):
        tables[i, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n

    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.full(shape, float("nan"), dtype=kv_dtype or dtype)
    v_cache = torch.full(shape, float("nan"), dtype=kv_dtype or dtype)
    slots_all, slots_new = [], []
    for i, (cached, q) in enumerate(specs):
        for p in range(cached + q):
            slot = int(tables[i, p // block_size]) * block_size + p % block_size
            slots_all.append(slot)
            if p >= cached:
                slots_new.append(slot)
    n = len(slots_all)
    keys = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    values = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    store_kv_ref(keys, values, k_cache, v_cache, torch.tensor(slots_all, dtype=torch.int64))

    num_tokens = sum(q_lens)
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots_new, dtype=torch.int64, device=device),
        max_query_len=max(q_lens, default=0), max_seq_len=max(seq_lens, default=0),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    qkv = qkv.to(device)
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_size)
    return PagedBatch(query, k_cache.to(device), v_cache.to(device), md, head_size ** -0.5)


def reference(batch: PagedBatch) -> torch.Tensor:
    """float64 reference, on the batch's device (float64 on an H200 is fast), returned on the
    CPU. An fp8 cache's values are exact in float64, so the reference sees what was stored."""
    md = batch.metadata
    return paged_attention_ref(batch.query.double(), batch.k_cache.double(),
                               batch.v_cache.double(), md.block_tables,
                               md.query_start_loc_cpu, md.seq_lens_cpu, batch.scale).cpu()


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                              rows: list[int] | None = None) -> None:
    """Every element written and finite; relative error under the dtype's tolerance over the
    whole batch and (3x looser) for each token."""
    out = out.cpu().double()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    assert not torch.isnan(out).any(), (
        f"unwritten or NaN rows: {torch.isnan(out).flatten(1).any(1).nonzero().flatten().tolist()}")
    tol = TOLERANCE[dtype]
    err = (out - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    per_token = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    worst = int(per_token.argmax())
    assert per_token[worst] < 3 * tol, f"token {worst}: relative error {per_token[worst]:.2e}"
