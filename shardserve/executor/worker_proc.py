"""The worker process: one per rank (GPU), on node 0 started by MultiprocExecutor, on other
nodes by `shardserve worker` (executor/headless.py).

    connect ─▶ wait for "ping" ─▶ "hello" ─▶ wait for "go" ─▶ torch.distributed + model
    ─▶ "ready" ─▶ loop: step | call | stop

The wire and its messages are described in executor/wire.py. Every rank runs every step (the
collectives need all of them); only the driver rank answers a step. A rank whose handler
raises reports "err" and waits for the engine to stop it: after a failed collective its
peers' state is unknown, and the engine tears the whole world down.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import zmq

from shardserve.config import EngineConfig, ParallelConfig
from shardserve.errors import ShardserveError
from shardserve.executor.liveness import WorkerHeartbeat, arm_exit_watchdog
from shardserve.executor.wire import Endpoints, WireCodec

logger = logging.getLogger(__name__)

RENDEZVOUS_GRACE_S = 10.0  # see WorkerProc._rendezvous
# Longest a rank's tear-down (leaving torch.distributed, closing sockets) may take before the
# rank exits anyway; under the engine's stop grace, so a stop never has to kill a rank.
TEARDOWN_TIMEOUT_S = 4.0
# A rank's exit code when the engine stopped it because the engine failed (a peer died, the
# server was killed): not a clean end, so another node's launcher exits non-zero and gets
# restarted, but not this rank's fault either (its launcher reports nothing for it).
EXIT_ENGINE_FAILED = 3

# Worker methods the engine may call by name ("call" messages).
RPC_METHODS = frozenset({"determine_num_blocks", "init_kv_cache", "kv_cache_info",
                         "live_request_ids", "sampling_counts", "start_profile", "stop_profile",
                         "prompt_logits"})


@dataclass
class WorkerSpec:
    """What a worker process is started with."""

    rank: int
    local_rank: int
    endpoints: Endpoints
    parallel_config: ParallelConfig  # the launching node's view, checked against node 0's
    config: EngineConfig | None  # node 0's ranks get it whole; other nodes' arrive in "go"
    # Exit when the process that started this rank (engine or node launcher) is gone.
    watch_parent: bool
    num_threads: int
    log_level: int = logging.INFO


def parent_gone(sentinel: int | None) -> bool:
    return sentinel is not None and bool(multiprocessing.connection.wait([sentinel], 0))


def start_worker_processes(specs: list[WorkerSpec], daemon: bool,
                           preload: list[str] | None = None) -> list[Any]:
    """Start one process per spec from a fork server that has imported torch and the model
    code once (a fork per rank instead of a fresh interpreter each; no CUDA context, ZMQ or
    OpenMP threads inherited from this process).

    multiprocessing would re-import the user's __main__ script in each child (and a script
    without an `if __name__ == "__main__":` guard would start another engine there); the
    target lives in shardserve, so __main__ is hidden from the children while they start.
    `preload`: more modules for the fork server to import (the Hugging Face config's class,
    whose transformers import would otherwise cost seconds in every rank).
    """
    import types

    ctx = multiprocessing.get_context("forkserver")
    # Preloading only takes effect when this process starts its fork server (the first time).
    ctx.set_forkserver_preload(["torch", "shardserve.executor.worker_proc",
                                "shardserve.executor.worker", "shardserve.loader.model_loader",
                                *(preload or [])])
    procs = []
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        for spec in specs:
            proc = ctx.Process(target=run_worker, args=(spec,), name=f"shardserve-rank{spec.rank}",
                               daemon=daemon)
            proc.start()
            procs.append(proc)
    finally:
        sys.modules["__main__"] = main
    return procs


def run_worker(spec: WorkerSpec) -> None:
    """Process entry point."""
    # A Ctrl-C or SIGTERM sent to the server's process group must not kill the ranks while the
    # server drains requests: the engine (or the node launcher) owns their shutdown. A group
    # of their own keeps such signals away; a SIGTERM to the rank itself still ends it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # shardserve never uses NVLink multicast, and torch's symmetric-memory rendezvous (the
    # custom all-reduce) would otherwise set it up: off unless the user says otherwise
    # (distributed/custom_all_reduce.py takes its path only with this set to 1).
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    logging.basicConfig(level=spec.log_level, format=f"%(levelname)s (rank {spec.rank} "
                        f"pid={os.getpid()}) %(name)s: %(message)s")
    # kill -USR1 (or the engine, on a step timeout) gets this rank's stacks (executor/stacks.py).
    from shardserve.executor.stacks import enable_stack_dumps
    enable_stack_dumps(spec.endpoints.ipc_directory(), spec.rank)
    import torch
    torch.set_num_threads(spec.num_threads)
    # tqdm's default lock holds a named multiprocessing semaphore; a rank killed at the end of
    # a script that never called LLM.shutdown() leaves it to the resource tracker, which warns
    # of "leaked semaphore objects". No two ranks share a lock anyway: a thread lock will do.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    sys.exit(WorkerProc(spec).run())


def _peer_gone(exc: BaseException) -> bool:
    """A collective that failed because another rank's process went away, as gloo words it
    (torch raises a plain RuntimeError with the transport's message)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("closed by peer", "reset by peer", "remote worker crashing"))


class WorkerProc:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.codec = WireCodec()
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(spec.endpoints.steps)
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.setsockopt(zmq.LINGER, 2000)  # let a last "err" reach the engine
        self.push.connect(spec.endpoints.results)
        # Ranks are forked by a fork server, not by the engine, but multiprocessing hands
        # each the sentinel of the process that started it: readable once that one is gone.
        parent = multiprocessing.parent_process() if spec.watch_parent else None
        self.parent_sentinel = parent.sentinel if parent is not None else None
        self.heartbeat: WorkerHeartbeat | None = None
        self.worker: Any = None
        self.is_driver = False
        self.engine_host = ""
        self.pp_stage = -1
        self.reports_stage = False

    def run(self) -> int:
        try:
            setup = self._rendezvous()
            if setup is None:
                return 1
            try:
                self._start(setup)
            except Exception as exc:
                if isinstance(exc, ShardserveError):
                    # The user's error (a bad checkpoint, a cache too small): the engine raises
                    # it as itself; one line here, not a traceback per rank.
                    logger.error("Start-up failed: %s", exc)
                    logger.debug("Start-up failure", exc_info=True)
                elif _peer_gone(exc):
                    # Another rank failed first and said why; this rank's broken collective
                    # is only the echo, and a traceback would bury the cause above it.
                    logger.error("Start-up stopped: a peer rank went away (%s)",
                                 str(exc).splitlines()[0][:200])
                    logger.debug("Start-up failure", exc_info=True)
                else:
                    logger.exception("Start-up failed")
                self._send_error(0, exc)
                return 1
            self._send(["ready", self.rank, self.worker.kv_cache_info()])
            return self._loop()
        finally:
            self._close()

    # ---- start-up --------------------------------------------------------------------------

    def _rendezvous(self) -> dict[str, Any] | None:
        """Answer the engine's ping with hello, then wait for go; None when node 0 never
        showed up within the rendezvous timeout."""
        pc = self.spec.parallel_config
        # Node 0's own ranks (started by the engine, config given whole) wait a little longer
        # than the engine does: when another node is missing, the engine's timeout, which
        # names the missing ranks, must fire first, not this rank's own giving up (they watch
        # the engine's process, so they never outlive it).
        grace = RENDEZVOUS_GRACE_S if self.spec.config is not None else 0.0
        deadline = time.monotonic() + pc.rendezvous_timeout_s + grace
        said_hello = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("No %s from node 0's engine at %s within %.0f s; is it running "
                             "with --nnodes %d --master-addr/--master-port matching this node's?",
                             "go" if said_hello else "ping", self.spec.endpoints.steps,
                             pc.rendezvous_timeout_s, pc.nnodes or 1)
                return None
            if not self.sub.poll(int(min(left, 1.0) * 1000) + 1):
                self._check_parent()
                continue
            message = self.codec.decode(self.sub.recv())
            if message[0] == "ping" and not said_hello:
                self._send(["hello", self.rank, socket.gethostname(), os.getpid()])
                said_hello = True
            elif message[0] == "go":
                return message[1]
            elif message[0] == "stop":
                logger.warning("The engine stopped the world during rendezvous")
                return None

    def _start(self, setup: dict[str, Any]) -> None:
        from shardserve.distributed.parallel_state import (init_distributed_environment,
                                                           initialize_model_parallel)
        from shardserve.executor.worker import Worker

        pc = self.spec.parallel_config
        mine = (pc.world_size, pc.tensor_parallel_size, pc.pipeline_parallel_size)
        theirs = (setup["world_size"], setup["tensor_parallel_size"],
                  setup["pipeline_parallel_size"])
        if mine != theirs:
            raise ValueError(f"This node was started with world size {mine[0]} (tp {mine[1]}, "
                             f"pp {mine[2]}) but node 0 runs world size {theirs[0]} (tp "
                             f"{theirs[1]}, pp {theirs[2]}); start every node with the same "
                             "--tensor-parallel-size and --pipeline-parallel-size.")
        # Beat from now on: the engine counts silence from "go", and what follows (building
        # the config on another node, loading the model) takes a while.
        self.heartbeat = WorkerHeartbeat(
            self.context, self.spec.endpoints.beats_out, self.spec.endpoints.beats_in,
            self.rank, self.codec, float(setup["config"]["heartbeat_timeout_s"]),
            self.parent_sentinel)
        config = self.spec.config
        if config is None:
            kwargs = dict(setup["config"])
            kwargs["node_rank"] = pc.node_rank
            config = EngineConfig.from_kwargs(**kwargs).resolve()
        self.engine_host = setup.get("host", "")
        init_distributed_environment(setup["world_size"], self.rank, setup["backend"],
                                     setup["dist_init_method"], local_rank=self.spec.local_rank,
                                     timeout_s=config.parallel_config.step_timeout_s)
        initialize_model_parallel(setup["tensor_parallel_size"], setup["pipeline_parallel_size"],
                                  config.parallel_config.enable_expert_parallel,
                                  parallel_config=config.parallel_config)
        self.is_driver = self.rank == setup["driver_rank"]
        self.worker = Worker(config, self.spec.local_rank, is_driver=self.is_driver)
        self.worker.runner.stage_delay_s = float(setup.get("pp_stage_delay_s") or 0.0)
        self.worker.runner.stage_delay_per_token_s = float(
            setup.get("pp_stage_delay_per_token_s") or 0.0)
        from shardserve.distributed.parallel_state import get_pp_group, get_tp_group
        pp = get_pp_group()
        # TP rank 0 of each pipeline stage reports its stage's busy spans (the driver's ride
        # on its replies; the other stages send "pstat").
        self.pp_stage = pp.rank_in_group if pp.world_size > 1 else -1
        self.reports_stage = self.pp_stage >= 0 and get_tp_group().is_first_rank
        self.worker.load_model()
        self.worker.warm_up_communication()
        if self.is_driver:
            self.worker.enable_comm_timing()

    def _check_parent(self) -> None:
        if parent_gone(self.parent_sentinel):
            logger.error("The process that started this rank is gone; exiting")
            os._exit(1)

    # ---- serving ---------------------------------------------------------------------------

    def _loop(self) -> int:
        same_host = self.engine_host == socket.gethostname()
        self.async_driver = self.is_driver and bool(
            self.worker.config.scheduler_config.async_scheduling)
        self._pending: tuple[int, Any, dict[str, Any]] | None = None
        while True:
            data = self._next_message()
            if data is None:  # the step in flight finished before anything new came
                self._finish_pending()
                continue
            message = self.codec.decode(data)
            kind = message[0]
            if kind == "step":
                _, seq, t_sent, scheduler_output = message
                # Sent on this host's CLOCK_MONOTONIC: transport + decode time of the step.
                latency = time.monotonic() - t_sent if same_host else -1.0
                self._step(seq, scheduler_output, latency)
            elif kind == "call":
                self._finish_pending()
                _, seq, method, args, reply_ranks = message
                self._call(seq, method, args, reply_ranks)
            elif kind == "stop":
                why = message[1] if len(message) > 1 else None
                if why:
                    logger.error("Node 0's engine stopped every rank after a failure: %s", why)
                    return EXIT_ENGINE_FAILED
                return 0
            elif kind == "ping":
                # An engine sends all its pings before its "go": one now is another engine's.
                # Node 0 came back before this rank's engine counted as silent (the new one's
                # beats keep it alive), and its rendezvous would wait out its timeout for a
                # rank that is here but will never answer. Leave: this node's launcher exits
                # and its supervisor restarts it into the new world.
                logger.error("A new engine on node 0 is starting; this rank's engine is gone. "
                             "Exiting")
                return EXIT_ENGINE_FAILED
            # A late "go" is ignored.

    def _next_message(self) -> bytes | None:
        """The next message; with a step in flight (async driver), None as soon as that step's
        tokens are back if no message came first."""
        if self._pending is None:
            return self.sub.recv()
        handle = self._pending[1]
        while True:
            if self.sub.poll(0):
                return self.sub.recv()
            if handle.ready():
                return None
            time.sleep(50e-6)

    def _finish_pending(self) -> None:
        """Reply with the step in flight's output (async driver)."""
        if self._pending is None:
            return
        seq, handle, stats = self._pending
        self._pending = None
        try:
            out, step_s, comm_s, num_comm = handle.get()
            stats.update(step_s=step_s, comm_s=comm_s, num_comm=num_comm)
            self._send(["out", seq, self.rank, out, stats])
        except Exception as exc:
            logger.exception("Step %d failed", seq)
            self._send_error(seq, exc)

    def _step(self, seq: int, scheduler_output: Any, latency: float) -> None:
        if self.async_driver:
            # Queue this step on the device first, then answer the one before it: the GPU
            # never waits for the host between the two (engine/core.py, async scheduling).
            try:
                handle = self.worker.execute_model_async_timed(scheduler_output)
            except Exception as exc:
                logger.exception("Step %d failed", seq)
                self._finish_pending()
                self._send_error(seq, exc)
                return
            self._finish_pending()
            self._pending = (seq, handle, {"broadcast_s": latency})
            return
        try:
            if not self.is_driver:
                self.worker.execute_model(scheduler_output)
                span = self.worker.runner.last_span
                if self.reports_stage and span is not None:
                    self._send(["pstat", seq, self.rank, self.pp_stage, *span])
                return
            out, step_s, comm_s, num_comm = self.worker.execute_model_timed(scheduler_output)
            stats = {"step_s": step_s, "comm_s": comm_s, "num_comm": num_comm,
                     "broadcast_s": latency}
            span = self.worker.runner.last_span
            if self.reports_stage and span is not None:
                stats["pp_span"] = [self.pp_stage, *span]
            self._send(["out", seq, self.rank, out, stats])
        except Exception as exc:
            logger.exception("Step %d failed", seq)
            self._send_error(seq, exc)

    def _call(self, seq: int, method: str, args: list[Any], reply_ranks: list[int] | None) -> None:
        try:
            if method not in RPC_METHODS:
                raise ValueError(f"{method!r} is not a worker method the engine may call")
            value = getattr(self.worker, method)(*args)
            if reply_ranks is None or self.rank in reply_ranks:
                self._send(["ret", seq, self.rank, value])
        except Exception as exc:
            logger.exception("Call %s failed", method)
            self._send_error(seq, exc)

    # ---- plumbing --------------------------------------------------------------------------

    def _send(self, message: list[Any]) -> None:
        self.push.send(self.codec.encode(message))

    def _send_error(self, seq: int, exc: BaseException) -> None:
        try:
            self._send(["err", seq, self.rank, type(exc).__name__, str(exc),
                        traceback.format_exc()])
        except zmq.ZMQError:
            logger.exception("Could not report the error to the engine")

    def _close(self) -> None:
        # The heartbeat stops first (a stopping rank must not be declared dead), which also
        # ends its parent watch: from here the watchdog bounds whatever tear-down blocks.
        done = arm_exit_watchdog(TEARDOWN_TIMEOUT_S, 1, f"Rank {self.rank}'s tear-down")
        if self.heartbeat is not None:
            self.heartbeat.close()
        try:
            from shardserve.distributed.parallel_state import destroy_distributed_environment
            destroy_distributed_environment()
        except Exception:  # leaving a broken world must not hide the exit code
            logger.debug("Leaving torch.distributed failed", exc_info=True)
        self.sub.close()
        self.push.close()
        self.context.term()
        done.set()
