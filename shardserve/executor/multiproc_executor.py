"""MultiprocExecutor: one worker process per rank (GPU), on this node and, with --nnodes,
on others; the engine process itself holds no rank.

    EngineCore ── execute_model(SchedulerOutput) ──▶ MultiprocExecutor
        │  PUB: ["step", seq, t, SchedulerOutput]  (one msgpack encode, fanned out by ZMQ)
        ▼
    rank 0 .. N-1  (worker_proc.py): each runs the step; TP all-reduces over torch.distributed
        │  PUSH from the driver rank only (TP rank 0 of the last PP stage): ModelRunnerOutput
        ▼
    MultiprocExecutor ── ModelRunnerOutput ──▶ EngineCore

Start-up: spawn this node's ranks (forkserver: one torch import, then cheap forks), then a
rendezvous before torch.distributed is touched: the engine pings until every rank of the world
has said hello, or raises RendezvousTimeoutError naming the ranks (and nodes) that did not, so
a missing node is reported in bounded time instead of hanging inside init_process_group.

Failures never hang the engine: while it waits for a reply it watches this node's process
sentinels and every rank's heartbeats (executor/liveness.py) and bounds each step by
step_timeout_s. A dead, silent or failing rank raises EngineDeadError naming it, after the
executor has stopped every other rank; the caller fails the requests in flight.

Steps carry a sequence number and replies are matched to it, so pipeline parallelism keeps
several steps in flight (submit_step / collect_step; EngineCore.step_with_batch_queue) without
changing the wire. Under PP, TP rank 0 of every stage also reports each step's busy span
("pstat"; the driver's rides on its "out"), tallied in PipelineStats (pipeline_stats()).
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
import socket
import time
import weakref
from typing import Any, NoReturn

import zmq

from shardserve import errors
from shardserve.config import EngineConfig
from shardserve.cpus import threads_per_process
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.errors import EngineDeadError, RendezvousTimeoutError
from shardserve.executor.executor import Executor
from shardserve.distributed.comm_timer import StepStats
from shardserve.executor.liveness import (HeartbeatMonitor, describe_exit, process_stopped,
                                          kill_processes_and_remove, stop_processes)
from shardserve.executor.multiproc_preflight import check_master_ports, log_pipeline_stages
from shardserve.executor.pipeline_stats import PipelineStats
from shardserve.executor.stacks import collect_stacks, diagnose
from shardserve.executor.wire import Endpoints, WireCodec
from shardserve.executor.worker_proc import WorkerSpec, start_worker_processes

logger = logging.getLogger(__name__)

PING_INTERVAL_S = 0.2
POLL_SLICE_S = 0.1  # liveness is checked at least this often while waiting for a reply
STARTUP_CALL_TIMEOUT_S = 3600.0  # loading and profiling a big model takes a while
STOP_GRACE_S = 5.0  # for ranks to leave after "stop" (a failed world's are killed sooner)
IDLE_CHECK_AFTER_S = 0.5  # a step submitted after this long idle checks every rank first


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        pc = config.parallel_config.resolve()
        self.parallel_config = pc
        self._store = None  # single node: the torch.distributed store this process serves
        if pc.pipeline_parallel_size > 1:
            log_pipeline_stages(config)
        if pc.node_rank != 0:
            raise errors.InvalidRequestError(
                f"node_rank {pc.node_rank} runs headless workers, not the engine: start it with "
                "`shardserve worker` (same flags).", "node_rank")
        self.world_size = pc.world_size
        self.driver_rank = pc.driver_rank
        self._codec = WireCodec()
        self._seq = 0
        self._last_submit = 0.0  # monotonic time of the last submit_step
        self._dead: str | None = None
        self._closed = False
        self._hosts: dict[int, tuple[str, int]] = {}  # rank -> (host, pid) from its hello
        self._step_stats = StepStats()
        self._pp_stats = PipelineStats(pc.pipeline_parallel_size)
        self._in_flight: set[int] = set()
        self._early_outputs: dict[int, list[Any]] = {}  # seq -> a step's answer come early

        if pc.nnodes > 1:
            check_master_ports(pc.master_port)
        self._context = zmq.Context()
        self._local = Endpoints.ipc()
        binds = [self._local]
        if pc.nnodes > 1:  # other nodes' ranks connect over TCP
            binds.append(Endpoints.tcp(pc.master_addr, pc.master_port).bind_addresses())
        self._steps = self._context.socket(zmq.PUB)
        self._steps.setsockopt(zmq.SNDHWM, 0)
        self._steps.setsockopt(zmq.LINGER, 1000)  # let "stop" reach remote ranks
        self._results = self._context.socket(zmq.PULL)
        self._results.setsockopt(zmq.RCVHWM, 0)
        self._results.setsockopt(zmq.LINGER, 0)
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._monitor: HeartbeatMonitor | None = None
        self._finalizer = weakref.finalize(self, kill_processes_and_remove, self._procs, self._local.ipc_directory())
        try:
            for ep in binds:
                self._steps.bind(ep.steps)
                self._results.bind(ep.results)
            self._monitor = HeartbeatMonitor(self._context, [ep.beats_out for ep in binds],
                                             [ep.beats_in for ep in binds], self._codec,
                                             pc.heartbeat_timeout_s)
            self._start_local_ranks()
            self._rendezvous()
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up --------------------------------------------------------------------------

    def _start_local_ranks(self) -> None:
        pc = self.parallel_config
        num_threads = threads_per_process(pc.num_local_ranks)
        level = logging.getLogger("shardserve").getEffectiveLevel()
        start = time.perf_counter()
        specs = [WorkerSpec(rank=rank, local_rank=rank % pc.num_local_ranks,
                            endpoints=self._local, parallel_config=pc, config=self.config,
                            watch_parent=True, num_threads=num_threads, log_level=level)
                 for rank in pc.node_ranks(0)]
        hf_config = self.config.model_config.hf_config
        preload = [type(hf_config).__module__] if hf_config is not None else []
        for spec, proc in zip(specs, start_worker_processes(specs, daemon=True, preload=preload)):
            self._procs[spec.rank] = proc
        logger.info("Started %d worker processes (ranks %s) in %.1f s", len(self._procs),
                    list(self._procs), time.perf_counter() - start)

    def _rendezvous(self) -> None:
        pc = self.parallel_config
        start = time.monotonic()
        logger.debug("Rendezvous of %d ranks", self.world_size)
        deadline = start + pc.rendezvous_timeout_s
        ping = self._codec.encode(["ping"])
        next_ping = 0.0
        while len(self._hosts) < self.world_size:
            now = time.monotonic()
            if now >= deadline:
                self._raise_rendezvous_timeout()
            if now >= next_ping:
                self._steps.send(ping)
                next_ping = now + PING_INTERVAL_S
            if self._results.poll(int(PING_INTERVAL_S * 1000)):
                message = self._codec.decode(self._results.recv())
                if message[0] == "hello":
                    self._on_hello(*message[1:])
                elif message[0] == "err":
                    self._on_error(message, starting=True)
            self._check_processes()
            self._check_stopped_local_ranks(start, pc.heartbeat_timeout_s)
        logger.info("All %d ranks checked in after %.1f s: %s", self.world_size,
                    time.monotonic() - start,
                    ", ".join(f"{r}@{h}" for r, (h, _) in sorted(self._hosts.items())))
        self._steps.send(self._codec.encode(["go", self._setup()]))
        self._monitor.expect(list(range(self.world_size)))

    def _on_hello(self, rank: int, host: str, pid: int) -> None:
        if not 0 <= rank < self.world_size:
            self._fail(f"A worker claims rank {rank} of a world of {self.world_size} ({host}, "
                       f"pid {pid}): was it started with different -tp/-pp/--nnodes?")
        if rank in self._hosts and self._hosts[rank] != (host, pid):
            old = self._hosts[rank]
            self._fail(f"Rank {rank} checked in twice ({old[0]} pid {old[1]}, and {host} pid "
                       f"{pid}): two nodes were started with the same --node-rank.")
        self._hosts[rank] = (host, pid)

    def _check_stopped_local_ranks(self, start: float, after_s: float) -> None:
        """A local rank stopped (SIGSTOP) before it checked in would otherwise hold the
        rendezvous for its whole timeout; past the heartbeat timeout it is named at once."""
        if time.monotonic() - start < after_s:
            return
        stopped = [r for r, p in self._procs.items()
                   if r not in self._hosts and p.pid is not None and process_stopped(p.pid)]
        if stopped:
            pids = ", ".join(f"rank {r} pid {self._procs[r].pid}" for r in stopped)
            self._fail(f"Worker process(es) {pids} stopped (SIGSTOP?) before checking in; "
                       "start-up cannot finish.")

    def _raise_rendezvous_timeout(self) -> NoReturn:
        pc = self.parallel_config
        missing = [r for r in range(self.world_size) if r not in self._hosts]
        nodes = sorted({r // pc.num_local_ranks for r in missing})
        local_alive = [r for r in missing if r in self._procs
                       and self._procs[r].exitcode is None]
        remote = [r for r in missing if r not in self._procs]
        parts = []
        if local_alive:  # started and still running: stuck, not missing
            parts.append("this node's worker process(es) "
                         + ", ".join(f"rank {r} pid {self._procs[r].pid}" for r in local_alive)
                         + " are running but never answered: stuck in start-up (on a device, "
                         "a filesystem or a lock); their log lines say where")
        if remote and pc.nnodes > 1:
            remote_nodes = sorted({r // pc.num_local_ranks for r in remote})
            parts.append(f"start them with `shardserve worker --nnodes {pc.nnodes} --node-rank R "
                         f"--master-addr {pc.master_addr} --master-port {pc.master_port}` (and "
                         f"the same -tp/-pp) on node(s) {remote_nodes}, reachable on ports "
                         f"{pc.master_port}-{pc.master_port + 4}")
        where = "; ".join(parts) or "this node's worker processes did not start"
        message = (f"Rendezvous timed out after {pc.rendezvous_timeout_s:.0f} s: rank(s) "
                   f"{missing} (node(s) {nodes}) did not check in; {where}.")
        self._dead = message
        self._shutdown(0.5, force=True)
        raise RendezvousTimeoutError(message)

    def _setup(self) -> dict[str, Any]:
        pc = self.parallel_config
        if pc.nnodes > 1:
            init_method = f"tcp://{pc.master_addr}:{pc.master_port}"
        else:
            # Served by this process for the world's life: no port for rank 0 to race for.
            from shardserve.distributed.local_launch import host_store
            self._store, init_method = host_store(pc.step_timeout_s)
        return {"world_size": self.world_size, "tensor_parallel_size": pc.tensor_parallel_size,
                "pipeline_parallel_size": pc.pipeline_parallel_size,
                "driver_rank": self.driver_rank,
                "backend": "nccl" if self.config.device_config.device == "cuda" else "gloo",
                "dist_init_method": init_method, "host": socket.gethostname(),
                # Test/benchmark hook: each pipeline stage sleeps this long in its forward
                # (per forward, and per token of the step).
                "pp_stage_delay_s": float(os.environ.get("SHARDSERVE_PP_STAGE_DELAY_S") or 0.0),
                "pp_stage_delay_per_token_s": float(
                    os.environ.get("SHARDSERVE_PP_STAGE_DELAY_PER_TOKEN_S") or 0.0),
                "config": self.config.to_kwargs()}

    def _wait_ready(self) -> None:
        start = time.perf_counter()
        infos = self._wait_replies(0, set(range(self.world_size)), STARTUP_CALL_TIMEOUT_S,
                                   kind="ready")
        logger.info("All %d ranks loaded the model in %.1f s; per-rank KV heads: %s",
                    self.world_size, time.perf_counter() - start,
                    [infos[r]["num_kv_heads"] for r in sorted(infos)])

    # ---- the Executor interface ------------------------------------------------------------

    def determine_num_blocks(self) -> int:
        # Each rank profiles its own memory; the workers agree on the minimum (all_reduce MIN).
        blocks = self.collective_rpc("determine_num_blocks", timeout_s=STARTUP_CALL_TIMEOUT_S)
        assert len(set(blocks)) == 1, blocks
        return blocks[0]

    def init_kv_cache(self, num_blocks: int) -> None:
        self.collective_rpc("init_kv_cache", [num_blocks], timeout_s=STARTUP_CALL_TIMEOUT_S)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect_step(self.submit_step(scheduler_output))

    def submit_step(self, scheduler_output: SchedulerOutput) -> int:
        """Broadcast one step to every rank; returns its sequence number for collect_step."""
        # A rank that died while the engine was idle (the offline LLM checks nothing between
        # calls) is named now, not blamed on the peer whose collective it breaks. Back-to-back
        # steps skip the check (a few syscalls a rank): a death then shows in collect_step.
        now = time.monotonic()
        if now - self._last_submit > IDLE_CHECK_AFTER_S:
            self.check_health()
        else:
            self._raise_if_dead()
        self._last_submit = now
        self._seq += 1
        start = time.perf_counter()
        data = self._codec.encode_step(self._seq, time.monotonic(), scheduler_output)
        self._steps.send(data, copy=False)
        self._step_stats.encode_s += time.perf_counter() - start
        self._in_flight.add(self._seq)
        self._pp_stats.record_submit(len(self._in_flight))
        return self._seq

    def collect_step(self, seq: int) -> ModelRunnerOutput:
        """The driver's output of step `seq` (blocks; bounded by step_timeout_s)."""
        reply = self._early_outputs.pop(seq, None)
        if reply is None:
            reply = self._wait_replies(seq, {self.driver_rank},
                                       self.parallel_config.step_timeout_s,
                                       kind="out")[self.driver_rank]
        output, stats = reply
        self._in_flight.discard(seq)
        self._step_stats.record(stats)
        if "pp_span" in stats:
            self._pp_stats.record(stats["pp_span"][0], seq, *stats["pp_span"][1:])
        return output

    def collective_rpc(self, method: str, args: list[Any] | None = None,
                       reply_ranks: list[int] | None = None,
                       timeout_s: float | None = None) -> list[Any]:
        """Call Worker.<method>(*args) on every rank; the replies of `reply_ranks` (default:
        all ranks) in rank order."""
        self._raise_if_dead()
        self._seq += 1
        self._steps.send(self._codec.encode(["call", self._seq, method, list(args or []),
                                                  reply_ranks]))
        ranks = set(range(self.world_size)) if reply_ranks is None else set(reply_ranks)
        replies = self._wait_replies(self._seq, ranks,
                                     timeout_s or self.parallel_config.step_timeout_s, kind="ret")
        return [replies[r] for r in sorted(replies)]

    def start_profile(self, out_dir: str) -> None:
        self.collective_rpc("start_profile", [out_dir])

    def stop_profile(self) -> list[dict]:
        # Writing a GPU trace of a long window takes a while: more than a step's timeout.
        return self.collective_rpc("stop_profile",
                                   timeout_s=max(self.parallel_config.step_timeout_s, 600.0))

    def check_health(self) -> None:
        """Raise EngineDeadError if any rank is dead or silent (cheap; call it when idle)."""
        self._raise_if_dead()
        self._check_processes()
        self._check_heartbeats()

    def comm_stats(self) -> dict[str, float]:
        """The communication share of recent steps and cumulative counters (see StepStats)."""
        return self._step_stats.as_dict()

    def pipeline_stats(self) -> dict[str, list[float] | float]:
        """Per-stage busy ratio and seconds, steps, micro-batches in flight (PipelineStats);
        empty without pipeline parallelism."""
        if self.parallel_config.pipeline_parallel_size == 1:
            return {}
        return self._pp_stats.as_dict()

    def pipeline_trace(self) -> list[tuple[int, int, float, float]]:
        """The last stage spans: (stage, step seq, start, end) on the host's monotonic clock."""
        return list(self._pp_stats.trace)

    @property
    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of this node's worker processes."""
        return {rank: proc.pid for rank, proc in self._procs.items()}

    def shutdown(self, failure: str | None = None) -> None:
        self._shutdown(STOP_GRACE_S, failure=failure)

    def _shutdown(self, grace_s: float, force: bool = False, failure: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Why, when the engine failed: the ranks then exit non-zero, so another node's
            # launcher does too and its supervisor restarts it with node 0 (a clean stop's 0
            # reads as "done").
            self._steps.send(self._codec.encode(["stop", failure or self._dead]))
        except zmq.ZMQError:
            pass
        if self._monitor is not None:
            self._monitor.close()
        stop_processes(self._procs, grace_s, force)
        self._steps.close()
        self._results.close()
        self._context.term()
        self._finalizer()  # removes the ipc directory; the processes are already gone

    # ---- waiting, liveness, failure --------------------------------------------------------

    def _wait_replies(self, seq: int, ranks: set[int], timeout_s: float,
                      kind: str) -> dict[int, Any]:
        """Replies of `kind` to message `seq` from `ranks`; polls in slices so a dead or
        silent rank is noticed within about POLL_SLICE_S (sentinels) or the heartbeat
        timeout, and gives up after timeout_s."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(ranks):
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = sorted(ranks - set(replies))
                self._fail(f"Worker rank(s) {waiting} did not answer within {timeout_s:.0f} s "
                           f"(step_timeout_s); a rank is hung. Ranks: {self._describe(waiting)}. "
                           f"This node's ranks: {self._where_ranks_are()}.")
            if not self._results.poll(int(min(left, POLL_SLICE_S) * 1000) + 1):
                self._check_processes()
                self._check_heartbeats()
                continue
            message = self._codec.decode(self._results.recv())
            if message[0] == "pstat":  # ["pstat", seq, rank, stage, start, end, busy_s]
                self._pp_stats.record(message[3], message[1], *message[4:7])
                continue
            if message[0] == "err":
                self._on_error(message, starting=kind in ("ready", "ret"))
            if message[0] == "ready" and kind == "ready":
                replies[message[1]] = message[2]
            elif message[0] == kind and message[1] == seq:
                replies[message[2]] = message[3] if kind == "ret" else message[3:]
            elif message[0] == "out" and message[1] in self._in_flight:
                # A step in flight answered while an RPC (start_profile between steps) was
                # waited for: kept for its collect_step.
                self._early_outputs[message[1]] = message[3:]
            elif message[0] != "hello":
                logger.warning("Ignoring an unexpected %r from the workers (waiting for %s %d)",
                               message[0], kind, seq)
        return replies

    def _check_processes(self) -> None:
        for rank, proc in self._procs.items():
            if proc.exitcode is not None:
                self._fail(f"Worker rank {rank} (pid {proc.pid}) died: {describe_exit(proc.exitcode)}.")

    def _check_heartbeats(self) -> None:
        if self._monitor is None:
            return
        gone = self._monitor.gone_ranks()
        if gone:
            rank, why = next(iter(gone.items()))
            self._fail(f"Worker rank {rank} ({self._describe([rank])}) {why}.")
        silent = self._monitor.silent_ranks()
        if silent:
            rank, seconds = next(iter(silent.items()))
            self._fail(f"Worker rank {rank} ({self._describe([rank])}) has been silent for "
                       f"{seconds:.1f} s (heartbeat_timeout_s "
                       f"{self.parallel_config.heartbeat_timeout_s:g}): its process or node is "
                       "gone or frozen.")

    def _on_error(self, message: list[Any], starting: bool) -> NoReturn:
        _, seq, rank, type_name, text, trace = message
        error_cls = getattr(errors, type_name, None)
        if starting and isinstance(error_cls, type) and issubclass(error_cls, errors.ShardserveError):
            # A start-up error of the rank's own (cache too small, bad model), not a broken
            # collective: re-raise it as itself, so the user sees the same error as with one
            # process. The rank exits right after reporting it, so its death (or its peers',
            # whose collectives it breaks) must not be blamed instead.
            logger.debug("Worker rank %d failed:\n%s", rank, trace)
            self._dead = text
            self.shutdown()
            raise error_cls(text)
        if len(text) > 400:  # gloo/NCCL errors run long; the worker's log has all of it
            text = text[:400] + " ..."
        # A rank that died makes its peers' collectives fail: blame the dead one if any (a
        # local one by its exit, at once; one on another node by its silence, which takes the
        # heartbeat timeout to show: waited for when a step fails, the usual cause there, not
        # at start-up, where errors are the rank's own and should come at once).
        wait_s = 1.0
        if len(self._procs) < self.world_size and not starting:
            wait_s = max(wait_s, self.parallel_config.heartbeat_timeout_s + 1.0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            # At start-up a rank that reports an error leaves right after with exit code 1,
            # and so does a peer whose collective that broke (after reporting the echo):
            # exits of that kind are not the cause. A rank killed (a signal: the OOM killer, a
            # crash) or ending otherwise is.
            dead = [r for r, p in self._procs.items() if p.exitcode is not None
                    and not (starting and p.exitcode == 1)]
            if dead:
                proc = self._procs[dead[0]]
                self._fail(f"Worker rank {dead[0]} (pid {proc.pid}) died: "
                           f"{describe_exit(proc.exitcode)}; rank {rank} then failed: "
                           f"{type_name}: {text}")
            gone = self._monitor.gone_ranks() if self._monitor is not None else {}
            gone.pop(rank, None)
            if gone:
                other, why = next(iter(gone.items()))
                self._fail(f"Worker rank {other} ({self._describe([other])}) {why}; rank "
                           f"{rank} then failed: {type_name}: {text}")
            silent = self._monitor.silent_ranks() if self._monitor is not None else {}
            silent.pop(rank, None)  # it spoke: it is not the one gone
            if silent:
                other, seconds = next(iter(silent.items()))
                self._fail(f"Worker rank {other} ({self._describe([other])}) has been silent "
                           f"for {seconds:.1f} s: its process or node is gone or frozen; rank "
                           f"{rank} then failed: {type_name}: {text}")
            time.sleep(0.05)
        logger.error("Worker rank %d failed:\n%s", rank, trace)
        self._fail(f"Worker rank {rank} failed: {type_name}: {text}")

    def _fail(self, message: str) -> NoReturn:
        logger.error("%s Stopping every worker.", message)
        self._dead = message
        self._shutdown(0.5, force=True)
        raise EngineDeadError(message)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine's workers are gone: {self._dead}")
        if self._closed:
            raise EngineDeadError("The executor was shut down.")

    def _where_ranks_are(self) -> str:
        """Only the driver answers a step, so a timeout alone names it even when it is waiting
        for a hung peer: ask this node's ranks for their stacks, log them, and say which are
        waiting in a collective and which are elsewhere (executor/stacks.py)."""
        directory = self._local.ipc_directory()
        if directory is None:
            return "stacks not available"
        stacks = collect_stacks({r: p.pid for r, p in self._procs.items()
                                 if p.exitcode is None}, directory)
        for rank in sorted(stacks):
            logger.error("Rank %d's threads at the step timeout:\n%s", rank, stacks[rank])
        return diagnose(stacks)

    def _describe(self, ranks: list[int]) -> str:
        parts = []
        for rank in ranks:
            node = rank // self.parallel_config.num_local_ranks
            host, pid = self._hosts.get(rank, ("?", -1))
            parts.append(f"rank {rank} on node {node} ({host}, pid {pid})")
        return "; ".join(parts)

