"""`shardserve bench serve`: load-test a running OpenAI-compatible server (ours or vLLM).

Each request streams /v1/completions with a random token-id prompt of --input-len tokens and
asks for exactly --output-len tokens (ignore_eos), so the load does not depend on the model's
weights. Arrivals are a Poisson process at --request-rate (inf: all at once), with at most
--max-concurrency requests in flight; several rates run one after another, with the same prompts. Per request it records time to first token, the gaps
between streamed tokens and end-to-end latency; serve_report.py turns them into vLLM's table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

from shardserve.bench.args import check_output_paths, positive_int
from shardserve.bench.serve_report import BenchConfig, parse_goodput, print_summary, summarize
from shardserve.errors import ShardserveError

DEFAULT_VOCAB_SIZE = 32000  # when the server does not say (the smallest common Llama vocab)


@dataclass
class RequestResult:
    """One request's timings; times are seconds since the benchmark started."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # when each chunk arrived
    error: str = ""


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=None,
                        help="Bearer key (default: $SHARDSERVE_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--request-rate", nargs="+", default=["inf"], metavar="RATE",
                        help="requests per second, Poisson arrivals; inf sends all at once. "
                             "Several (e.g. 1 2 4 inf) run one after another and --plot adds "
                             "latency and throughput against the rate")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--num-prompts", type=positive_int, default=100)
    parser.add_argument("--input-len", type=positive_int, default=512,
                        help="prompt tokens per request")
    parser.add_argument("--output-len", type=positive_int, default=128,
                        help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="token ids are drawn below this (default: from /v1/models)")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:200 tpot:50 e2el:5000 (milliseconds)")
    parser.add_argument("--save-result", default=None, metavar="JSON",
                        help="write the summary and per-request timings here (several rates: "
                             "{\"runs\": [one such object per rate]})")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw latency percentiles (overall, over time, against the rate) "
                             "and throughput (needs matplotlib)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take")


def run_bench_serve(args: argparse.Namespace) -> int:
    rates = []
    for text in args.request_rate:
        try:
            rates.append(float(text))
        except ValueError:
            print(f"error: --request-rate must be a number or inf, got {text!r}",
                  file=sys.stderr)
            return 2
    if min(rates) <= 0:
        print("error: --request-rate must be positive", file=sys.stderr)
        return 2
    try:
        slos = parse_goodput(args.goodput)
    except ValueError as err:
        print(f"error: --goodput: {err}", file=sys.stderr)
        return 2
    check_output_paths(save_result=args.save_result, plot=args.plot)
    import importlib.util
    if importlib.util.find_spec("httpx") is None:
        print("error: bench serve needs httpx: pip install 'shardserve[bench]'", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("SHARDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return asyncio.run(_main(args, rates, slos, api_key))


async def _main(args: argparse.Namespace, rates: list[float], slos: dict[str, float],
                api_key: str | None) -> int:
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    runs: list[tuple[list[RequestResult], dict]] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model, vocab_size = await _model_info(client, base, args)
        for k, rate in enumerate(rates):
            # Rate k draws its own prompts (seed + k): the prefix cache must not carry one
            # rate's prompts into the next and flatter its TTFT.
            results, duration = await _run_rate(client, base, model, vocab_size, rate,
                                                args.seed + k, args)
            config = BenchConfig(base_url=base, model=model, request_rate=rate,
                                 max_concurrency=args.max_concurrency,
                                 num_prompts=args.num_prompts, input_len=args.input_len,
                                 output_len=args.output_len, seed=args.seed + k, goodput=slos)
            summary = summarize(results, duration, config)
            print_summary(summary)
            runs.append((results, summary))

    if args.save_result:
        data = [{**summary, "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
                 "e2els": [r.latency for r in results],
                 "output_lens": [r.output_tokens for r in results],
                 "errors": [r.error for r in results]} for results, summary in runs]
        with open(args.save_result, "w") as f:
            json.dump(data[0] if len(data) == 1 else {"runs": data}, f, indent=2)
        print(f"Saved {args.save_result}")
    if args.plot:
        from shardserve.bench.plots import save_serve_plot
        if save_serve_plot(runs, args.plot):
            print(f"Saved {args.plot}")
    return 0 if all(summary["completed"] > 0 for _, summary in runs) else 1


async def _run_rate(client, base: str, model: str, vocab_size: int, rate: float, seed: int,
                    args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    print(f"Benchmarking {model} at {base}: {args.num_prompts} requests, {args.input_len} in / "
          f"{args.output_len} out, rate {rate:g} req/s, max concurrency "
          f"{args.max_concurrency or 'unlimited'}", flush=True)
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(
            _limited(semaphore, client, base, model, prompt, args.output_len, start)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def _model_info(client, base: str, args: argparse.Namespace) -> tuple[str, int]:
    model, vocab = args.model, args.vocab_size
    if model is None or vocab is None:
        import httpx
        try:
            response = await client.get(f"{base}/v1/models")
            response.raise_for_status()
            cards = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as err:
            # Before any load: a wrong --base-url, a server not up yet, or a missing --api-key.
            raise ShardserveError(
                f"Cannot read {base}/v1/models ({type(err).__name__}: {err}); check that the "
                "server is up at --base-url (and --api-key), or pass --model and "
                "--vocab-size") from None
        card = next((c for c in cards if c["id"] == model), cards[0]) if cards else {}
        model = model or card["id"]
        vocab = vocab or card.get("vocab_size") or DEFAULT_VOCAB_SIZE
    return model, int(vocab)


async def _limited(semaphore: asyncio.Semaphore | None, *args) -> RequestResult:
    if semaphore is None:
        return await _one_request(*args)
    async with semaphore:
        return await _one_request(*args)


async def _one_request(client, base: str, model: str, prompt: list[int], output_len: int,
                       bench_start: float) -> RequestResult:
    result = RequestResult(prompt_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    start = time.perf_counter()
    result.start = start - bench_start
    last = start
    num_chunks = 0
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    result.token_times.append(now - bench_start)
                    num_chunks += 1
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"]["completion_tokens"])
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or num_chunks
        result.success = num_chunks > 0
        if not result.success:
            result.error = "the stream ended without tokens"
    except Exception as exc:  # a failed request is counted, never fatal to the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    return result
