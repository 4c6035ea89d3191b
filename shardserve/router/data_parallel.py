"""`shardserve serve --data-parallel-size N`: N replica servers behind one router.

Each replica is a full `shardserve serve` child process (its own engine core, TP x PP workers
and devices) listening on a free 127.0.0.1 port; this process runs the router on --port. Why
processes rather than N engines inside one HTTP process: a replica that crashes (or is killed)
takes nothing else down, the router's failover and health logic is the same code that fronts
replicas in separate pods, and each replica's /metrics stays exactly a single server's. The
front port's /metrics is the whole deployment: the router's series and every replica's, labelled
replica="0" .. "N-1" (router/metrics.py).

Devices: on CUDA replica r sees GPUs [r * tp * pp, (r + 1) * tp * pp) of this process's visible
ones (through CUDA_VISIBLE_DEVICES). Seeds are not offset: the same request seed gives the same
output as with DP 1. Children get SIGTERM when this process dies (PR_SET_PDEATHSIG); SIGTERM here
drains the replicas (they finish what they hold) and then stops; SIGINT stops at once. A replica
that exits before it was ever ready stops the whole command (exit code 1: its start-up error
would only repeat). One that exits later is restarted (up to `MAX_RESTARTS` times); meanwhile
the router sends its traffic elsewhere. So is one that stays hung or frozen (it answered
before, and now accepts connections but has answered no health probe for `HUNG_AFTER_S`): its
process tree is killed first.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from shardserve import __version__
from shardserve.errors import InvalidRequestError
from shardserve.executor.liveness import kill_process_tree
from shardserve.router.app import RouterArgs, build_router_app
from shardserve.router.backends import Backend, BackendPool, DiscoveryConfig
from shardserve.router.proxy import ProxyConfig
from shardserve.server.args import CorsArgs
from shardserve.server.listen import INHERITED_FD_ENV, bound_port, listen_socket, serving_socket

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
# A replica whose health probes have all timed out for this long is killed (and restarted).
# Its own engine dies within heartbeat_timeout_s (10 s) of a frozen core or rank; this is for
# the replica's server process itself stopping (SIGSTOP, a stalled event loop).
HUNG_AFTER_S = 15.0
# Set per replica (or pinned after 'auto' is resolved): dropped from the command line it inherits.
_REPLICA_ONLY = {"--port", "--host", "--data-parallel-size", "-dp", "--tensor-parallel-size", "-tp",
                 "--pipeline-parallel-size", "-pp"}


@dataclass
class Replica:
    index: int
    port: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    # Set once it was healthy (or this process killed it as hung). One that exits before
    # that failed at start-up (a flag, the model or the device that only loading finds
    # wrong): restarting it would fail the same way, so the whole command stops with its
    # error instead (as vLLM's DP start-up does).
    may_restart: bool = False
    started_at: float = 0.0  # monotonic time of the last start()
    # Its port's listening socket, bound by this process and handed to the next start().
    sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the replica on its port. The socket is bound here and inherited by the child
        (serving_socket), so nothing else can take the port in between; this process's copy is
        closed once the child has it, so the port refuses connections (and the router sends
        them elsewhere) as soon as the replica dies. A restart binds the same port again."""
        self.started_at = time.monotonic()
        if self.sock is None:
            try:
                self.sock = listen_socket("127.0.0.1", self.port)
            except InvalidRequestError as exc:
                # Taken since the last one died: the child tries to bind it itself and, failing,
                # is restarted again (MAX_RESTARTS).
                logger.warning("Replica %d: %s", self.index, exc)
        env, fds = self.env, ()
        if self.sock is not None:
            fd = self.sock.fileno()
            env, fds = {**self.env, INHERITED_FD_ENV: str(fd)}, (fd,)
        # Its own process group: a terminal's Ctrl-C reaches this process alone, which passes
        # one SIGINT on (signal_all) after setting `stopping`. With the group's SIGINT too, a
        # replica got two (the second cut its shutdown short, with a uvicorn traceback), and
        # could exit before `stopping` was set, to be taken for a start-up failure.
        try:
            self.proc = subprocess.Popen(self.argv, env=env, pass_fds=fds,
                                         preexec_fn=_die_with_parent, process_group=0)
        finally:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
        logger.info("Replica %d started (pid %d) on %s", self.index, self.proc.pid, self.url)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def strip_options(argv: list[str], options: set[str]) -> list[str]:
    """argv without `--opt value` / `--opt=value` for every option in `options`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _device_slices(num_replicas: int, ranks_per_replica: int, device: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each replica, or None (CPU: nothing to split)."""
    if device == "cpu":
        return [None] * num_replicas
    import torch
    if not torch.cuda.is_available():
        if device == "cuda":
            raise InvalidRequestError("device='cuda' was asked for but no CUDA GPU is visible.",
                                      "device")
        return [None] * num_replicas
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible else
           [str(i) for i in range(torch.cuda.device_count())])
    need = num_replicas * ranks_per_replica
    if len(ids) < need:
        raise InvalidRequestError(
            f"data_parallel_size={num_replicas} x {ranks_per_replica} GPUs per replica needs "
            f"{need} GPUs; {len(ids)} are visible.", "data_parallel_size")
    return [",".join(ids[r * ranks_per_replica:(r + 1) * ranks_per_replica])
            for r in range(num_replicas)]


