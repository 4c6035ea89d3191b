"""What node 0 checks and logs before it starts any rank (executor/multiproc_executor.py): the
pipeline partition with each stage's estimated cost and memory, and the ports a multi-node world
listens on. A bad partition or a busy port is one error naming the flag, before any process
exists."""

from __future__ import annotations

import logging
import socket

from shardserve import errors
from shardserve.config import EngineConfig

logger = logging.getLogger(__name__)


def log_pipeline_stages(config: EngineConfig) -> None:
    """Check the stage partition before any process starts, and log it with each stage's
    estimated cost and memory (every rank computes the same one when it builds its stage)."""
    from shardserve.planner.stages import describe_stages, engine_stage_layers

    pc, mc = config.parallel_config, config.model_config
    try:
        bounds = engine_stage_layers(mc.hf_config, pc.pipeline_parallel_size,
                                     pc.pp_layer_partition)
    except ValueError as exc:
        raise errors.InvalidRequestError(str(exc), "pp_layer_partition") from None
    elem = mc.torch_dtype.itemsize
    lines = describe_stages(mc.hf_config, bounds, pc.tensor_parallel_size, elem,
                            pc.enable_expert_parallel, mc.quantization == "fp8")
    logger.info("Pipeline partition (%s) over %d stages x tp %d:\n  %s",
                f"--pp-layer-partition {pc.pp_layer_partition}" if pc.pp_layer_partition
                else "balanced on estimated compute + memory", pc.pipeline_parallel_size,
                pc.tensor_parallel_size, "\n  ".join(lines))


def check_master_ports(master_port: int) -> None:
    """Node 0 listens on master_port (torch.distributed's store, which rank 0 opens well into
    start-up) and the four ports after it (this executor's sockets). One already taken showed
    as a ZMQ traceback, or as torch's EADDRINUSE only once the ranks had started; name the
    flag instead, before anything starts."""
    busy = []
    for port in range(master_port, master_port + 5):
        with socket.socket() as probe:
            # As ZMQ and torch's store do: a port left in TIME_WAIT by an earlier run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError:
                busy.append(port)
    if busy:
        raise errors.InvalidRequestError(
            f"--master-port {master_port}: port(s) {busy} on this node are already in use (node "
            f"0 listens on master_port .. master_port + 4); stop what holds them or pick another "
            "--master-port (the same on every node).", "master_port")
