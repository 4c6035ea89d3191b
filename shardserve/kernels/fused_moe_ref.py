"""Torch mixtures of experts over stacked expert weights: the yardsticks for kernels/fused_moe.py
and the CPU path.

Weights of the E experts this rank holds (all of them, TP-sliced, or whole ones under EP):

    w13  [E, 2I, H]   rows [gate | up] of each expert
    w2   [E, H, I]

Routing arrives as topk_ids [T, k] (this rank's expert index, or -1 for an expert another rank
holds: that pair contributes nothing here) and topk_weights [T, k]. Token t's output is

    sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x_t) * up_e x_t),   e = topk_ids[t, j]

- `fused_moe_ref`: one loop over experts; obviously right, for tests only.
- `fused_moe_torch`: the same without a Python loop over experts: the (token, expert) pairs are
  sorted by expert and laid out as one padded [E, C, H] batch (C = the busiest expert's count),
  so two bmm calls do every expert at once. Memory grows with E x C, fine for the CPU sizes it
  serves; the GPU uses the Triton grouped GEMM, which pads each group only to BLOCK_M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The per-expert loop (transformers' DeepseekV3Experts, plus -1 ids skipped)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, slot = torch.where(topk_ids == e)
        if token_idx.numel() == 0:
            continue
        h = silu_and_mul(F.linear(x[token_idx], w13[e]))
        y = F.linear(h, w2[e]).float() * topk_weights[token_idx, slot, None].float()
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)


def sort_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs flattened (pair p = token * k + slot) and ordered by expert.

    Returns (order [P]: pair ids sorted by expert, stable; sorted_experts [P], with -1 ids
    mapped to num_experts so they sort last; counts [num_experts + 1] per expert, the last
    entry counting the pairs no local expert takes)."""
    flat = topk_ids.reshape(-1).long()
    flat = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, flat[order], counts


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Loop-free grouped computation over padded expert groups (see the module doc)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden = w13.shape[0], x.shape[-1]
    num_pairs = num_tokens * top_k
    order, sorted_experts, counts = sort_pairs_by_expert(topk_ids, num_experts)
    capacity = int(counts[:num_experts].max()) if num_pairs else 0
    if capacity == 0:
        return torch.zeros_like(x)
    # Rank of each sorted pair inside its expert's group.
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=x.device) - group_start[sorted_experts]
    local = sorted_experts < num_experts
    # [E, C] pair ids, padded with num_pairs (a zero row of the gathered input).
    slots = torch.full((num_experts, capacity), num_pairs, dtype=torch.long, device=x.device)
    slots[sorted_experts[local], rank[local]] = order[local]
    tokens = torch.cat([torch.arange(num_pairs, device=x.device) // top_k,
                        torch.tensor([num_tokens], device=x.device)])
    x_ext = torch.cat([x, x.new_zeros(1, hidden)])
    grouped = x_ext[tokens[slots]]                                     # [E, C, H]
    h = silu_and_mul(torch.bmm(grouped, w13.transpose(1, 2)))          # [E, C, I]
    y = torch.bmm(h, w2.transpose(1, 2))                               # [E, C, H]
    per_pair = torch.zeros(num_pairs + 1, hidden, dtype=torch.float32, device=x.device)
    per_pair[slots.reshape(-1)] = y.reshape(-1, hidden).float()
    per_pair = per_pair[:num_pairs].view(num_tokens, top_k, hidden)
    # Pairs another rank owns were never written: their rows are still zero.
    return (per_pair * topk_weights.float().unsqueeze(-1)).sum(1).to(x.dtype)
