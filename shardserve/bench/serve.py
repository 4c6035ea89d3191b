"""`shardserve bench serve`: load-test a running OpenAI-compatible server (ours or vLLM).

Each request streams /v1/completions with a random token-id prompt of --input-len tokens and
asks for exactly --output-len tokens (ignore_eos), so the load does not depend on the model's
weights (vLLM's random dataset, with its --random-range-ratio and --random-prefix-len).
Arrivals are a Poisson process at --request-rate (inf: all at once; --burstiness makes it a
gamma process), with at most --max-concurrency requests in flight; several rates run one after
another, each with its own prompts. Per request it records time to first token, the gaps
between streamed tokens and end-to-end latency; serve_report.py turns them into vLLM's table.
vLLM's other options either work the same or are refused with a line saying what to use.
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
from datetime import datetime

from shardserve.bench.args import check_output_paths, non_negative_int, positive_int
from shardserve.bench.serve_report import (METRICS, BenchConfig, parse_goodput,
                                           parse_metric_percentiles, parse_percentile_metrics,
                                           print_summary, summarize)
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


# vLLM's --backend values that stream /v1/completions, which is all this load generator sends.
_COMPLETIONS_BACKENDS = ("vllm", "openai")


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None,
                        help="the server, e.g. http://127.0.0.1:8000 (default: from --host and "
                             "--port)")
    parser.add_argument("--host", default="127.0.0.1", help="the server's host, without --base-url")
    parser.add_argument("--port", type=positive_int, default=8000,
                        help="the server's port, without --base-url")
    parser.add_argument("--backend", default="vllm",
                        help="as vLLM's: vllm or openai (both stream /v1/completions)")
    parser.add_argument("--endpoint", default="/v1/completions",
                        help="only /v1/completions (prompts are token ids)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name in requests, where --model names something else")
    parser.add_argument("--api-key", default=None,
                        help="Bearer key (default: $SHARDSERVE_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--dataset-name", default="random",
                        help="only random: random token-id prompts (as vLLM's random dataset)")
    parser.add_argument("--dataset-path", default=None,
                        help="unused: only --dataset-name random is supported (as vLLM, which "
                             "ignores it for random)")
    parser.add_argument("--request-rate", nargs="+", default=["inf"], metavar="RATE",
                        help="requests per second, Poisson arrivals; inf sends all at once. "
                             "Several (e.g. 1 2 4 inf) run one after another and --plot adds "
                             "latency and throughput against the rate")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma-distributed arrivals at --request-rate: 1 is Poisson, "
                             "lower is burstier, higher more even (as vLLM's)")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--num-prompts", type=positive_int, default=100)
    parser.add_argument("--input-len", "--random-input-len", dest="input_len", type=positive_int,
                        default=512, help="prompt tokens per request")
    parser.add_argument("--output-len", "--random-output-len", dest="output_len",
                        type=positive_int, default=128, help="output tokens per request")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="draw each request's input and output lengths uniformly within "
                             "this fraction of --input-len and --output-len (0 <= r < 1)")
    parser.add_argument("--random-prefix-len", type=non_negative_int, default=0,
                        help="random tokens that every prompt starts with, before its own "
                             "--input-len")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="accepted for vLLM's command lines: requests always set ignore_eos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="token ids are drawn below this (default: from /v1/models)")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:200 tpot:50 e2el:5000 (milliseconds)")
    parser.add_argument("--percentile-metrics", default=",".join(METRICS),
                        help="the metrics whose percentiles the table shows, of "
                             "ttft,tpot,itl,e2el (the JSON has them all)")
    parser.add_argument("--metric-percentiles", default="90,99",
                        help="the percentiles the table shows, e.g. 50,90,99")
    parser.add_argument("--save-result", nargs="?", const="", default=None, metavar="JSON",
                        help="write the summary and per-request timings to JSON (several rates: "
                             "{\"runs\": [one such object per rate]}); without a path, to "
                             "--result-dir/--result-filename as vLLM")
    parser.add_argument("--save-detailed", action="store_true",
                        help="accepted for vLLM's command lines: results always have the "
                             "per-request timings")
    parser.add_argument("--result-dir", default=None,
                        help="folder for --save-result's file (default: the current one)")
    parser.add_argument("--result-filename", default=None,
                        help="name of --save-result's file (default: as vLLM's, "
                             "BACKEND-RATEqps[-concurrencyN]-MODEL-DATE.json)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw latency percentiles (overall, over time, against the rate) "
                             "and throughput (needs matplotlib)")
    parser.add_argument("--disable-tqdm", action="store_true",
                        help="accepted for vLLM's command lines (no progress bar is shown)")
    parser.add_argument("--tokenizer", default=None,
                        help="accepted for vLLM's command lines: prompts are token ids, so no "
                             "tokenizer is loaded")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accepted for vLLM's command lines (no tokenizer is loaded)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one request may take")


def _usage_error(args: argparse.Namespace) -> str | None:
    """The first vLLM option value this load generator cannot honour, said in one line."""
    if args.backend not in _COMPLETIONS_BACKENDS:
        return (f"--backend {args.backend}: bench serve streams /v1/completions with token-id "
                f"prompts; use --backend vllm or openai")
    if args.endpoint.rstrip("/") != "/v1/completions":
        return (f"--endpoint {args.endpoint}: bench serve streams /v1/completions only (token-id "
                "prompts); drop --endpoint")
    if args.dataset_name != "random":
        return (f"--dataset-name {args.dataset_name}: bench serve sends random token-id prompts "
                "only; use --dataset-name random with --random-input-len and --random-output-len")
    if not 0.0 <= args.random_range_ratio < 1.0:
        return f"--random-range-ratio must be at least 0 and below 1, got {args.random_range_ratio}"
    if not args.burstiness > 0:
        return f"--burstiness must be positive, got {args.burstiness}"
    return None


def result_path(args: argparse.Namespace, model: str, rates: list[float]) -> str:
    """--save-result's file: its own path, else vLLM's --result-dir/--result-filename naming."""
    if args.save_result:
        return args.save_result
    name = args.result_filename
    if not name:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        rate = "_".join(f"{r:g}" for r in rates)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{args.backend}-{rate}qps{concurrency}-{model.split('/')[-1]}-{stamp}.json"
    return os.path.join(os.path.expanduser(args.result_dir or "."), name)


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
    problem = _usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        slos = parse_goodput(args.goodput)
    except ValueError as err:
        print(f"error: --goodput: {err}", file=sys.stderr)
        return 2
    try:
        args.percentile_metrics = parse_percentile_metrics(args.percentile_metrics)
        args.metric_percentiles = parse_metric_percentiles(args.metric_percentiles)
    except ValueError as err:
        flag = "--percentile-metrics" if "ttft" in str(err) else "--metric-percentiles"
        print(f"error: {flag}: {err}", file=sys.stderr)
        return 2
    if args.save_result == "" and args.result_dir and not os.path.isdir(
            os.path.expanduser(args.result_dir)):
        print(f"error: --result-dir {args.result_dir} does not exist", file=sys.stderr)
        return 2
    named = (os.path.join(os.path.expanduser(args.result_dir or "."), args.result_filename)
             if args.save_result == "" and args.result_filename else None)
    check_output_paths(save_result=args.save_result, result_filename=named, plot=args.plot)
    import importlib.util
    if importlib.util.find_spec("httpx") is None:
        print("error: bench serve needs httpx: pip install 'shardserve[bench]'", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("SHARDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return asyncio.run(_main(args, rates, slos, api_key))


async def _main(args: argparse.Namespace, rates: list[float], slos: dict[str, float],
                api_key: str | None) -> int:
    import httpx

    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
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
                                 output_len=args.output_len, seed=args.seed + k, goodput=slos,
                                 burstiness=args.burstiness,
                                 percentile_metrics=args.percentile_metrics,
                                 metric_percentiles=args.metric_percentiles)
            summary = summarize(results, duration, config)
            print_summary(summary)
            runs.append((results, summary))

    if args.save_result is not None:
        path = result_path(args, model, rates)
        data = [{**summary, "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
                 "e2els": [r.latency for r in results],
                 "input_lens": [r.prompt_len for r in results],
                 "output_lens": [r.output_tokens for r in results],
                 "errors": [r.error for r in results]} for results, summary in runs]
        with open(path, "w") as f:
            json.dump(data[0] if len(data) == 1 else {"runs": data}, f, indent=2)
        print(f"Saved {path}")
    if args.plot:
        from shardserve.bench.plots import save_serve_plot
        if save_serve_plot(runs, args.plot):
            print(f"Saved {args.plot}")
    return 0 if all(summary["completed"] > 0 for _, summary in runs) else 1


async def _run_rate(client, base: str, model: str, vocab_size: int, rate: float, seed: int,
                    args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    requests = random_requests(rng, args.num_prompts, args.input_len, args.output_len,
                               args.random_range_ratio, args.random_prefix_len, vocab_size)
    print(f"Benchmarking {model} at {base}: {args.num_prompts} requests, {args.input_len} in / "
          f"{args.output_len} out, rate {rate:g} req/s, max concurrency "
          f"{args.max_concurrency or 'unlimited'}", flush=True)
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    start = time.perf_counter()
    tasks = []
    for i, (prompt, output_len) in enumerate(requests):
        tasks.append(asyncio.create_task(
            _limited(semaphore, client, base, model, prompt, output_len, start)))
        # No wait after the last arrival: it would only stretch the measured duration.
        if rate != float("inf") and i + 1 < len(requests):
            await asyncio.sleep(arrival_gap(rng, rate, args.burstiness))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def random_requests(rng: random.Random, num: int, input_len: int, output_len: int,
                    range_ratio: float, prefix_len: int,
                    vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, as vLLM's random dataset: lengths drawn
    uniformly from [len * (1 - ratio), len * (1 + ratio)] (at least 1), after a shared prefix."""
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    requests = []
    for _ in range(num):
        n_in, n_out = length(input_len), length(output_len)
        requests.append((prefix + [rng.randrange(vocab_size) for _ in range(n_in)], n_out))
    return requests


def arrival_gap(rng: random.Random, rate: float, burstiness: float) -> float:
    """Seconds to the next arrival: gamma-distributed with mean 1/rate; burstiness 1 gives
    Poisson arrivals (exponential gaps), as vLLM's --burstiness."""
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def _model_info(client, base: str, args: argparse.Namespace) -> tuple[str, int]:
    model, vocab = args.served_model_name or args.model, args.vocab_size
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
