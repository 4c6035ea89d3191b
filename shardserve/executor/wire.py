"""The executor <-> worker wire: endpoints and messages (msgpack via engine/serial.py).

    engine process (node 0)                             every rank (worker process)
    ───────────────────────                             ───────────────────────────
    main thread   PUB  steps   ── ping | go | step | call | stop ──▶ SUB   main thread
                  PULL results ◀── hello | ready | out | ret | err ── PUSH
    monitor       PUB  beats   ── beat (engine alive) ────────────▶ SUB   heartbeat thread
    thread        PULL beats   ◀── beat (rank alive) ────────────── PUSH

One PUB fans each step out to every rank as the SchedulerOutput diff the scheduler already
made (no per-rank copies, no pickle); only the driver rank answers a step. Heartbeats run on
their own sockets and threads, so a rank busy in a long step (or stuck in a collective) still
beats, and a dead engine is noticed by workers that are blocked in one.

Messages are msgpack arrays whose first element names the kind:

    ["ping"]                                  rendezvous: "answer hello" (repeated until all did)
    ["hello", rank, host, pid]
    ["go", setup dict]                        everyone checked in: join torch.distributed, load
    ["ready", rank, info dict]                model loaded
    ["step", seq, t_sent, SchedulerOutput]
    ["out", seq, rank, ModelRunnerOutput, step stats dict]     driver only
    ["call", seq, method, args, reply_ranks or None (= all)]
    ["ret", seq, rank, value]
    ["err", seq, rank, error type name, message, traceback]
    ["stop"]
    ["beat", rank]                            (beats sockets; the engine's beat has rank -1)

Single node: ipc:// sockets in a private directory. Multi-node: node 0 also binds TCP on
master_port + 1 .. + 4 (torch.distributed's store takes master_port itself).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from shardserve.engine.outputs import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                       SchedulerOutput, TokenLogprobs)
from shardserve.engine.serial import Serializer
from shardserve.sampling_params import SamplingParams

WIRE_CLASSES = (SchedulerOutput, NewRequestData, CachedRequestData, SamplingParams,
                ModelRunnerOutput, TokenLogprobs)

# Offsets from master_port of node 0's engine sockets in a multi-node world.
_TCP_OFFSETS = {"steps": 1, "results": 2, "beats_out": 3, "beats_in": 4}


def make_wire_serializer() -> Serializer:
    return Serializer(WIRE_CLASSES)


@dataclass(frozen=True)
class Endpoints:
    """Where the four sockets are, as a worker connects to them."""

    steps: str
    results: str
    beats_out: str
    beats_in: str

    @classmethod
    def ipc(cls, directory: str | None = None) -> "Endpoints":
        directory = directory or tempfile.mkdtemp(prefix="shardserve-exec-")
        return cls(*(f"ipc://{os.path.join(directory, name)}" for name in _TCP_OFFSETS))

    @classmethod
    def tcp(cls, host: str, master_port: int) -> "Endpoints":
        return cls(*(f"tcp://{host}:{master_port + off}" for off in _TCP_OFFSETS.values()))

    def bind_addresses(self) -> "Endpoints":
        """TCP endpoints as node 0 binds them (every interface); ipc ones unchanged."""
        def bind(addr: str) -> str:
            if not addr.startswith("tcp://"):
                return addr
            return "tcp://*:" + addr.rsplit(":", 1)[1]
        return Endpoints(*(bind(a) for a in (self.steps, self.results, self.beats_out,
                                             self.beats_in)))

    def ipc_directory(self) -> str | None:
        if self.steps.startswith("ipc://"):
            return os.path.dirname(self.steps[len("ipc://"):])
        return None
