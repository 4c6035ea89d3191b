"""FusedMoE: the routed experts of one mixture-of-experts layer, split over the TP group.

Two ways to split E experts of intermediate size I over n ranks (n = the TP group's size):

    TP (default)                          EP (--enable-expert-parallel)
    every rank: all E experts,            rank r: experts [r*E/n, (r+1)*E/n), whole
      each sliced to I/n                    (E not a multiple of n: the first E % n ranks
                                            hold one more, as vLLM splits them)
    w13 [E, 2I/n, H]  rows [gate_r|up_r]  w13 [E/n, 2I, H]
    w2  [E, H, I/n]                       w2  [E/n, H, I]

Either way each rank's output is a partial sum over the same tokens, combined by one all-reduce:
the hidden states entering the layer are already whole on every rank of the TP group (attention's
o_proj all-reduced them), so dispatch costs nothing - an EP rank routes every token and keeps the
(token, expert) pairs whose expert it holds - and the combine is the all-reduce TP needs anyway,
which the model shares with the shared experts (reduce_results=False). EP keeps whole experts
(larger, more efficient GEMMs; no I/n divisibility needed) at the price of load imbalance
between ranks; which is faster is measured (benchmarks/deepseek_v2_lite.py --mode ep-vs-tp).

Weights load per expert from checkpoints that store experts.{e}.{gate,up,down}_proj.weight
(DeepSeek's and what transformers writes) or stacked experts.gate_up_proj / experts.down_proj;
each rank reads only its experts and its slice (see `weight_loader`).

Compute: the Triton grouped GEMM (kernels/fused_moe.py) on CUDA; elsewhere the loop-free torch
path (kernels/fused_moe_ref.fused_moe_torch).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_ep_group, get_tp_group
from shardserve.errors import UnsupportedModelError
from shardserve.kernels.fused_moe_ref import fused_moe_torch
from shardserve.layers.linear import divide
from shardserve.layers.moe_routing import RoutingConfig, select_experts
from shardserve.layers.weight_utils import (LoadedWeight, check_full_size, copy_weight,
                                            materialize, narrow_weight, set_weight_attrs)

logger = logging.getLogger(__name__)

# Checkpoint shard names: w1 = gate_proj, w3 = up_proj (both into w13), w2 = down_proj;
# "w13" is a stacked [E, 2I, H] gate_up_proj, loaded for every local expert at once.
EXPERT_SHARD_IDS = ("w1", "w3", "w2", "w13")


def local_experts(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """(first expert, number of experts) of one expert-parallel rank: contiguous blocks of
    E // n, one more on each of the first E % n ranks (vLLM's split)."""
    base, extra = divmod(num_experts, ep_size)
    return ep_rank * base + min(ep_rank, extra), base + (ep_rank < extra)


