"""The front end's handle on an engine core process: spawn it, talk to it, notice its exit.

    CoreProcClient.send(msg) ── msgpack ── PUSH ipc://<tmp>/input  ──▶ core (engine/core_proc.py)
    CoreProcClient.recv()    ◀─ msgpack ── PULL ipc://<tmp>/output ◀── core

The front binds both sockets and the core connects. Sends never block the event loop (the
input queue is unbounded and the core drains it every step); receives are awaited on the loop.
The process's sentinel is watched on the loop too, so a crash (even SIGKILL, which sends no
message) is noticed at once. A core that stops without exiting (SIGSTOP, a frozen host) sends
nothing and never exits: its heartbeat (a shared counter its own thread counts up) is watched,
and after heartbeat_timeout_s of silence the core is killed, which the sentinel then reports
like any crash, with `kill_reason` saying why. Whenever the front kills the core, it kills the
processes below it too (its ranks): one of them stopped or hung would never leave by itself.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from shardserve.config import EngineConfig
from shardserve.engine.core_messages import ShutdownCore, make_serializer
from shardserve.engine.core_proc import BEAT_INTERVAL_S, run_engine_core
from shardserve.executor.liveness import kill_process_tree

logger = logging.getLogger(__name__)


class CoreProcClient:
    def __init__(self, config: EngineConfig, log_level: int) -> None:
        self._config = config
        self._log_level = log_level
        self._serializer = make_serializer()
        self._proc: Any = None
        self._ipc_dir: str | None = None
        self._zmq: zmq.Context | None = None
        self._zmq_async: zmq.asyncio.Context | None = None
        self._in_sock: zmq.Socket | None = None
        self._out_sock: zmq.asyncio.Socket | None = None
        self._closed = False
        self._beat: Any = None  # the core's heartbeat count (0: not beating yet)
        self._watch: asyncio.Task | None = None
        self.kill_reason: str | None = None  # set when the front killed a frozen core

    async def start(self, on_exit: Callable[[], None]) -> None:
        """Bind the sockets and spawn the core; `on_exit` runs on the loop when it exits."""
        self._ipc_dir = tempfile.mkdtemp(prefix="shardserve-")
        input_addr, output_addr = f"ipc://{self._ipc_dir}/input", f"ipc://{self._ipc_dir}/output"
        self._zmq = zmq.Context()
        self._in_sock = self._zmq.socket(zmq.PUSH)
        self._in_sock.setsockopt(zmq.SNDHWM, 0)  # unbounded: a send never blocks the loop
        self._in_sock.bind(input_addr)
        self._zmq_async = zmq.asyncio.Context()
        self._out_sock = self._zmq_async.socket(zmq.PULL)
        self._out_sock.setsockopt(zmq.RCVHWM, 0)
        self._out_sock.bind(output_addr)
        # spawn, not fork: the front may hold threads and (on GPU hosts) must not pass a CUDA
        # context to the child.
        ctx = multiprocessing.get_context("spawn")
        self._beat = ctx.RawValue("Q", 0)
        self._proc = ctx.Process(target=run_engine_core, name="EngineCore",
                                 args=(self._config, input_addr, output_addr, os.getpid(),
                                       self._log_level, self._beat))
        await asyncio.to_thread(self._proc.start)
        weakref.finalize(self, _kill_process, self._proc)
        loop = asyncio.get_running_loop()
        sentinel = self._proc.sentinel

        def exited() -> None:
            loop.remove_reader(sentinel)
            if not self._closed:
                on_exit()

        loop.add_reader(sentinel, exited)
        self._watch = loop.create_task(self._watch_heartbeat(), name="CoreProcClient.heartbeat")

    async def _watch_heartbeat(self) -> None:
        """Kill the core once its heartbeat has not moved for heartbeat_timeout_s. Silence
        counts from its first beat (spawning and importing torch take a while before it), and
        on this process's clock: time this loop itself did not run (the front stopped too,
        e.g. Ctrl-Z then fg) is not held against the core."""
        timeout = self._config.parallel_config.heartbeat_timeout_s
        last_beat, heard_at, checked_at = 0, 0.0, time.monotonic()
        while not self._closed:
            await asyncio.sleep(BEAT_INTERVAL_S)
            now, beat = time.monotonic(), self._beat.value
            if beat != last_beat or (beat and now - checked_at > timeout):
                last_beat, heard_at = beat, now
            checked_at = now
            silent = now - heard_at
            if not beat or silent <= timeout or self._closed or not self._proc.is_alive():
                continue
            self.kill_reason = (f"(pid {self._proc.pid}) stopped answering: no heartbeat "
                                f"for {silent:.1f} s (heartbeat_timeout_s {timeout:g}); it is "
                                "stopped or frozen and was killed")
            logger.error("The engine core %s", self.kill_reason)
            kill_process_tree(self._proc)  # SIGKILL ends a stopped process too; its ranks with it
            return

    @property
    def exitcode(self) -> int | None:
        if self._proc is None:
            return None
        self._proc.join(0)
        return self._proc.exitcode

    def send(self, message: Any) -> bool:
        """Queue message for the core; False where it cannot be (closed, or the core has not
        connected yet: still starting)."""
        if self._in_sock is None or self._closed:
            return False
        try:
            self._in_sock.send(self._serializer.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False  # no core connected yet (or its queue is full): nothing to trace
        except zmq.ZMQError:
            logger.warning("Could not send %s to the engine core", type(message).__name__,
                           exc_info=True)
            return False
        return True

    async def recv(self) -> Any:
        return self._serializer.decode(await self._out_sock.recv())

    async def shutdown(self, timeout: float, loading: bool = False) -> None:
        """ShutdownCore, then SIGKILL after `timeout` s; close the sockets. loading: the core
        has not said it is ready, so it has nothing to drain and reads no message before its
        load ends: it is killed at once (it ignores SIGTERM; its ranks follow their parent)."""
        if self._watch is not None:
            self._watch.cancel()
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                if loading or not self.send(ShutdownCore()):
                    kill_process_tree(proc)
                await asyncio.to_thread(proc.join, timeout)
            if proc.is_alive():
                logger.warning("Engine core did not exit in %.0f s; killing it", timeout)
                kill_process_tree(proc)
                await asyncio.to_thread(proc.join, 5.0)
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
        self._closed = True
        for sock in (self._in_sock, self._out_sock):
            if sock is not None:
                sock.close(linger=0)
        for context in (self._zmq, self._zmq_async):
            if context is not None:
                context.term()
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _kill_process(proc: Any) -> None:
    """Last resort when the front end exits without shutdown(): no orphaned core (or rank)."""
    if proc.is_alive():
        kill_process_tree(proc)
