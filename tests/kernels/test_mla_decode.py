"""Absorbed MLA decode: the Triton kernel and the batched torch path against the decompressed
reference (decompress every cached latent through kv_b_proj, then plain attention).

CPU: the kernel runs through Triton's interpreter (float32, tiny shapes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.mla_attention_ref import (mla_absorbed_decode_ref,  # noqa: E402
                                                  mla_decompress_ref, split_kv_b)
from shardserve.kernels.mla_decode import mla_decode  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402

HEADS, NOPE, ROPE, V, LORA, BLOCK = 4, 16, 8, 12, 32, 4


def _case(seq_lens: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // BLOCK) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 2
    # Tables are a random permutation of the blocks; stale rows hold random values.
    perm = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * max_blocks]
    tables = perm.view(len(seq_lens), max_blocks).to(torch.int32)
    cache = torch.randn(num_blocks, BLOCK, LORA + ROPE, generator=gen)
    q_nope = torch.randn(len(seq_lens), HEADS, NOPE, generator=gen)
    q_pe = torch.randn(len(seq_lens), HEADS, ROPE, generator=gen)
    kv_b = torch.randn(HEADS * (NOPE + V), LORA, generator=gen) / LORA ** 0.5
    return [t.to(DEVICE) for t in (cache, tables, q_nope, q_pe, kv_b)]


@pytest.mark.parametrize("seq_lens,num_splits", [([1, 7, 13], None), ([40, 3], 3), ([17], 2),
                                                 ([70, 33], 4)])
def test_absorbed_decode_equals_decompressed(seq_lens: list[int], num_splits: int | None) -> None:
    cache, tables, q_nope, q_pe, kv_b = _case(seq_lens, seed=len(seq_lens) + sum(seq_lens))
    scale = 0.3
    num_reqs = len(seq_lens)
    expected = mla_decompress_ref(q_nope, q_pe, cache, kv_b, tables, list(range(num_reqs + 1)),
                                  seq_lens, scale, V)
    w_uk, w_uv = split_kv_b(kv_b, HEADS, NOPE)
    q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)

    def up(o_lat: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thl,hvl->thv", o_lat, w_uv)

    torch.testing.assert_close(up(mla_absorbed_decode_ref(q_lat, q_pe, cache, tables, seq, scale)),
                               expected, rtol=1e-5, atol=1e-5)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=DEVICE)
    # Partitions of at least 16 keys, so the short sequences here do split.
    o_lat = mla_decode(q_lat, q_pe, cache, qsl, seq, tables, max(seq_lens), scale,
                       num_splits=num_splits, min_partition=16)
    torch.testing.assert_close(up(o_lat), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_requests_without_a_query_are_skipped_and_empty_ones_give_zeros(num_splits: int) -> None:
    """Graph padding: query_start_loc says which requests have a query (request 1: none, its
    row stays untouched); a request with seq_len 0 (request 2) gets zeros, not NaN."""
    cache, tables, q_nope, q_pe, kv_b = _case([5, 9, 0], seed=3)
    w_uk, _ = split_kv_b(kv_b, HEADS, NOPE)
    q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)
    out = torch.full_like(q_lat, float("nan"))
    qsl = torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=DEVICE)
    seq = torch.tensor([5, 9, 0], dtype=torch.int32, device=DEVICE)
    mla_decode(q_lat, q_pe, cache, qsl, seq, tables, 9, 0.3, out, num_splits=num_splits,
               min_partition=16)
    ref = mla_absorbed_decode_ref(q_lat[:1], q_pe[:1], cache, tables[:1], seq[:1], 0.3)
    torch.testing.assert_close(out[:1], ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # row 1 is request 2's: zeros
    assert torch.isnan(out[2]).all()  # no request's row