def replica_argv(argv: list[str]) -> list[str]:
    """The child's command line: this one's, minus --port/--host/-dp (set per replica)."""
    return [sys.executable, "-m", "shardserve.cli",
            *strip_options(argv, _REPLICA_ONLY)]


def run_data_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    # Check the settings here, once: a flag that does not fit the model (TP, PP, model path)
    # is one clear error, not every replica failing and being restarted. 'auto' sizes are
    # picked by the planner in the same step and pinned for the replicas.
    from shardserve.engine_args import engine_config_from_args
    # First of all: a taken --port fails now, not after the settings are read and replicas load.
    sock = serving_socket(args.host, args.port)
    args.port = bound_port(sock)
    try:
        pc = engine_config_from_args(args).resolve().parallel_config
    except BaseException:
        sock.close()
        raise
    tp, pp, num = pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size
    if int(num) == 1:
        from shardserve.server.app import run_server
        return run_server(args, sock)
    num = int(num)
    slices = _device_slices(num, int(tp) * int(pp), args.device)
    base = replica_argv(argv) + ["--tensor-parallel-size", str(tp),
                                 "--pipeline-parallel-size", str(pp)]
    replicas = []
    for r in range(num):
        replica_sock = listen_socket("127.0.0.1", 0)
        port = bound_port(replica_sock)
        env = dict(os.environ)
        if slices[r] is not None:
            env["CUDA_VISIBLE_DEVICES"] = slices[r]
        replicas.append(Replica(r, port, base + ["--host", "127.0.0.1", "--port", str(port),
                                                 "--data-parallel-size", "1"], env,
                                sock=replica_sock))
    router_args = RouterArgs(
        discovery=DiscoveryConfig(static=[r.url for r in replicas]), policy=args.policy,
        host=args.host, port=args.port, health_interval_s=args.health_interval,
        proxy=ProxyConfig(max_retries=args.max_retries, max_waiting=args.max_waiting,
                          max_in_flight=args.max_in_flight, prefix_chars=args.prefix_chars),
        max_imbalance=args.max_imbalance, read_timeout_s=args.read_timeout,
        uvicorn_log_level=args.uvicorn_log_level, cors=CorsArgs.from_namespace(args))
    supervisor = Supervisor(replicas)

    def on_startup(pool: BackendPool) -> None:
        supervisor.start(pool)

    app = build_router_app(router_args, on_startup)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            log_level=args.uvicorn_log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=int(max(args.shutdown_timeout, 1)))
    server = _FrontServer(config, supervisor, args.shutdown_timeout)
    supervisor.on_give_up = server.give_up
    print(f"shardserve {__version__}: {num} data-parallel replicas behind "
          f"http://{args.host}:{args.port} ({args.policy}); replicas on "
          f"{', '.join(r.url for r in replicas)}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        supervisor.stop(signal.SIGINT, timeout=10)
    return server.exit_code


class Supervisor:
    """Starts the replica processes, restarts one that dies, stops them all."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.stopping = False
        self.pool: BackendPool | None = None  # the router's, once started
        self._task: asyncio.Task | None = None
        # Called once every replica is dead for good (restarts used up): nothing is left to
        # serve, so the front exits non-zero instead of answering 503 forever.
        self.on_give_up: Callable[[], None] | None = None

    def start(self, pool: BackendPool) -> None:
        self.pool = pool
        for r in self.replicas:
            r.start()
            pool.add(r.url, pid=r.proc.pid, name=str(r.index))
        self._task = asyncio.get_running_loop().create_task(self._watch(pool))

    async def _watch(self, pool: BackendPool) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for r in self.replicas:
                if self.stopping or r.proc is None:
                    continue
                if r.proc.poll() is None:
                    backend = pool.add(r.url)
                    r.may_restart = r.may_restart or backend.healthy
                    self._kill_if_hung(r, backend)
                    continue
                backend = pool.add(r.url)
                r.may_restart = r.may_restart or backend.healthy  # ready since the last round
                backend.mark_down(f"replica process exited with {r.proc.returncode}")
                if not r.may_restart:
                    logger.error("Replica %d exited with %s before it was ever ready (its "
                                 "error is above); stopping.", r.index, r.proc.returncode)
                    self._give_up()
                    return
                if r.restarts >= MAX_RESTARTS:
                    continue
                r.restarts += 1
                logger.warning("Replica %d exited with %s; restarting it (%d/%d)", r.index,
                               r.proc.returncode, r.restarts, MAX_RESTARTS)
                r.start()
                backend.pid = r.proc.pid
            if not self.stopping and all(r.proc.poll() is not None and r.restarts >= MAX_RESTARTS
                                         for r in self.replicas if r.proc is not None):
                logger.error("Every replica exited %d times; giving up.", MAX_RESTARTS + 1)
                self._give_up()

    def _give_up(self) -> None:
        self.stopping = True
        if self.on_give_up is not None:
            self.on_give_up()

    @staticmethod
    def _kill_if_hung(r: Replica, backend: Backend) -> None:
        since = backend.unanswered_since
        if since is None or time.monotonic() - since < HUNG_AFTER_S:
            return
        if backend.answered_at <= r.started_at:
            # Still starting: its port is bound before the model is resolved and the app
            # built, which can take longer than HUNG_AFTER_S on a busy host.
            return
        logger.error("Replica %d (pid %d) has answered no health probe for %.0f s: hung or "
                     "frozen; killing it", r.index, r.proc.pid, time.monotonic() - since)
        backend.unanswered_since = None
        r.may_restart = True  # our kill, not a start-up error
        # Its engine core and ranks too: stopped with it, they would not leave by themselves.
        kill_process_tree(r.proc)
        # A later round restarts it, like any replica that exited.

    def signal_all(self, sig: int) -> None:
        self.stopping = True
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(sig)

    def alive(self) -> bool:
        return any(r.proc is not None and r.proc.poll() is None for r in self.replicas)

    def stop(self, sig: int, timeout: float) -> None:
        self.signal_all(sig)
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            if r.proc is None:
                continue
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # With its engine core and ranks: a frozen rank, which may be what kept the
                # replica from stopping, would outlive it (and hold its GPU) otherwise.
                kill_process_tree(r.proc)
                r.proc.wait(5)


class _FrontServer(uvicorn.Server):
    """SIGTERM: drain the replicas (they refuse new work and finish what they hold; the router
    answers 503 once none is healthy), then stop. SIGINT: stop now."""

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.supervisor = supervisor
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and not self.should_exit:
            self._draining = True
            if self.supervisor.pool is not None:
                self.supervisor.pool.draining = True
            self.supervisor.signal_all(signal.SIGTERM)
            asyncio.get_event_loop().call_soon_threadsafe(self._begin_drain)
            return
        self.supervisor.signal_all(signal.SIGINT)
        super().handle_exit(sig, frame)

    def give_up(self) -> None:
        self.exit_code = 1
        self.should_exit = True

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout + 5
        while self.supervisor.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.should_exit = True
