"""`--tensor-parallel-size auto` (and -pp / -dp auto): the planner picks at serve time.

EngineConfig.resolve() calls `resolve_auto_parallel_on_device`, which counts the visible GPUs
and calls `resolve_auto_parallel`; afterwards the ParallelConfig fields are plain ints again.
Sizes the user gave stay pinned; only the 'auto' ones are searched. On CPU every 'auto' is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from shardserve.config_defaults import (DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE,
                                        default_max_num_batched_tokens, default_max_num_seqs)
from shardserve.errors import CacheTooSmallError
from shardserve.planner.plan import PlanRequest, make_plan

logger = logging.getLogger(__name__)

AUTO = "auto"
_FIELDS = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp",
           "data_parallel_size": "dp"}


def parse_parallel_size(text: str | int) -> int | str:
    """A CLI/env value of -tp/-pp/-dp: a positive int or 'auto'."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == AUTO


def resolve_auto_parallel(engine_config: Any, num_gpus: int, gpu_memory_bytes: int) -> Any:
    """Replace every 'auto' in engine_config.parallel_config with the planner's pick for
    `num_gpus` GPUs of `gpu_memory_bytes` each (0 GPUs: CPU, every 'auto' becomes 1).

    Multi-node (parallel_config.nnodes > 1, when that field exists): num_gpus is per node and
    the pool is nnodes of them. Raises CacheTooSmallError with the planner's diagnosis when no
    layout fits. Returns engine_config, changed in place."""
    pc = engine_config.parallel_config
    autos = [name for name in _FIELDS if _is_auto(getattr(pc, name))]
    if not autos:
        return engine_config
    if num_gpus < 1:
        for name in autos:
            setattr(pc, name, 1)
        return engine_config
    from shardserve.planner.shape import load_model_shape

    mc, cc, sc = engine_config.model_config, engine_config.cache_config, engine_config.scheduler_config
    shape = load_model_shape(mc.hf_config if mc.hf_config is not None else mc.model)
    # Before ParallelConfig.resolve(): nnodes may still be None (then LWS_GROUP_SIZE or 1).
    nnodes = int(getattr(pc, "nnodes", None) or os.environ.get("LWS_GROUP_SIZE") or 1)
    pinned = {short: (None if _is_auto(getattr(pc, name)) else int(getattr(pc, name)))
              for name, short in _FIELDS.items()}
    request = PlanRequest(
        num_gpus=num_gpus * nnodes, gpu_memory_bytes=gpu_memory_bytes, gpus_per_node=num_gpus,
        max_model_len=mc.max_model_len, dtype=mc.dtype,
        gpu_memory_utilization=cc.gpu_memory_utilization, block_size=cc.block_size,
        # EngineConfig.resolve() has set both by now; a config not resolved gets a server's.
        max_num_seqs=sc.max_num_seqs or default_max_num_seqs("server", "cpu"),
        max_num_batched_tokens=(sc.max_num_batched_tokens
                                or default_max_num_batched_tokens("server", "cpu")),
        enforce_eager=bool(getattr(mc, "enforce_eager", False)),
        max_cuda_graph_batch_size=int(getattr(mc, "max_cuda_graph_batch_size",
                                               DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE)),
        mixed_cuda_graphs=bool(getattr(mc, "mixed_cuda_graphs", True)),
        kv_cache_dtype=cc.kv_cache_dtype, quantization=getattr(mc, "quantization", None),
        enable_expert_parallel=bool(getattr(pc, "enable_expert_parallel", False)),
        tensor_parallel_size=pinned["tp"], pipeline_parallel_size=pinned["pp"],
        # DP not asked for stays as given: a pinned 1 means one replica, not "fill the GPUs".
        data_parallel_size=pinned["dp"])
    plan = make_plan(shape, request)
    best = plan.best
    if best is None:
        problems = ("; ".join(f"{p.name}: {p.problems[0]}" for p in plan.layouts[:4])
                    or plan.reason.rstrip("."))  # no layouts: the pinned sizes leave none
        raise CacheTooSmallError(f"No parallel layout of {request.num_gpus} GPUs fits "
                                 f"{shape.name} at max_model_len {plan.limits.max_model_len}: "
                                 f"{problems}.", autos[0])
    chosen = {"tensor_parallel_size": best.tp, "pipeline_parallel_size": best.pp,
              "data_parallel_size": best.dp}
    for name in autos:
        setattr(pc, name, chosen[name])
    logger.info("Parallel layout auto: %s. %s", best.name, plan.reason)
    return engine_config


def detect_gpus() -> tuple[int, int]:
    """(visible CUDA GPUs, memory of the first in bytes); (0, 0) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.device_count(), int(torch.cuda.get_device_properties(0).total_memory)


def resolve_auto_parallel_on_device(engine_config: Any) -> Any:
    """resolve_auto_parallel with the GPUs this process sees (none on device 'cpu')."""
    pc = engine_config.parallel_config
    if not any(_is_auto(getattr(pc, name)) for name in _FIELDS):
        return engine_config
    if engine_config.device_config.device != "cuda":
        return resolve_auto_parallel(engine_config, 0, 0)
    return resolve_auto_parallel(engine_config, *detect_gpus())
