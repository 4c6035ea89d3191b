"""MoE routing against transformers' DeepSeek routers, and FusedMoE's weight loading from both
checkpoint layouts (one tensor per expert, or transformers' stacked gate_up_proj/down_proj)."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from shardserve.kernels.fused_moe_ref import fused_moe_ref
from shardserve.layers.moe import FusedMoE
from shardserve.layers.moe_routing import RoutingConfig, select_experts

HIDDEN, EXPERTS = 32, 16


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, k] routing -> dense [T, E] weights (order-free comparison)."""
    return torch.zeros(ids.shape[0], EXPERTS).scatter_(1, ids.long(), weights.float())


@pytest.mark.parametrize("v3,overrides", [
    (False, dict(topk_method="greedy", num_experts_per_tok=4, routed_scaling_factor=1.0)),
    (False, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                 num_experts_per_tok=3, routed_scaling_factor=16.0)),
    (True, dict(n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=True,
                routed_scaling_factor=2.5)),
    (True, dict(n_group=8, topk_group=3, num_experts_per_tok=2, norm_topk_prob=False,
                routed_scaling_factor=1.0)),
])
def test_routing_matches_transformers(v3: bool, overrides: dict) -> None:
    cls = DeepseekV3Config if v3 else DeepseekV2Config
    config = cls(hidden_size=HIDDEN, n_routed_experts=EXPERTS, **overrides)
    router = (DeepseekV3TopkRouter if v3 else DeepseekV2TopkRouter)(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN, generator=gen))
        if v3:
            router.e_score_correction_bias.copy_(torch.randn(EXPERTS, generator=gen) * 0.3)
    x = torch.randn(50, HIDDEN, generator=gen)
    _, ref_weights, ref_ids = router(x)
    cfg = RoutingConfig.from_deepseek_config(config, v3)
    logits = torch.nn.functional.linear(x, router.weight)
    weights, ids = select_experts(logits, cfg, router.e_score_correction_bias if v3 else None)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(_by_expert(weights, ids), _by_expert(ref_weights, ref_ids))


@pytest.mark.parametrize("v3,overrides,match", [
    (True, dict(n_group=16, topk_group=2, num_experts_per_tok=2), "two best experts"),
    (True, dict(n_group=4, topk_group=5, num_experts_per_tok=2), "topk_group=5"),
    (True, dict(n_group=4, topk_group=1, num_experts_per_tok=6), "cannot be chosen from the 4"),
    # Gate fields transformers ignores (or fails on) where DeepSeek's own code differs.
    (True, dict(scoring_func="softmax"), "DeepseekV3ForCausalLM with scoring_func='softmax'"),
    (False, dict(scoring_func="sigmoid"), "DeepseekV2ForCausalLM with scoring_func='sigmoid'"),
    (False, dict(topk_method="noaux_tc", n_group=2, topk_group=1), "topk_method='noaux_tc'"),
    (False, dict(norm_topk_prob=True, num_experts_per_tok=2), "norm_topk_prob=true"),
])
def test_routing_configs_transformers_cannot_run_are_refused(v3: bool, overrides: dict,
                                                             match: str) -> None:
    """Configs whose routing fails inside transformers' forward (a top-2 of one expert, more
    experts than the chosen groups hold), or that transformers' router would silently route
    unlike DeepSeek's code, are refused when the config is read, by name."""
    from shardserve.errors import UnsupportedModelError
    from shardserve.models.registry import check_architecture
    cls = DeepseekV3Config if v3 else DeepseekV2Config
    config = cls(hidden_size=HIDDEN, n_routed_experts=EXPERTS,
                 architectures=[f"DeepseekV{3 if v3 else 2}ForCausalLM"], **overrides)
    with pytest.raises(UnsupportedModelError, match=match):
        RoutingConfig.from_deepseek_config(config, v3)
    with pytest.raises(UnsupportedModelError, match=match):
        check_architecture(config)  # before any worker starts


def test_expert_weights_load_per_expert_and_stacked() -> None:
    gen = torch.Generator().manual_seed(1)
    inter = 8
    gate = torch.randn(EXPERTS, inter, HIDDEN, generator=gen)
    up = torch.randn(EXPERTS, inter, HIDDEN, generator=gen)
    down = torch.randn(EXPERTS, HIDDEN, inter, generator=gen)
    routing = RoutingConfig(num_experts=EXPERTS, top_k=2)
    per_expert, stacked = (FusedMoE(HIDDEN, inter, routing, torch.float32) for _ in range(2))
    for e in range(EXPERTS):
        per_expert.weight_loader(per_expert.w13_weight, gate[e], "w1", e)
        per_expert.weight_loader(per_expert.w13_weight, up[e], "w3", e)
        per_expert.weight_loader(per_expert.w2_weight, down[e], "w2", e)
    stacked.weight_loader(stacked.w13_weight, torch.cat([gate, up], dim=1), "w13")
    stacked.weight_loader(stacked.w2_weight, down, "w2")
    assert torch.equal(per_expert.w13_weight, stacked.w13_weight)
    assert torch.equal(per_expert.w2_weight, stacked.w2_weight)
    # And the layer computes the reference MoE of those weights.
    x = torch.randn(9, HIDDEN, generator=gen)
    logits = torch.randn(9, EXPERTS, generator=gen)
    weights, ids = select_experts(logits, routing)
    torch.testing.assert_close(stacked(x, logits),
                               fused_moe_ref(x, stacked.w13_weight, stacked.w2_weight, weights, ids))


@pytest.mark.parametrize("num_experts,ep_size,counts", [
    (8, 2, [4, 4]), (7, 2, [4, 3]), (6, 4, [2, 2, 1, 1]), (60, 8, [8, 8, 8, 8, 7, 7, 7, 7])])
def test_expert_parallel_ranks_split_the_experts_as_vllm(num_experts: int, ep_size: int,
                                                         counts: list[int]) -> None:
    """Contiguous blocks covering every expert once; where E does not divide (Qwen1.5-MoE's 60
    over 8 GPUs), the first E % n ranks hold one more, as vLLM places them."""
    from shardserve.layers.moe import local_experts

    ranges = [local_experts(num_experts, ep_size, r) for r in range(ep_size)]
    assert [n for _, n in ranges] == counts
    assert [e for start, n in ranges for e in range(start, start + n)] == list(range(num_experts))
