"""How long the API server takes to decode one step's outputs from the engine core (the msgpack
wire, engine/serial.py): a CoreStepOutputs with one new token for each of N running requests.

    python benchmarks/wire_decode.py [--requests 256] [--repeats 200]

The engine core sends one such message per step, so at a step every ~13 ms (batch 256 on an
H200) this is a share of the API server's time per step, beside detokenizing and streaming.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardserve.engine.core_messages import CoreStepOutputs, make_serializer  # noqa: E402
from shardserve.engine.outputs import EngineCoreOutput  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    serializer = make_serializer()
    message = CoreStepOutputs(
        outputs=[EngineCoreOutput(req_id=f"cmpl-{i:032x}-0", new_token_ids=[1000 + i])
                 for i in range(args.requests)], scheduled={}, timestamp=1.0)
    data = serializer.encode(message)
    assert serializer.decode(data) == message
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.repeats):
            serializer.decode(data)
        times.append((time.perf_counter() - start) / args.repeats)
    best = min(times)
    print(f"{args.requests} requests' outputs, {len(data):,} bytes: decode {best * 1e6:.0f} us "
          f"(best of 5 x {args.repeats}), {best * 1e9 / args.requests:.0f} ns per request")


if __name__ == "__main__":
    main()