class FusedMoE(nn.Module):
    """forward(hidden [T, H], router_logits [T, E], correction_bias) -> [T, H]: this rank's
    partial sum of the routed experts (whole when reduce_results, or with one rank)."""

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingConfig,
                 params_dtype: torch.dtype | None = None, reduce_results: bool = False) -> None:
        super().__init__()
        self.routing = routing
        self.num_experts = routing.num_experts
        self.hidden_size = hidden_size
        self.reduce_results = reduce_results
        ep = get_ep_group()
        self.ep_size, self.ep_rank = ep.world_size, ep.rank_in_group
        if self.ep_size > 1:
            if self.num_experts < self.ep_size:
                raise UnsupportedModelError(
                    f"{self.num_experts} experts cannot be spread over {self.ep_size} "
                    "expert-parallel ranks (each holds at least one); drop "
                    "--enable-expert-parallel or use a smaller tensor parallel size.")
            # Experts whole: no slicing of the intermediate dim.
            self.moe_tp_size, self.moe_tp_rank = 1, 0
        else:
            tp = get_tp_group()
            self.moe_tp_size, self.moe_tp_rank = tp.world_size, tp.rank_in_group
        self.expert_start, self.num_local_experts = local_experts(
            self.num_experts, self.ep_size, self.ep_rank)
        self.intermediate_size = intermediate_size
        self.intermediate_per_rank = divide(intermediate_size, self.moe_tp_size,
                                            "moe_intermediate_size")
        dtype = params_dtype or torch.get_default_dtype()
        i, e = self.intermediate_per_rank, self.num_local_experts
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype),
                                      requires_grad=False)
        for param in (self.w13_weight, self.w2_weight):
            set_weight_attrs(param, {"weight_loader": self.weight_loader})
        # global expert id -> index among this rank's experts, -1 for another rank's.
        expert_map = torch.full((self.num_experts,), -1, dtype=torch.long)
        expert_map[self.expert_start:self.expert_start + e] = torch.arange(e)
        self.register_buffer("expert_map", expert_map, persistent=False)

    # ---- loading ---------------------------------------------------------------------------

    def is_local_expert(self, expert_id: int) -> bool:
        return self.expert_start <= expert_id < self.expert_start + self.num_local_experts

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight, shard_id: str,
                      expert_id: int | None = None) -> None:
        """Copy this rank's part of one checkpoint tensor.

        Per expert (expert_id given): w1/w3 [I, H] -> gate/up rows of w13[local e] (this TP
        rank's I/n rows), w2 [H, I] -> w2[local e] (its I/n columns); another rank's expert is
        skipped unread. Stacked (expert_id None): w13 [E, 2I, H] or w2 [E, H, I]."""
        if shard_id not in EXPERT_SHARD_IDS:
            raise ValueError(f"Expert shard_id must be one of {EXPERT_SHARD_IDS}, "
                             f"got {shard_id!r}.")
        if expert_id is None:
            self._load_stacked(param, loaded_weight, shard_id)
            return
        if not self.is_local_expert(expert_id):
            return
        dst = param.data[expert_id - self.expert_start]
        i, start = self.intermediate_per_rank, self.moe_tp_rank * self.intermediate_per_rank
        check_full_size(loaded_weight, 1 if shard_id == "w2" else 0, self.intermediate_size)
        if shard_id == "w2":
            copy_weight(dst, narrow_weight(loaded_weight, 1, start, i), "w2_weight")
        else:
            offset = 0 if shard_id == "w1" else i
            copy_weight(dst.narrow(0, offset, i), narrow_weight(loaded_weight, 0, start, i),
                        "w13_weight")

    def _load_stacked(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: str) -> None:
        check_full_size(loaded_weight, 0, self.num_experts)
        check_full_size(loaded_weight, 2 if shard_id == "w2" else 1,
                        self.intermediate_size * (1 if shard_id == "w2" else 2))
        local = materialize(narrow_weight(loaded_weight, 0, self.expert_start,
                                          self.num_local_experts))
        i, start = self.intermediate_per_rank, self.moe_tp_rank * self.intermediate_per_rank
        if shard_id == "w2":
            copy_weight(param.data, local.narrow(2, start, i), "w2_weight")
            return
        full = self.intermediate_size
        copy_weight(param.data.narrow(1, 0, i), local.narrow(1, start, i), "w13_weight")
        copy_weight(param.data.narrow(1, i, i), local.narrow(1, full + start, i), "w13_weight")

    # ---- compute ---------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.routing, correction_bias)
        if self.ep_size > 1:
            topk_ids = self.expert_map[topk_ids]
        out = self._experts(hidden_states, topk_weights, topk_ids)
        if self.reduce_results:
            out = get_tp_group().all_reduce(out)
        return out

    def _experts(self, x: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and _triton_fused_moe() is not None:
            return _triton_fused_moe()(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return fused_moe_torch(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return (f"experts={self.num_local_experts}/{self.num_experts} (from "
                f"{self.expert_start}), top_k={self.routing.top_k}, "
                f"intermediate={self.intermediate_per_rank}/{self.intermediate_size}, "
                f"ep_size={self.ep_size}, tp_size={self.moe_tp_size}")


_TRITON_MOE: list = []


def _triton_fused_moe():
    """kernels.fused_moe.fused_moe, imported on first CUDA use (CPU installs never import
    Triton); None, with one warning, where Triton is missing."""
    if not _TRITON_MOE:
        try:
            from shardserve.kernels.fused_moe import fused_moe
        except ImportError as e:  # pragma: no cover - a CUDA machine without triton
            logger.warning("Triton unavailable (%s): MoE runs the torch path", e)
            fused_moe = None
        _TRITON_MOE.append(fused_moe)
    return _TRITON_MOE[0]
