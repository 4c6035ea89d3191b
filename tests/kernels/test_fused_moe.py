"""The Triton grouped-GEMM MoE and the loop-free torch MoE against the per-expert loop, and the
sort/pad bookkeeping on its own. CPU: Triton's interpreter at tiny sizes (float32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.fused_moe import fused_moe, max_padded_pairs, moe_align_block_size  # noqa: E402
from shardserve.kernels.fused_moe_ref import fused_moe_ref, fused_moe_torch  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402


def _case(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int,
          drop_experts: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    # Distinct experts per token, as top-k gives; skewed so some experts get none.
    scores = torch.rand(num_tokens, num_experts, generator=gen) * torch.linspace(0.2, 1, num_experts)
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=gen)
    if drop_experts:  # EP: experts >= E - drop live on another rank
        ids = torch.where(ids >= num_experts - drop_experts, -1, ids)
        w13, w2 = w13[:num_experts - drop_experts], w2[:num_experts - drop_experts]
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,drop", [
    (1, 8, 2, 0), (13, 8, 3, 0), (40, 6, 2, 0), (21, 8, 2, 3)])
def test_fused_moe_matches_loop(num_tokens: int, num_experts: int, top_k: int, drop: int) -> None:
    x, w13, w2, weights, ids = _case(num_tokens, 24, 20, num_experts, top_k, seed=num_tokens,
                                     drop_experts=drop)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe_torch(x, w13, w2, weights, ids), ref,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("one_hot_limit", [1 << 22, 0], ids=["one_hot", "sort"])
def test_align_pads_each_expert_to_block(one_hot_limit: int) -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, -1], [3, 2]], device=DEVICE)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 4, num_experts=4,
                                                            one_hot_limit=one_hot_limit)
    num_pairs = ids.numel()
    assert sorted_ids.shape[0] == max_padded_pairs(num_pairs, 4, 4)
    # Experts 0, 1, 2, 3 hold 2, 1, 1, 3 pairs -> one block of 4 each; the -1 pair is dropped.
    assert int(num_post) == 16
    assert expert_ids[:4].tolist() == [0, 1, 2, 3]
    blocks = sorted_ids[:16].view(4, 4).tolist()
    pad = num_pairs
    assert blocks == [[1, 4, pad, pad], [3, pad, pad, pad], [7, pad, pad, pad],
                      [0, 2, 6, pad]]
    assert (sorted_ids[16:] == pad).all()
