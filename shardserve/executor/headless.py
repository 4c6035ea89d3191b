"""A headless node: the worker ranks of node R > 0 of a multi-node world, no engine.

    node 0:  shardserve serve   --nnodes 2 --node-rank 0 --master-addr A -tp 8 ...  (engine)
    node 1:  shardserve worker  --nnodes 2 --node-rank 1 --master-addr A -tp 8

It starts this node's ranks (node_rank * n .. node_rank * n + n - 1, with n = world / nnodes),
which connect to node 0 over TCP (master_port + 1 .. + 4), check in, receive node 0's engine
settings (so model and cache flags need not be repeated here, though -tp/-pp/--nnodes must
match) and serve steps until node 0 says stop or falls silent for heartbeat_timeout_s. The
launcher exits with 0 when all its ranks did (node 0 stopped cleanly), and otherwise non-zero
after stopping the rest (a rank failed, or node 0's engine failed or went away), so a supervisor
(Kubernetes, a LeaderWorkerSet) restarts the group. It also listens to node 0's
heartbeats: a rank that cannot leave by itself (stopped, frozen) is killed once node 0 has been
silent past heartbeat_timeout_s and the rank's tear-down time, as is one that ignores a stop.
"""

from __future__ import annotations

import logging
import signal
import time
from multiprocessing.connection import wait

import zmq

from shardserve.config import EngineConfig
from shardserve.cpus import threads_per_process
from shardserve.errors import InvalidRequestError
from shardserve.executor.liveness import BEAT_INTERVAL_S, EngineBeats, describe_exit, report_gone
from shardserve.executor.wire import Endpoints, WireCodec
from shardserve.executor.worker_proc import (EXIT_ENGINE_FAILED, TEARDOWN_TIMEOUT_S, WorkerSpec,
                                             start_worker_processes)

logger = logging.getLogger(__name__)

# How long a rank told to go (or whose node 0 went silent) may take to leave before it is
# killed: its tear-down is bounded by TEARDOWN_TIMEOUT_S.
LEAVE_GRACE_S = TEARDOWN_TIMEOUT_S + 2.0


def run_headless(config: EngineConfig) -> int:
    """Run this node's worker ranks until they exit; returns the process exit code."""
    pc = config.parallel_config
    if not all(isinstance(size, int) for size in (pc.tensor_parallel_size,
                                                  pc.pipeline_parallel_size)):
        raise InvalidRequestError("`shardserve worker` needs the -tp and -pp node 0 runs "
                                  "with as numbers (it has no model to plan from).",
                                  "tensor_parallel_size")
    pc.resolve()
    if pc.nnodes < 2 or pc.node_rank == 0:
        raise InvalidRequestError(
            "`shardserve worker` runs the ranks of nodes 1.. of a multi-node world; pass "
            "--nnodes N (N > 1) and --node-rank R (R > 0), or set LWS_GROUP_SIZE and "
            "LWS_WORKER_INDEX.", "node_rank")
    endpoints = Endpoints.tcp(pc.master_addr, pc.master_port)
    num_threads = threads_per_process(pc.num_local_ranks)
    level = logging.getLogger("shardserve").getEffectiveLevel()
    specs = [WorkerSpec(rank=rank, local_rank=rank % pc.num_local_ranks, endpoints=endpoints,
                        parallel_config=pc, config=None, watch_parent=True,
                        num_threads=num_threads, log_level=level)
             for rank in pc.node_ranks(pc.node_rank)]
    # The engine settings (and the model's config class) arrive with "go"; preload the part
    # of transformers every config needs.
    procs = start_worker_processes(specs, daemon=False,
                                   preload=["transformers.configuration_utils"])
    # Printed, not logged: at the default log level a headless node would otherwise say
    # nothing at all while it waits (up to rendezvous_timeout_s) for node 0.
    print(f"shardserve: node {pc.node_rank} of {pc.nnodes}, headless: started ranks "
          f"{list(pc.node_ranks(pc.node_rank))}; waiting for node 0's engine at "
          f"{pc.master_addr}:{pc.master_port} (up to {pc.rendezvous_timeout_s:g} s)", flush=True)

    stopping: list[int] = []
    kill_at: list[float] = []  # when the ranks still here are killed (they were told to go)

    def on_signal(signum, _frame) -> None:
        if not stopping:
            # Node 0 would otherwise find out only by this node's silence, a heartbeat
            # timeout later (a SIGKILLed launcher's ranks report themselves as they leave).
            report_gone(reports, codec, specs[0].rank, f"left: node {pc.node_rank}'s launcher "
                        f"got {signal.Signals(signum).name}")
        stopping.append(signum)
        kill_at.append(time.monotonic() + LEAVE_GRACE_S)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()

    context = zmq.Context()
    engine = EngineBeats(context, endpoints.beats_out)
    # A rank of ours that dies, or a signal that stops this node, is reported to node 0 at once
    # (liveness.report_gone), which would otherwise find it only by its silence.
    reports = context.socket(zmq.PUSH)
    reports.setsockopt(zmq.LINGER, 0)
    reports.connect(endpoints.beats_in)
    codec = WireCodec()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    rank_of = {proc.pid: spec.rank for proc, spec in zip(procs, specs)}
    # None until node 0's first beat (it may start later; the ranks' rendezvous timeout
    # covers that).
    last_beat: float | None = None
    # A rank leaves by itself once node 0 has been silent for heartbeat_timeout_s (this node's
    # flag; node 0's governs the ranks); one still here well after that is stopped or frozen.
    silence_limit = pc.heartbeat_timeout_s + LEAVE_GRACE_S
    try:
        running = list(procs)
        while running:
            for sentinel in wait([p.sentinel for p in running], BEAT_INTERVAL_S):
                proc = next(p for p in running if p.sentinel == sentinel)
                proc.join()
                running.remove(proc)
                # A rank stopped by a failed engine is not the cause: node 0 knows, and the
                # other ranks were told to go too.
                if proc.exitcode not in (0, EXIT_ENGINE_FAILED) and not stopping:
                    logger.error("%s exited with %s; stopping this node's other ranks",
                                 proc.name, proc.exitcode)
                    if not kill_at:  # the first to go; the others are stopped by us
                        report_gone(reports, codec, rank_of[proc.pid],
                                    f"died: {describe_exit(proc.exitcode)} (reported by node "
                                    f"{pc.node_rank}'s launcher)")
                    kill_at.append(time.monotonic() + LEAVE_GRACE_S)
                    for other in running:
                        other.terminate()
            if engine.heard():
                last_beat = time.monotonic()
            silent = None if last_beat is None else time.monotonic() - last_beat
            if running and silent is not None and silent > silence_limit and 0.0 not in kill_at:
                logger.error("Node 0's engine has been silent for %.0f s but %s did not leave "
                             "(stopped or frozen?); killing it", silent,
                             ", ".join(p.name for p in running))
                kill_at.append(0.0)
            if running and kill_at and time.monotonic() > min(kill_at):
                for proc in running:
                    proc.kill()  # also ends a stopped process, which SIGTERM does not
    finally:
        engine.close()
        reports.close()
        context.term()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    if stopping:
        return 128 + stopping[0]
    return max((abs(p.exitcode or 0) for p in procs), default=0) and 1

