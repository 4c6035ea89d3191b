"""The parallel layout, for the dashboard: TP x PP x DP, and which rank (node, device) holds which
layers. Derived from the config the same way the executor places ranks:

    rank = stage * tp_size + tp_rank          (TP innermost)
    node = rank // ranks_per_node,  device = cuda:(rank % ranks_per_node)
    stage s holds layers engine_stage_layers(...)[s]; stage 0 also the embedding, the last
    stage the final norm and LM head; the driver (sampling) rank is TP rank 0 of the last stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from shardserve.config import EngineConfig

logger = logging.getLogger(__name__)


def parallel_layout(config: EngineConfig, environ: dict[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    pc, mc = config.parallel_config, config.model_config
    tp, pp = int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)
    device = config.device_config.device
    nnodes = int(pc.nnodes or 1)
    per_node = max(1, (tp * pp) // nnodes)
    # This process's CUDA_VISIBLE_DEVICES names the host GPUs of node 0's local ranks (under
    # data parallelism each replica gets its own slice).
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    bounds = _stage_bounds(config, pp)
    num_layers = bounds[-1][1] if bounds else None
    stages = []
    for stage in range(pp):
        ranks = []
        for tp_rank in range(tp):
            rank = stage * tp + tp_rank
            node, local = divmod(rank, per_node)
            host_gpu = visible[local] if node == 0 and local < len(visible) else None
            ranks.append({"rank": rank, "tp_rank": tp_rank, "node": node,
                          "device": f"cuda:{local}" if device == "cuda" else "cpu",
                          "host_gpu": host_gpu, "driver": rank == pc.driver_rank})
        start, end = bounds[stage] if bounds else (None, None)
        stages.append({"stage": stage, "layers": [start, end], "embedding": stage == 0,
                       "lm_head": stage == pp - 1, "ranks": ranks})
    return {"tp": tp, "pp": pp, "dp": int(pc.data_parallel_size), "world_size": tp * pp,
            "nnodes": nnodes, "device": device, "expert_parallel": bool(pc.enable_expert_parallel),
            "num_layers": num_layers, "architecture": mc.architecture, "dtype": mc.dtype,
            "stages": stages}


def _stage_bounds(config: EngineConfig, pp: int) -> list[tuple[int, int]]:
    hf_config = config.model_config.hf_config
    if hf_config is None:
        return []
    from shardserve.planner.stages import engine_stage_layers
    try:
        return engine_stage_layers(hf_config, pp, config.parallel_config.pp_layer_partition)
    except Exception:  # the page still shows the grid, just without layer ranges
        logger.debug("No stage layer ranges for the dashboard", exc_info=True)
        return []
