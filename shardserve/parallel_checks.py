"""Checks of a parallel layout against the model and the machine, run by
EngineConfig.resolve() before any worker starts: a size that cannot work is one clear error
naming the flag, not a rank failing later."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from shardserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from shardserve.config import EngineConfig
    from shardserve.planner.shape import ModelShape


def check_parallel_layout(config: EngineConfig) -> None:
    """Every check below, once the parallel sizes are ints."""
    check_local_gpus(config)
    shape = _model_shape(config)
    check_tensor_parallel_fits(config, shape)
    check_expert_parallel_fits(config, shape)
    check_pipeline_parallel_fits(config)
    pc = config.parallel_config
    if pc.pp_layer_partition and pc.pipeline_parallel_size == 1:
        raise InvalidRequestError(
            f"pp_layer_partition={pc.pp_layer_partition!r} splits layers between pipeline "
            "stages, but pipeline_parallel_size is 1; drop it or set --pipeline-parallel-size "
            "to its number of stages.", "pp_layer_partition")


def _model_shape(config: EngineConfig) -> ModelShape | None:
    """The planner's view of the model, or None for a config it cannot read (then the layers
    still check TP when they are built, and there is nothing to check EP against)."""
    from shardserve.planner.shape import shape_from_config
    try:
        return shape_from_config(config.model_config.hf_config)
    except Exception:
        return None


def check_local_gpus(config: EngineConfig) -> None:
    """On CUDA each of this node's ranks takes a GPU of its own (cuda:local_rank): too few
    visible is one clear error here, not a worker dying on 'invalid device ordinal'."""
    if config.device_config.device != "cuda":
        return
    import torch
    pc = config.parallel_config
    visible = torch.cuda.device_count()
    if pc.num_local_ranks <= visible:
        return
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    per_node = f" ({pc.world_size} over nnodes={pc.nnodes})" if (pc.nnodes or 1) > 1 else ""
    raise InvalidRequestError(
        f"tensor_parallel_size={pc.tensor_parallel_size} x pipeline_parallel_size="
        f"{pc.pipeline_parallel_size} puts {pc.num_local_ranks} ranks on this node{per_node}, "
        f"one GPU each, but {visible} GPU{'s are' if visible != 1 else ' is'} visible"
        f"{f' (CUDA_VISIBLE_DEVICES={mask})' if mask is not None else ''}. Lower the parallel "
        "sizes, spread the ranks over nodes with --nnodes, or make more GPUs visible.",
        "tensor_parallel_size")


def check_tensor_parallel_fits(config: EngineConfig, shape: ModelShape | None) -> None:
    """Refuse a TP size the model's layers cannot split (heads, KV heads, MLP width) here,
    before any worker starts, naming the sizes that do fit (the planner's rules)."""
    from shardserve.planner.weights import tp_problems

    tp = config.parallel_config.tensor_parallel_size
    ep = config.parallel_config.enable_expert_parallel
    if tp == 1 or shape is None:
        return
    problems = tp_problems(shape, tp, ep)
    if problems:
        fits = [t for t in range(1, 65) if not tp_problems(shape, t, ep)]
        raise InvalidRequestError(
            f"tensor_parallel_size={tp} does not fit this model: {'; '.join(problems)}. "
            f"Sizes that fit: {', '.join(map(str, fits))}.", "tensor_parallel_size")


def check_expert_parallel_fits(config: EngineConfig, shape: ModelShape | None) -> None:
    """Expert parallelism places whole experts on the TP ranks: a model without experts has
    nothing to place. vLLM accepts the flag there and ignores it, so do we, but say so (it
    is often copied from a MoE command line). The same for data parallelism: vLLM's EP
    group is TP x DP ranks, ours one replica's TP ranks (replicas are separate engines), so
    `-dp N --enable-expert-parallel` keeps every expert on every replica."""
    from shardserve.planner.weights import (expert_parallel_layout_note,
                                            expert_parallel_problem)

    pc = config.parallel_config
    if not pc.enable_expert_parallel or shape is None:
        return
    problem = expert_parallel_problem(shape)
    if problem:
        logging.getLogger(__name__).warning("%s", problem)
        return
    note = expert_parallel_layout_note(shape, pc.tensor_parallel_size,
                                       pc.data_parallel_size)
    if note:
        logging.getLogger(__name__).warning("%s", note)


def check_pipeline_parallel_fits(config: EngineConfig) -> None:
    """Each pipeline stage holds at least one layer: refuse more stages than layers here,
    naming the flag (the partition itself is checked before the workers start)."""
    pp = config.parallel_config.pipeline_parallel_size
    num_layers = getattr(config.model_config.hf_config, "num_hidden_layers", None)
    if isinstance(num_layers, int) and pp > num_layers:
        raise InvalidRequestError(
            f"pipeline_parallel_size={pp} exceeds this model's {num_layers} layers (each "
            f"stage needs at least one); use --pipeline-parallel-size {num_layers} or less.",
            "pipeline_parallel_size")
