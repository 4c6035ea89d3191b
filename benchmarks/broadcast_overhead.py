"""Per-step cost of broadcasting the SchedulerOutput to the worker ranks (no model).

The executor msgpack-encodes each step once and publishes it on one ZMQ PUB socket (ipc://);
every rank's SUB receives and decodes it (executor/wire.py). This measures, for realistic
steps, the engine-side encode+send time and the one-way latency until the slowest rank has
decoded the step (same host: CLOCK_MONOTONIC is shared), over N subscriber processes:

    python benchmarks/broadcast_overhead.py --ranks 2 --iters 2000
    python benchmarks/broadcast_overhead.py --ranks 8 --batch 256

Steps measured:
  decode-1      one running request (batch-1 latency)
  decode-B      B running requests, one new token each (the steady state)
  prefill-B     B new requests of --prompt-len tokens each (first step of a burst)
  empty         an empty step (the floor: transport and wake-up only)
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import zmq

from shardserve.engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from shardserve.executor.wire import Endpoints, WireCodec
from shardserve.sampling_params import SamplingParams


def _decode_step(batch: int) -> SchedulerOutput:
    cached = [CachedRequestData(f"req-{i}", [1000 + i], [], 500 + i) for i in range(batch)]
    return SchedulerOutput([], cached, {c.req_id: 1 for c in cached}, batch, set())


def _prefill_step(batch: int, prompt_len: int) -> SchedulerOutput:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=1000)
    new = [NewRequestData(f"req-{i}", list(range(prompt_len)), [], params,
                          list(range(i * 64, i * 64 + prompt_len // 16 + 1)), 0, [2])
           for i in range(batch)]
    return SchedulerOutput(new, [], {n.req_id: prompt_len for n in new}, batch * prompt_len,
                           set())


def _subscriber(endpoints: Endpoints, rank: int) -> None:
    codec = WireCodec()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoints.steps)
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoints.results)
    said_hello = False
    while True:
        message = codec.decode(sub.recv())
        done = time.monotonic()
        if message[0] == "stop":
            return
        if message[0] == "ping":
            if not said_hello:
                push.send(codec.encode(["hello", rank]))
                said_hello = True
            continue
        push.send(codec.encode(["ack", message[1], rank, done]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1000)
    args = parser.parse_args()

    codec = WireCodec()
    endpoints = Endpoints.ipc()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoints.steps)
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoints.results)
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_subscriber, args=(endpoints, r), daemon=True)
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    hello: set[int] = set()
    while len(hello) < args.ranks:  # the rendezvous of the real executor, in short
        pub.send(codec.encode(["ping"]))
        if pull.poll(100):
            hello.add(codec.decode(pull.recv())[1])

    steps = {"empty": SchedulerOutput([], [], {}, 0, set()),
             "decode-1": _decode_step(1),
             f"decode-{args.batch}": _decode_step(args.batch),
             f"prefill-{args.batch // 8}x{args.prompt_len}": _prefill_step(max(1, args.batch // 8),
                                                                         args.prompt_len)}
    print(f"{args.ranks} subscriber processes, {args.iters} steps each (µs; median / p99)")
    print(f"{'step':<22}{'bytes':>10}{'encode+send':>18}{'to last rank':>18}{'decode alone':>16}")
    while pull.poll(200):  # answers to the last pings
        pull.recv()
    for name, step in steps.items():
        iters = args.iters if "prefill" not in name else max(20, args.iters // 20)
        send_us, latency_us = [], []
        data = b""
        for seq in range(iters):
            t0 = time.monotonic()
            data = codec.encode_step(seq, t0, step)
            pub.send(data, copy=False)
            send_us.append((time.monotonic() - t0) * 1e6)
            last = 0.0
            for _ in range(args.ranks):
                ack = codec.decode(pull.recv())
                last = max(last, ack[3])
            latency_us.append((last - t0) * 1e6)
        start = time.perf_counter()
        for _ in range(min(iters, 200)):
            codec.decode(data)
        decode_us = (time.perf_counter() - start) / min(iters, 200) * 1e6
        print(f"{name:<22}{len(data):>10}{_fmt(send_us):>18}{_fmt(latency_us):>18}"
              f"{decode_us:>16.1f}")
    pub.send(codec.encode(["stop"]))
    for p in procs:
        p.join(5)


def _fmt(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values):.0f} / {values[int(len(values) * 0.99) - 1]:.0f}"


if __name__ == "__main__":
    main()
