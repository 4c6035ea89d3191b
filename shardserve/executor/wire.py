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

Messages are msgpack arrays whose first element names the kind (steps take a columnar fast
path, see WireCodec):

    ["ping"]                                  rendezvous: "answer hello" (repeated until all did;
                                              one after "go" is another engine's: ranks exit)
    ["hello", rank, host, pid]
    ["go", setup dict]                        everyone checked in: join torch.distributed, load
    ["ready", rank, info dict]                model loaded
    ["step", seq, t_sent, SchedulerOutput]
    ["out", seq, rank, ModelRunnerOutput, step stats dict]     driver only
    ["call", seq, method, args, reply_ranks or None (= all)]
    ["ret", seq, rank, value]
    ["err", seq, rank, error type name, message, traceback]
    ["stop", why or None]                     why: the engine failed (ranks then exit 3)
    ["beat", rank]                            (beats sockets; the engine's beat has rank -1)

Single node: ipc:// sockets in a private directory. Multi-node: node 0 also binds TCP on
master_port + 1 .. + 4 (torch.distributed's store takes master_port itself).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import msgpack

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


_STEP_TAG = b"S"  # a step in the columnar layout below
_MESSAGE_TAG = b"M"  # anything else, through the dataclass Serializer


class WireCodec:
    """Encodes the wire's messages; steps get a columnar fast path.

    A decode step of B running requests is B CachedRequestData records. Through the generic
    Serializer each costs a Python hook call per object and per list, on both sides (~5 µs a
    request: milliseconds per step at batch 256). A step is therefore sent as columns of
    plain values that msgpack packs and unpacks in C, and the records are rebuilt on the
    worker; only new requests (rare, carrying SamplingParams) go through the Serializer:

        "S" + msgpack [seq, t_sent, new_reqs (Serializer bytes or nil), req_ids,
                       new_token_ids, new_block_ids, num_computed_tokens,
                       num_scheduled_tokens (map, batch order), total, finished ids, step_id]
    """

    def __init__(self) -> None:
        self.serializer = make_wire_serializer()
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, message: list[Any]) -> bytes:
        return _MESSAGE_TAG + self.serializer.encode(message)

    def encode_step(self, seq: int, t_sent: float, out: SchedulerOutput) -> bytes:
        cached = out.scheduled_cached_reqs
        new = self.serializer.encode(out.scheduled_new_reqs) if out.scheduled_new_reqs else None
        return _STEP_TAG + self._packer.pack([
            seq, t_sent, new, [c.req_id for c in cached], [c.new_token_ids for c in cached],
            [c.new_block_ids for c in cached], [c.num_computed_tokens for c in cached],
            out.num_scheduled_tokens, out.total_num_scheduled_tokens,
            list(out.finished_req_ids), out.step_id])

    def decode(self, data: bytes) -> list[Any]:
        """-> the message as a list whose first element is its kind; a step decodes to
        ["step", seq, t_sent, SchedulerOutput]."""
        view = memoryview(data)[1:]
        if data[:1] != _STEP_TAG:
            return self.serializer.decode(view)
        (seq, t_sent, new, req_ids, token_ids, block_ids, num_computed, num_scheduled, total,
         finished, step_id) = msgpack.unpackb(view, raw=False, use_list=True)
        out = SchedulerOutput(
            scheduled_new_reqs=self.serializer.decode(new) if new is not None else [],
            scheduled_cached_reqs=list(map(CachedRequestData, req_ids, token_ids, block_ids,
                                           num_computed)),
            num_scheduled_tokens=num_scheduled, total_num_scheduled_tokens=total,
            finished_req_ids=set(finished), step_id=step_id)
        return ["step", seq, t_sent, out]


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
