"""The engine core in its own process, so the HTTP event loop never waits on a model step and
a step never waits on JSON or a slow client.

    front (AsyncLLM)                          core process (this file)
    ────────────────                          ────────────────────────
    PUSH input_addr  ── EngineCoreRequest ──▶ PULL   busy loop:
                        AbortRequests            take every queued message
                        ShutdownCore             step while there is work
    PULL output_addr ◀── CoreReady ────────── PUSH   push outputs (+ stats every STATS_INTERVAL_S)
                         CoreStepOutputs
                         CoreFailed

The front binds both sockets (ipc:// in a private temp dir) and the core connects, so the core
can start, die and be replaced without the front rebinding. The core ignores SIGINT and SIGTERM:
the front owns the lifecycle (a Ctrl-C or a Kubernetes SIGTERM reaches the whole process
group, and in-flight requests must be allowed to drain); it exits on ShutdownCore, when its
parent dies, or, after an exception, with every in-flight request failed and exit code 1.

A thread of its own counts up a heartbeat shared with the front (start_beating) from the start:
a long step or load never stops it, a frozen process (SIGSTOP, a stalled host) does, and the
front then kills the core instead of letting its requests wait for ever (engine/core_client.py).
Because that beat goes on whatever the main thread does, a step that never returns (a deadlock,
a kernel that never finishes) would hold its requests for ever; a second thread (StepWatchdog)
ends the core once one step has run past step_timeout_s, the limit the multi-process executor
already puts on each step, reporting the main thread's stack.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from shardserve.config import EngineConfig
from shardserve.engine.core import EngineCore
from shardserve.engine.core_messages import (AbortRequests, CoreFailed, CoreReady, CoreStats,
                                             CoreStepOutputs, EngineCoreRequest, ProfileControl,
                                             ProfileResult, ShutdownCore, make_serializer)
from shardserve.engine.outputs import EngineCoreOutput
from shardserve.engine.request import Request
from shardserve.engine.serial import Serializer
from shardserve.errors import ShardserveError

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1  # at most this stale while busy; sent at once when the core goes idle
HEALTH_CHECK_INTERVAL_S = 1.0  # while idle, how often the workers' liveness is checked
IDLE_POLL_MS = 100  # how long an idle core blocks on its socket before checking its parent
PARENT_CHECK_S = 1.0  # how often a busy core checks its parent
GPU_MEMORY_INTERVAL_S = 1.0  # NVML queries cost ~ms each; no need to ask every step
BEAT_INTERVAL_S = 0.5  # how often the core's heartbeat counts up
WATCHDOG_GRACE_S = 5.0  # past the executor's own limits, before the step watchdog fires


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int,
                    log_level: int = logging.INFO, beat: Any = None) -> None:
    """Process entry point (multiprocessing spawn target). `beat`: a shared counter (a
    multiprocessing RawValue) that start_beating keeps counting up."""
    if beat is not None:
        start_beating(beat)
    watchdog = StepWatchdog(step_watchdog_limit_s(config),
                            lambda message, stack: _exit_hung(output_addr, message, stack))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore; a core killed while it loads (the
    # front stops a core that is not ready by SIGKILL) would leave it to the resource tracker,
    # which warns of a "leaked semaphore". This process's bars need only a thread lock.
    import tqdm
    tqdm.tqdm.set_lock(threading.RLock())
    logging.basicConfig(level=log_level,
                        format=f"%(levelname)s (EngineCore pid={os.getpid()}) %(name)s: %(message)s")
    serializer = make_serializer()
    context = zmq.Context()
    in_sock = context.socket(zmq.PULL)
    in_sock.connect(input_addr)
    out_sock = context.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
    out_sock.connect(output_addr)
    code = 1
    orphaned = False
    try:
        try:
            core = EngineCore(config)
        except Exception as exc:  # load failed: say why, then exit non-zero
            if isinstance(exc, ShardserveError):  # a known cause with its fix in the message
                logger.error("Engine core failed to start: %s", exc)
            else:
                logger.exception("Engine core failed to start")
            out_sock.send(serializer.encode(CoreFailed(f"{type(exc).__name__}: {exc}",
                                                       traceback.format_exc())))
            return
        out_sock.send(serializer.encode(CoreReady(os.getpid(), config.cache_config.num_blocks,
                                                  dict(core.startup_seconds))))
        loop = EngineCoreProc(core, in_sock, out_sock, serializer, parent_pid, watchdog)
        code = loop.run()
        orphaned = loop.orphaned
        core.shutdown(loop.failure)
    finally:
        # Linger so the last outputs (errors, CoreFailed) reach the front before we exit;
        # unless the front is gone, when nobody will ever read them.
        in_sock.close(linger=0)
        out_sock.close(linger=0 if orphaned else 2000)
        context.term()
        sys.exit(code)


def start_beating(beat: Any) -> None:
    """Count `beat` up every BEAT_INTERVAL_S from a daemon thread: the main thread may sit in a
    step (or the model load) for minutes, which must not look like death."""

    def run() -> None:
        while True:
            beat.value += 1
            time.sleep(BEAT_INTERVAL_S)

    threading.Thread(target=run, name="shardserve-core-heartbeat", daemon=True).start()


def step_watchdog_limit_s(config: EngineConfig) -> float:
    """With one process nothing else bounds a step. With several, the executor gives up on a
    step after step_timeout_s with a better message (the hung rank's name): the watchdog only
    catches the core itself hanging, a little later."""
    pc = config.parallel_config
    if pc.world_size == 1:
        return pc.step_timeout_s
    return pc.step_timeout_s + pc.heartbeat_timeout_s + WATCHDOG_GRACE_S


class StepWatchdog:
    """Calls on_overdue(message, main thread's stack) once, from its own thread, when a step
    (begin() .. end()) has run longer than limit_s. Idle time and start-up are not watched."""

    def __init__(self, limit_s: float, on_overdue: Callable[[str, str], None]) -> None:
        self.limit_s = limit_s
        self._on_overdue = on_overdue
        self._started: float | None = None  # set and cleared by the main thread only
        self._main = threading.get_ident()
        threading.Thread(target=self._run, name="shardserve-step-watchdog", daemon=True).start()

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def _run(self) -> None:
        while True:
            time.sleep(min(BEAT_INTERVAL_S, self.limit_s / 4))
            started = self._started
            if started is None or time.monotonic() - started <= self.limit_s:
                continue
            frame = sys._current_frames().get(self._main)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
            self._on_overdue(
                f"Step timeout: one engine step has run for "
                f"{time.monotonic() - started:.0f} s, past step_timeout_s {self.limit_s:g}: "
                "the engine core is hung (deadlocked, or stuck in a kernel) and exits", stack)
            return


def _exit_hung(output_addr: str, message: str, stack: str) -> None:
    """Tell the front why (it fails every request with it), then end the process: the main
    thread cannot be interrupted. A fresh socket: the main thread's is not thread-safe."""
    logger.error("%s. The main thread is at:\n%s", message, stack)
    context = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sock.connect(output_addr)
        sock.send(make_serializer().encode(CoreFailed(message, stack)))
        sock.close(linger=2000)
        context.term()  # waits (up to the linger) until the message is out
    finally:
        logging.shutdown()
        os._exit(1)


class EngineCoreProc:
    """The busy loop around one EngineCore."""

    def __init__(self, core: EngineCore, in_sock: zmq.Socket, out_sock: zmq.Socket,
                 serializer: Serializer, parent_pid: int,
                 watchdog: StepWatchdog | None = None) -> None:
        self.core = core
        self._watchdog = watchdog
        self._in = in_sock
        self._out = out_sock
        self._serializer = serializer
        self._parent_pid = parent_pid
        # Every request the core holds, so an exception can fail each one, and so a request's
        # first scheduling time can be read after the scheduler has let go of it.
        self._live: dict[str, Request] = {}
        self._unscheduled: set[str] = set()
        self._stopping = False
        self.orphaned = False  # the front end died
        self.failure: str | None = None  # why run() ended with 1, for the workers' stop
        self._last_stats_time = 0.0
        self._last_stats: CoreStats | None = None
        self._last_parent_check = time.monotonic()
        self._last_health_check = time.monotonic()
        self._gpu_memory = _GpuMemoryProbe(core.config.device_config.device)

    def run(self) -> int:
        try:
            while not self._stopping:
                busy = self.core.has_unfinished_requests()
                self._receive(0 if busy else IDLE_POLL_MS)
                if self.core.has_unfinished_requests():
                    self._step()
                else:
                    self._send_idle_update()
                if not self._parent_alive():
                    logger.error("The front-end process %d is gone; exiting", self._parent_pid)
                    self.orphaned = True
                    self.failure = f"the front-end process {self._parent_pid} is gone"
                    return 1
            return 0
        except Exception as exc:
            self._fail(exc)
            self.failure = f"the engine core failed: {type(exc).__name__}: {exc}"
            return 1

    # ---- messages in -----------------------------------------------------------------------

    def _receive(self, timeout_ms: int) -> None:
        if not self._in.poll(timeout_ms):
            return
        while True:
            try:
                data = self._in.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(self._serializer.decode(data))

    def _handle(self, message: Any) -> None:
        if isinstance(message, EngineCoreRequest):
            request = Request(message.request_id, message.prompt_token_ids,
                              message.sampling_params, frozenset(message.eos_token_ids),
                              message.arrival_time, message.max_tokens,
                              message.primary_eos_token_id)
            self._live[request.request_id] = request
            self._unscheduled.add(request.request_id)
            self.core.add_request(request)
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
            for rid in message.request_ids:
                self._live.pop(rid, None)
                self._unscheduled.discard(rid)
        elif isinstance(message, ShutdownCore):
            self._stopping = True
        elif isinstance(message, ProfileControl):
            self._profile(message)
        else:
            logger.warning("Ignoring an unexpected message: %r", type(message).__name__)

    def _profile(self, message: ProfileControl) -> None:
        """Between steps (a step in flight is collected as usual afterwards); a bad call
        answers with its error and the core carries on."""
        try:
            if message.action == "start":
                self.core.start_profile(message.out_dir)
                result = ProfileResult("start")
            elif message.action == "stop":
                result = ProfileResult("stop", self.core.stop_profile())
            else:
                result = ProfileResult(message.action, error=f"unknown action {message.action!r}")
        except (RuntimeError, ValueError, OSError) as exc:
            result = ProfileResult(message.action, error=f"{type(exc).__name__}: {exc}")
        self._send(result)

    # ---- one step --------------------------------------------------------------------------

    def _step(self) -> None:
        if self._watchdog is None:
            outputs = self.core.step()
        else:
            self._watchdog.begin()
            try:
                outputs = self.core.step()
            finally:
                self._watchdog.end()
        scheduled = self._newly_scheduled(outputs)
        for out in outputs:
            if out.finish_reason is not None:
                self._live.pop(out.req_id, None)
        now = time.monotonic()
        stats = self._stats() if now - self._last_stats_time >= STATS_INTERVAL_S else None
        num_tokens = self.core.num_step_tokens
        if outputs or scheduled or stats is not None or num_tokens:
            self._send(CoreStepOutputs(outputs, scheduled, stats, now, num_tokens))

    def _newly_scheduled(self, outputs: list[EngineCoreOutput]) -> dict[str, float]:
        if not self._unscheduled:
            return {}
        scheduled: dict[str, float] = {}
        # Running requests cover all but those that finished in their first step; those are
        # in this step's outputs.
        candidates = [r.request_id for r in self.core.scheduler.running]
        candidates += [o.req_id for o in outputs]
        for rid in candidates:
            if rid in self._unscheduled:
                request = self._live.get(rid)
                if request is not None and request.first_scheduled_time is not None:
                    scheduled[rid] = request.first_scheduled_time
                    self._unscheduled.discard(rid)
        return scheduled

    def _send_idle_update(self) -> None:
        """Tell the front the final state once work runs out (kv usage back to 0 at once).
        Also the moment to check the workers: a rank that died while idle must not leave
        /health green until the next request (raises EngineDeadError, which ends the loop)."""
        now = time.monotonic()
        if now - self._last_health_check >= HEALTH_CHECK_INTERVAL_S:
            self._last_health_check = now
            self.core.executor.check_health()
        stats = self._stats(record=False)
        if stats != self._last_stats:
            self._record(stats)
            self._send(CoreStepOutputs([], {}, stats, time.monotonic()))

    def _stats(self, record: bool = True) -> CoreStats:
        used, total = self._gpu_memory.read()
        stats = CoreStats(self.core.stats(), used, total, self.core.parallel_stats())
        if record:
            self._record(stats)
        return stats

    def _record(self, stats: CoreStats) -> None:
        self._last_stats = stats
        self._last_stats_time = time.monotonic()

    def _send(self, message: Any) -> None:
        self._out.send(self._serializer.encode(message))

    # ---- failure and liveness --------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        logger.exception("Engine core failed; failing %d in-flight requests", len(self._live))
        message = f"{type(exc).__name__}: {exc}"
        errors = [EngineCoreOutput(rid, [], finish_reason="error", error=message)
                  for rid in self._live]
        self._live.clear()
        try:
            self._send(CoreStepOutputs(errors, {}, None, time.monotonic()))
            self._send(CoreFailed(message, traceback.format_exc()))
        except zmq.ZMQError:
            logger.exception("Could not report the failure to the front end")

    def _parent_alive(self) -> bool:
        now = time.monotonic()
        if now - self._last_parent_check < PARENT_CHECK_S and self.core.has_unfinished_requests():
            return True
        self._last_parent_check = now
        # Re-parented (to init or a subreaper) means the front end died.
        return os.getppid() == self._parent_pid


class _GpuMemoryProbe:
    """Per-GPU memory in use, through NVML where installed (every visible GPU, without making a
    CUDA context on each), else torch for the core's own device; nothing on CPU."""

    def __init__(self, device: str) -> None:
        self._enabled = device == "cuda"
        self._last = 0.0
        self._cached: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._nvml: Any = None
        if self._enabled:
            try:
                import pynvml
                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # not installed or no driver access: fall back to torch
                self._nvml = None

    def read(self) -> tuple[dict[int, int], dict[int, int]]:
        if not self._enabled:
            return self._cached
        now = time.monotonic()
        if now - self._last < GPU_MEMORY_INTERVAL_S:
            return self._cached
        self._last = now
        used: dict[int, int] = {}
        total: dict[int, int] = {}
        try:
            if self._nvml is not None:
                for i, handle in _visible_nvml_devices(self._nvml):
                    info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                    used[i], total[i] = int(info.used), int(info.total)
            else:
                import torch
                index = torch.cuda.current_device()
                free, all_bytes = torch.cuda.mem_get_info(index)
                used[index], total[index] = int(all_bytes - free), int(all_bytes)
        except Exception:  # a metrics probe must never take the engine down
            logger.debug("GPU memory probe failed", exc_info=True)
        self._cached = (used, total)
        return self._cached


def _visible_nvml_devices(nvml: Any) -> list[tuple[int, Any]]:
    """(host index, NVML handle) of the GPUs this process may use. NVML sees every GPU of the
    host and ignores CUDA_VISIBLE_DEVICES, so without this a -dp replica pinned to one GPU would
    also report its neighbours' (and a sum over replicas would count them twice)."""
    count = nvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    out = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            if int(entry) >= count:
                break  # CUDA stops at the first invalid entry too
            out.append((int(entry), nvml.nvmlDeviceGetHandleByIndex(int(entry))))
            continue
        try:  # a GPU-<uuid> (or MIG-<uuid>) entry
            handle = nvml.nvmlDeviceGetHandleByUUID(entry)
            out.append((int(nvml.nvmlDeviceGetIndex(handle)), handle))
        except Exception:
            break
    return out
