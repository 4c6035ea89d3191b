"""Which experts each token goes to, and with what weight: DeepSeek's and Qwen-MoE's gates.

    router_logits [T, E] (float32) --score--> scores [T, E] --choose--> topk_ids [T, k]
                                                                        topk_weights [T, k]

Scoring: "softmax" (DeepSeek-V2, Qwen-MoE) or "sigmoid" (DeepSeek-V3). Choosing:

    greedy                 top-k of the scores
    group_limited_greedy   (V2) experts form n_group groups; a group scores as its best expert;
                           only the topk_group best groups compete for the top-k
    noaux_tc               (V3) the scores plus e_score_correction_bias choose: a group scores
                           as the sum of its two best biased experts, topk_group groups compete;
                           the weights are the unbiased scores of the chosen experts

Then optionally renormalised to sum to 1 (norm_topk_prob) and multiplied by
routed_scaling_factor. Everything here runs in float32 on [T, E] tensors with no host sync, so
it is CUDA-graph safe. The arithmetic follows transformers' DeepseekV2TopkRouter and
DeepseekV3TopkRouter op for op; DeepSeek gate fields those routers ignore but DeepSeek's own code
honours (V2's norm_topk_prob, scoring_func) are refused (`_check_deepseek_gate`). Qwen2/Qwen3-MoE's
routers are softmax + greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shardserve.errors import UnsupportedModelError

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RoutingConfig:
    """The gate of one MoE layer."""

    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    num_expert_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring_func not in SCORING_FUNCS:
            raise UnsupportedModelError(f"MoE scoring_func {self.scoring_func!r} is not "
                                        f"supported; supported: {', '.join(SCORING_FUNCS)}.")
        if self.topk_method not in TOPK_METHODS:
            raise UnsupportedModelError(f"MoE topk_method {self.topk_method!r} is not "
                                        f"supported; supported: {', '.join(TOPK_METHODS)}.")
        if self.topk_method != "greedy" and self.num_experts % self.num_expert_group:
            raise UnsupportedModelError(f"{self.num_experts} experts do not split into "
                                        f"n_group={self.num_expert_group} groups.")
        if self.topk_method == "noaux_tc" and self.num_experts // self.num_expert_group < 2:
            # A group scores as the sum of its two best experts: it needs two.
            raise UnsupportedModelError(
                f"noaux_tc routing scores each group by its two best experts, but n_group="
                f"{self.num_expert_group} leaves {self.num_experts // self.num_expert_group} "
                f"expert a group ({self.num_experts} experts); use fewer groups.")
        if self.topk_method != "greedy" and not 1 <= self.topk_group <= self.num_expert_group:
            raise UnsupportedModelError(f"topk_group={self.topk_group} must be between 1 and "
                                        f"n_group={self.num_expert_group}.")
        reachable = (self.num_experts if self.topk_method == "greedy" else
                     self.topk_group * (self.num_experts // self.num_expert_group))
        if not 1 <= self.top_k <= reachable:
            raise UnsupportedModelError(
                f"num_experts_per_tok={self.top_k} experts cannot be chosen from the {reachable} "
                f"that topk_group={self.topk_group} of n_group={self.num_expert_group} groups "
                f"({self.num_experts} experts) leave.")

    @classmethod
    def from_deepseek_config(cls, config: Any, v3: bool) -> "RoutingConfig":
        """V2 configs: softmax gate, greedy or group_limited_greedy. V3: sigmoid + noaux_tc
        (transformers' V3 router always routes by groups, whatever topk_method says)."""
        _check_deepseek_gate(config, v3)
        return cls(
            num_experts=int(config.n_routed_experts),
            top_k=int(config.num_experts_per_tok),
            scoring_func="sigmoid" if v3 else "softmax",
            topk_method="noaux_tc" if v3 else (getattr(config, "topk_method", None) or "greedy"),
            num_expert_group=int(getattr(config, "n_group", None) or 1),
            topk_group=int(getattr(config, "topk_group", None) or 1),
            renormalize=v3 and bool(getattr(config, "norm_topk_prob", False)),
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
        )


    @classmethod
    def from_qwen_moe_config(cls, config: Any) -> "RoutingConfig":
        """Qwen2-MoE / Qwen3-MoE: softmax over all experts, the top-k kept, renormalised when
        norm_topk_prob (transformers' Qwen2MoeTopKRouter / Qwen3MoeTopKRouter)."""
        return cls(num_experts=int(config.num_experts), top_k=int(config.num_experts_per_tok),
                   renormalize=bool(getattr(config, "norm_topk_prob", False)))


def _check_deepseek_gate(config: Any, v3: bool) -> None:
    """Refuse gate settings transformers' DeepSeek routers ignore (or fail on) where DeepSeek's
    own modeling code does something else: no one reference says what such a model computes.
    transformers' V2 router is softmax + greedy / group_limited_greedy, never renormalised;
    its V3 router is sigmoid + noaux_tc, whatever scoring_func and topk_method say."""
    arch = "DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"
    scoring = getattr(config, "scoring_func", None)
    expected = "sigmoid" if v3 else "softmax"
    if scoring not in (None, expected):
        # DeepSeek's code raises NotImplementedError; transformers scores with `expected`.
        raise UnsupportedModelError(
            f"{arch} with scoring_func={scoring!r} is not supported: its router scores experts "
            f"with {expected} (transformers ignores the field, DeepSeek's code refuses it). Set "
            f"scoring_func to {expected!r} in config.json if the model was trained that way.")
    if v3:
        return
    topk_method = getattr(config, "topk_method", None) or "greedy"
    if topk_method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(
            f"DeepseekV2ForCausalLM with topk_method={topk_method!r} is not supported (its "
            "router has greedy and group_limited_greedy; transformers' fails on anything else). "
            "A noaux_tc model with e_score_correction_bias is DeepseekV3ForCausalLM.")
    if getattr(config, "norm_topk_prob", False) and int(config.num_experts_per_tok) > 1:
        # DeepSeek's V2 code renormalises (and then skips routed_scaling_factor), vLLM
        # renormalises and scales, transformers does neither: three different models.
        raise UnsupportedModelError(
            "DeepseekV2ForCausalLM with norm_topk_prob=true is not supported: transformers' "
            "DeepSeek-V2 ignores it while DeepSeek's own code renormalises the top-k weights, so "
            "the two compute different models (every released DeepSeek-V2 sets it false).")


def select_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                   correction_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k] int64)."""
    logits = router_logits.float()
    if cfg.scoring_func == "softmax":
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    else:
        scores = logits.sigmoid()
    if cfg.topk_method == "greedy":
        topk_weights, topk_ids = torch.topk(scores, k=cfg.top_k, dim=-1, sorted=False)
    elif cfg.topk_method == "group_limited_greedy":
        group_scores = _grouped(scores, cfg).max(dim=-1).values
        masked = scores.masked_fill(~_group_mask(group_scores, scores, cfg), 0.0)
        topk_weights, topk_ids = torch.topk(masked, k=cfg.top_k, dim=-1, sorted=False)
    else:  # noaux_tc
        biased = scores if correction_bias is None else scores + correction_bias.float()
        group_scores = _grouped(biased, cfg).topk(2, dim=-1)[0].sum(dim=-1)
        biased = biased.masked_fill(~_group_mask(group_scores, scores, cfg), float("-inf"))
        topk_ids = torch.topk(biased, k=cfg.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
    if cfg.renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * cfg.routed_scaling_factor
    return topk_weights, topk_ids


def _grouped(scores: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """[T, E] -> [T, n_group, E / n_group]."""
    return scores.view(-1, cfg.num_expert_group, cfg.num_experts // cfg.num_expert_group)


def _group_mask(group_scores: torch.Tensor, scores: torch.Tensor,
                cfg: RoutingConfig) -> torch.Tensor:
    """[T, E] bool: the experts of each token's topk_group best groups."""
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    per_group = cfg.num_experts // cfg.num_expert_group
    return (group_mask.unsqueeze(-1).expand(-1, cfg.num_expert_group, per_group)
            .reshape(scores.shape[0], cfg.num_experts).bool())
