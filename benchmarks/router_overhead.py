"""What `shardserve router` (and so `serve -dp N`'s front) costs a streamed answer: SSE events a
second straight to stand-in replicas against the same streams through the router, one run.

    python benchmarks/router_overhead.py [--streams 256] [--events 256] [--gap-ms 10]

The stand-ins are separate processes that stream `--events` completion chunks per request,
`--gap-ms` apart, as fast as an engine might; the client is another process. The bound is the
stand-ins' own pace: streams x 1000 / gap-ms events a second. On a machine with few cores the
client, the stand-ins and the router share them, so run it where there are spare cores for
figures that are the router's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.serve_layouts import free_port, http_get  # noqa: E402


def serve_stand_in(port: int, events: int, gap_s: float) -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse('shardserve:num_requests_waiting{model_name="m"} 0\n')

    @app.post("/v1/completions")
    async def completions():
        async def chunks():
            for i in range(events):
                chunk = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                      "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(gap_s)
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


async def _stream(client, url: str, counts: list[int]) -> None:
    async with client.stream("POST", url + "/v1/completions",
                             json={"prompt": "x", "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                counts[0] += 1


async def _client(urls: list[str], streams: int) -> tuple[int, float]:
    import httpx
    counts = [0]
    async with httpx.AsyncClient(timeout=300, trust_env=False,
                                 limits=httpx.Limits(max_connections=streams + 8)) as client:
        start = time.perf_counter()
        await asyncio.gather(*[_stream(client, urls[i % len(urls)], counts)
                               for i in range(streams)])
        return counts[0], time.perf_counter() - start


def run_client(urls: list[str], streams: int) -> None:
    events, seconds = asyncio.run(_client(urls, streams))
    print(json.dumps({"events": events, "seconds": seconds}))


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "NO_PROXY": "*"})


def _wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while http_get(url + "/health", timeout=2)[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")
        time.sleep(0.2)


def _measure(urls: list[str], streams: int) -> float:
    proc = subprocess.run([sys.executable, __file__, "--client", ",".join(urls),
                           "--streams", str(streams)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "NO_PROXY": "*"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["events"] / out["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--events", type=int, default=256, help="events per stream")
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stand-in", type=int, help=argparse.SUPPRESS)  # internal: serve one
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the client
    args = parser.parse_args()
    if args.stand_in:
        return serve_stand_in(args.stand_in, args.events, args.gap_ms / 1000)
    if args.client:
        return run_client(args.client.split(","), args.streams)

    procs = []
    try:
        urls = []
        for _ in range(args.replicas):
            port = free_port()
            procs.append(_spawn([__file__, "--stand-in", str(port), "--events", str(args.events),
                                 "--gap-ms", str(args.gap_ms)]))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            _wait_healthy(url)
        router = _spawn(["-m", "shardserve.cli", "router", "--host", "127.0.0.1", "--port", "0",
                         *[a for url in urls for a in ("--backend", url)]])
        procs.append(router)
        line = router.stdout.readline()
        found = re.search(r" on http://127\.0\.0\.1:(\d+)", line)
        if not found:
            raise RuntimeError(f"router did not start: {line}{router.stdout.read()[-2000:]}")
        router_url = f"http://127.0.0.1:{found.group(1)}"
        _wait_healthy(router_url)
        bound = args.streams * 1000 / args.gap_ms
        print(f"{args.streams} streams x {args.events} events, {args.gap_ms:g} ms apart, "
              f"{args.replicas} stand-in replicas; bound {bound:,.0f} events/s", flush=True)
        rows = []
        for i in range(args.repeats):
            direct = _measure(urls, args.streams)
            routed = _measure([router_url], args.streams)
            rows.append((direct, routed))
            print(f"  run {i + 1}: direct {direct:,.0f} events/s, through the router "
                  f"{routed:,.0f} ({routed / direct:.2f}x direct, {routed / bound:.0%} of the "
                  f"bound)", flush=True)
        direct = sorted(r[0] for r in rows)[len(rows) // 2]
        routed = sorted(r[1] for r in rows)[len(rows) // 2]
        print(f"median: direct {direct:,.0f}, router {routed:,.0f} events/s: "
              f"{routed / direct:.2f}x direct, {routed / bound:.0%} of the bound")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
