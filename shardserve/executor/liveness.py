"""Heartbeats both ways between the engine and its worker ranks (see executor/wire.py).

- `HeartbeatMonitor` (engine side, a thread): publishes the engine's beat and records when
  each rank was last heard; the executor asks it which ranks have gone silent. That is how a
  rank on another node (no process sentinel to watch) or a frozen local one is found dead.
- `WorkerHeartbeat` (worker side, a thread): sends the rank's beat and ends the process
  (os._exit, which works even while the main thread is stuck inside a collective) when the
  engine has been silent too long or, for a local rank, when its parent process is gone.
- `report_gone`: a rank leaving because its launcher is gone, or a node's launcher whose rank
  died, tells the engine on the beats channel (["gone", rank, why]). Without it a rank on
  another node is found dead only by its silence, heartbeat_timeout_s (10 s) later; a rank of
  node 0 has a process sentinel the executor watches instead.

Both run beside the main threads, so a long step neither delays beats nor looks like death.
The helpers at the end stop or kill a set of worker processes, or a process with all below it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any

import zmq

from shardserve.executor.wire import WireCodec

logger = logging.getLogger(__name__)

BEAT_INTERVAL_S = 0.5
ENGINE_RANK = -1
# How long a "gone" report may take to leave before the process exits (zmq sends from its
# own I/O thread, which os._exit would cut short).
GONE_SEND_S = 0.2


class HeartbeatMonitor:
    """The engine's side: beat out, listen for every rank's beat."""

    def __init__(self, context: zmq.Context, beats_out: list[str], beats_in: list[str],
                 codec: WireCodec, timeout_s: float) -> None:
        self._codec = codec
        self._timeout_s = timeout_s
        self._pub = context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pull = context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        try:
            for addr in beats_out:
                self._pub.bind(addr)
            for addr in beats_in:
                self._pull.bind(addr)
        except zmq.ZMQError:
            # A port in use: the executor then tears down and terminates the context, which
            # waits for every socket of it to close: left open, these hung start-up for ever.
            self._pub.close()
            self._pull.close()
            raise
        self._last_seen: dict[int, float] = {}
        self._gone: dict[int, str] = {}  # rank -> why, as reported (report_gone)
        self._expected: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardserve-heartbeat",
                                        daemon=True)
        self._thread.start()

    def expect(self, ranks: list[int]) -> None:
        """From now on these ranks must beat; silence is counted from this moment."""
        now = time.monotonic()
        with self._lock:
            for rank in ranks:
                self._expected.add(rank)
                self._last_seen.setdefault(rank, now)

    def silent_ranks(self) -> dict[int, float]:
        """Expected ranks unheard for longer than the timeout -> seconds of silence."""
        now = time.monotonic()
        with self._lock:
            return {r: now - self._last_seen[r] for r in sorted(self._expected)
                    if now - self._last_seen[r] > self._timeout_s}

    def gone_ranks(self) -> dict[int, str]:
        """Expected ranks reported gone (report_gone) -> why, first reported first (a rank's
        death makes its peers fail and go too: the first report names the cause)."""
        with self._lock:
            return {r: why for r, why in self._gone.items() if r in self._expected}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_INTERVAL_S + 1)

    def _run(self) -> None:
        beat = self._codec.encode(["beat", ENGINE_RANK])
        try:
            while not self._stop.is_set():
                self._pub.send(beat)
                deadline = time.monotonic() + BEAT_INTERVAL_S
                while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    if self._pull.poll(int(left * 1000) + 1):
                        self._drain()
        except zmq.ZMQError:
            if not self._stop.is_set():
                logger.exception("Heartbeat monitor failed")
        finally:
            self._pub.close()
            self._pull.close()

    def _drain(self) -> None:
        now = time.monotonic()
        while True:
            try:
                message = self._codec.decode(self._pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if message[0] == "beat":
                with self._lock:
                    self._last_seen[int(message[1])] = now
            elif message[0] == "gone":
                with self._lock:
                    self._gone.setdefault(int(message[1]), str(message[2]))


class WorkerHeartbeat:
    """A rank's side: beat to the engine; leave if the engine (or the parent) is gone."""

    def __init__(self, context: zmq.Context, beats_out: str, beats_in: str, rank: int,
                 codec: WireCodec, timeout_s: float, parent_sentinel: int | None) -> None:
        self._rank = rank
        self._timeout_s = timeout_s
        self._parent_sentinel = parent_sentinel
        self._codec = codec
        self._engine = EngineBeats(context, beats_out)
        self._push = context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDHWM, 16)  # never pile beats up for a gone engine
        self._push.connect(beats_in)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardserve-heartbeat",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_INTERVAL_S + 1)

    def _run(self) -> None:
        beat = self._codec.encode(["beat", self._rank])
        last_heard = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    self._push.send(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass
                if self._engine.heard(BEAT_INTERVAL_S):
                    last_heard = time.monotonic()
                if self._stop.is_set():
                    break
                silent = time.monotonic() - last_heard
                if silent > self._timeout_s:
                    _die(f"rank {self._rank}: the engine has been silent for {silent:.1f} s "
                         "(node 0 is gone); exiting")
                if self._parent_sentinel is not None and wait([self._parent_sentinel], 0):
                    why = "the process that started it is gone"
                    report_gone(self._push, self._codec, self._rank, f"left: {why}")
                    _die(f"rank {self._rank}: {why}; exiting")
        finally:
            self._engine.close()
            self._push.close()


class EngineBeats:
    """Node 0's engine heartbeats, as a subscriber hears them: a rank's heartbeat thread, and
    a node's launcher (headless.py), which kills ranks left behind once they stop."""

    def __init__(self, context: zmq.Context, beats_out: str) -> None:
        self._sub = context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(beats_out)

    def heard(self, timeout_s: float = 0.0) -> bool:
        """Whether a beat came, waiting up to timeout_s for one; every queued beat is read."""
        if not self._sub.poll(int(timeout_s * 1000)):
            return False
        while True:
            try:
                self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True

    def close(self) -> None:
        self._sub.close()


def report_gone(push: zmq.Socket, codec: WireCodec, rank: int, why: str) -> None:
    """Tell the engine (push: a PUSH socket connected to its beats channel) that `rank` is
    gone and why, waiting up to GONE_SEND_S for the message to leave; best effort (an engine
    that is gone too hears nothing, and silence still gives the rank away)."""
    try:
        push.send(codec.encode(["gone", rank, why]), zmq.NOBLOCK)
        time.sleep(GONE_SEND_S)
    except zmq.ZMQError:
        pass


def _die(message: str) -> None:
    logger.error(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


# ---- ending worker processes -------------------------------------------------------------

def process_stopped(pid: int) -> bool:
    """Whether a live process is stopped (SIGSTOP, a debugger): state T or t in /proc. Such a
    rank never checks in or beats, yet has not exited. False where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # after "(comm)", which may hold spaces
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def stop_processes(procs: dict[int, Any], grace_s: float, force: bool = False) -> None:
    """Wait up to grace_s for the processes to leave after "stop", then terminate (or, with
    force, kill at once: a failed world's ranks may be stuck in a collective or stopped).
    Every wait after the grace is shared by all processes, so the whole stop stays under
    grace_s + 3 s however many ranks hang (the engine core's own stop is bounded too, and
    a core killed half-way would orphan the ranks it had not stopped yet)."""
    deadline = time.monotonic() + grace_s
    for proc in procs.values():
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs.values():
        if proc.is_alive():
            proc.kill() if force else proc.terminate()
    _join_all(procs.values(), 2.0)
    for proc in procs.values():
        if proc.is_alive():
            proc.kill()
    _join_all(procs.values(), 1.0)


def _join_all(procs: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))


def arm_exit_watchdog(timeout_s: float, code: int, what: str) -> threading.Event:
    """End this process with `code` unless the returned event is set within timeout_s.

    For tear-down that can block for ever: destroying NCCL communicators whose peers already
    left has been seen to hang (4 x H200, a pipeline stage's ranks lived on for minutes after
    their engine, holding 115 GiB each). os._exit from a thread works while the main thread
    is stuck inside such a call, and the driver frees the GPU memory."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(timeout_s):
            logger.warning("%s did not finish in %.0f s; exiting now", what, timeout_s)
            logging.shutdown()
            os._exit(code)

    threading.Thread(target=watch, name="shardserve-exit-watchdog", daemon=True).start()
    return done


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; empty where it cannot be read)."""
    out, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += children
            stack += children
    return out


def kill_process_tree(proc: Any) -> None:
    """SIGKILL `proc` (a multiprocessing.Process or a subprocess.Popen) and every process below
    it. The ranks below an engine core leave by themselves once it is gone, by watching it; a
    rank that is stopped or hung cannot (and is often why the core is being killed): it would
    be left for ever, holding its GPU. They are listed first: once `proc` is gone they are
    re-parented and can no longer be found."""
    pids = descendant_pids(proc.pid)
    proc.kill()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_processes_and_remove(procs: dict[int, Any], directory: str | None) -> None:
    """Last resort (garbage collection or interpreter exit) and the ipc directory's clean-up."""
    for proc in procs.values():
        if proc.is_alive():
            proc.kill()
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
