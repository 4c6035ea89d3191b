"""The checkpoint load loop every model shares: Hugging Face tensor names -> our parameters.

Two kinds of our parameters gather several checkpoint tensors:

    fused projections   q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj (one GEMM each);
                        a model passes its own `stacked` map (DeepSeek fuses gate/up only)
    stacked experts     mlp.experts.{e}.{gate,up,down}_proj.weight, or a whole
                        mlp.experts.{gate_up,down}_proj, -> FusedMoE's w13_weight / w2_weight

Such a parameter counts as loaded once every part of it reached this rank: a fused one every
shard, an expert stack every local expert's (or the stacked tensor). The model loader names
the parameters left unloaded.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable

from torch import nn

from shardserve.layers.weight_utils import LoadedWeight, default_weight_loader
from shardserve.models.pipeline import tied_head_weight_name

logger = logging.getLogger(__name__)

# checkpoint name part -> (our fused parameter, shard id)
Stacked = dict[str, tuple[str, Any]]

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# Any tensor of one expert (its weights, an FP8 checkpoint's weight_scale_inv).
_EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.")
_EXPERT_SHARD = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"),
                 "down_proj": ("w2_weight", "w2"), "gate_up_proj": ("w13_weight", "w13")}


def route_weight(name: str, stacked: Stacked) -> tuple[str, tuple]:
    """Checkpoint name -> (our parameter, extra weight_loader args): (shard, expert id) for an
    expert's tensor, (shard, None) for a stacked one, (shard id,) for a fused projection's part,
    () for a tensor loaded whole."""
    m = _EXPERT.match(name)
    if m:
        param, shard = _EXPERT_SHARD[m.group(3)]
        return f"{m.group(1)}.{param}", (shard, int(m.group(2)))
    m = _STACKED_EXPERTS.match(name)
    if m:
        param, shard = _EXPERT_SHARD[m.group(2)]
        return f"{m.group(1)}.{param}", (shard, None)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in stacked:
            fused, shard_id = stacked[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), (shard_id,)
    return name, ()


def owns_expert_weight(model: nn.Module) -> Callable[[str], bool] | None:
    """A checkpoint-name filter that drops the per-expert tensors of experts another
    expert-parallel rank holds (None: this rank holds every expert). Streamed formats skip such
    tensors unread anyway (FusedMoE.weight_loader); GGUF stores experts stacked, and with this
    filter dequantizes only this rank's (loader/gguf.py)."""
    from shardserve.layers.moe import FusedMoE

    split = {name: m for name, m in model.named_modules()
             if isinstance(m, FusedMoE) and m.num_local_experts < m.num_experts}
    if not split:
        return None

    def owns(name: str) -> bool:
        m = _EXPERT_TENSOR.match(name)
        moe = split.get(m.group(1)) if m else None
        return moe is None or moe.is_local_expert(int(m.group(2)))
    return owns


def is_complete(model: nn.Module, param_name: str, seen: set[tuple], stacked: Stacked) -> bool:
    """Whether a parameter gathered from several tensors got every part of it."""
    owner, leaf = param_name.rsplit(".", 1)
    if leaf in ("w13_weight", "w2_weight"):
        shards = ("w2",) if leaf == "w2_weight" else ("w1", "w3")
        if ("w2" if leaf == "w2_weight" else "w13", None) in seen:
            return True
        moe = model.get_submodule(owner)
        experts = range(moe.expert_start, moe.expert_start + moe.num_local_experts)
        return seen >= {(s, e) for s in shards for e in experts}
    fused = owner.rsplit(".", 1)[-1]
    return seen >= {(sid,) for f, sid in stacked.values() if f == fused}


def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, LoadedWeight]],
                            stacked: Stacked) -> set[str]:
    """Load HF-named checkpoint tensors (tensors or lazy slices) into `model` (which has
    `stage` and `tie_word_embeddings`); returns the names of the parameters that received all
    their data. Each parameter's weight_loader reads only this rank's slice."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    parts_seen: dict[str, set[tuple]] = {}
    unexpected: list[str] = []
    for name, weight in weights:
        if "rotary_emb." in name:
            continue  # HF buffers; we compute RoPE ourselves
        if not model.stage.owns_weight(name, model.tie_word_embeddings):
            continue  # another pipeline stage's
        # A tied head is the embedding's table, loaded under its own name.
        name = tied_head_weight_name(name, model.stage, model.tie_word_embeddings)
        if name is None:
            continue
        param_name, args = route_weight(name, stacked)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, weight, *args)
        if args:
            parts_seen.setdefault(param_name, set()).add(args)
        else:
            loaded.add(param_name)
    loaded.update(name for name, seen in parts_seen.items()
                  if is_complete(model, name, seen, stacked))
    if unexpected:
        logger.warning("Ignored %d checkpoint tensors the model has no parameter for: %s",
                       len(unexpected), ", ".join(unexpected[:10]))
    return loaded
