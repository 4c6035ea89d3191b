"""The vocabulary-parallel embedding lookup (kernels/vocab_embedding.py) against its torch
reference: rows a rank holds are copied exactly, every other id gives zeros, at odd widths,
with ids at both ends of the shard and outside it, a table that is a strided view, and the
output poisoned first (through the kernel's own allocation: rows it skipped would be garbage).
CPU: Triton's interpreter; GPU: the same cases compiled."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.vocab_embedding import vocab_embedding, vocab_embedding_ref  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,vocab_start", [(576, 0), (4100, 64), (5000, 4096)])
def test_lookup_matches_reference(dtype, dim, vocab_start):
    gen = torch.Generator().manual_seed(dim)
    rows = 37
    table = torch.randn(rows, dim + 3, generator=gen).to(dtype)[:, :dim]  # strided rows
    ids = torch.tensor([vocab_start, vocab_start + rows - 1, vocab_start - 1, vocab_start + rows,
                        0, vocab_start + 5, 10**6])
    ids = torch.cat([ids, torch.randint(0, vocab_start + 2 * rows, (20,), generator=gen)])
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    # Poison what the allocator will hand out next, so a row the kernel skips is not zero.
    torch.full((len(ids) * dim * 4,), float("nan"), dtype=dtype, device=DEVICE)
    got = vocab_embedding(ids.to(DEVICE), table.to(DEVICE), vocab_start).cpu()
    want = vocab_embedding_ref(ids, table, vocab_start)
    assert got.shape == (len(ids), dim) and got.dtype == dtype
    assert torch.equal(got, want)
    inside = (ids >= vocab_start) & (ids < vocab_start + rows)
    assert inside.any() and (~inside).any()
    assert (got[~inside] == 0).all()


def test_batch_shape_is_kept():
    table = torch.randn(8, 16)
    ids = torch.tensor([[1, 9], [3, 4]])
    got = vocab_embedding(ids.to(DEVICE), table.to(DEVICE), 2).cpu()
    assert got.shape == (2, 2, 16)
    assert torch.equal(got, vocab_embedding_ref(ids, table, 2))
