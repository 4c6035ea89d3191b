"""`shardserve bench throughput` and `shardserve bench latency`: the engine in this process,
random token-id prompts and ignore_eos, so the numbers do not depend on the weights.

Argument names follow vLLM's benchmarks (--input-len, --output-len, --num-prompts,
--batch-size), so the same command lines compare the two.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from shardserve.bench.args import check_output_paths, non_negative_int, positive_int
from shardserve.bench.serve_report import percentile
from shardserve.engine_args import add_engine_args, engine_kwargs_from_args
from shardserve.errors import InvalidRequestError


def add_offline_bench_parsers(bench_sub: Any) -> None:
    tp = bench_sub.add_parser("throughput", help="offline throughput: N random prompts at once")
    tp.add_argument("--input-len", type=positive_int, default=1024)
    tp.add_argument("--output-len", type=positive_int, default=128)
    tp.add_argument("--num-prompts", type=positive_int, default=1000)
    tp.add_argument("--dataset-name", default="random",
                    help="only random: random token-id prompts (vLLM's default without "
                         "--dataset-path)")
    tp.add_argument("--plot", default=None, metavar="PNG",
                    help="draw throughput over time and the per-request latency spread "
                         "(needs matplotlib)")
    _common(tp)
    tp.set_defaults(func=run_throughput)

    lat = bench_sub.add_parser("latency", help="latency of one fixed batch, end to end and per step")
    lat.add_argument("--input-len", type=positive_int, default=32)
    lat.add_argument("--output-len", type=positive_int, default=128)
    lat.add_argument("--batch-size", type=positive_int, default=8)
    lat.add_argument("--num-iters-warmup", type=non_negative_int, default=2)
    lat.add_argument("--num-iters", type=positive_int, default=5)
    _common(lat)
    lat.set_defaults(func=run_latency)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    add_engine_args(p)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # Stay clear of the low ids where special tokens usually live.
    lo = min(1000, vocab_size // 4)
    return [{"prompt_token_ids": [rng.randrange(lo, vocab_size) for _ in range(length)]}
            for _ in range(num)]


def _make_llm(args: argparse.Namespace):
    from shardserve.llm import LLM
    kwargs = engine_kwargs_from_args(args)
    return LLM(**kwargs)


def run_throughput(args: argparse.Namespace) -> int:
    from shardserve.sampling_params import SamplingParams

    if args.dataset_name != "random":
        raise InvalidRequestError(
            f"--dataset-name {args.dataset_name}: bench throughput uses random token-id prompts "
            "only; use --dataset-name random with --input-len and --output-len", "dataset_name")
    check_output_paths(output_json=args.output_json, plot=args.plot)
    t0 = time.perf_counter()
    llm = _make_llm(args)
    startup = time.perf_counter() - t0
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.bench_seed)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.output_len, ignore_eos=True)
    start, start_mono = time.perf_counter(), time.monotonic()  # requests stamp monotonic times
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(len(o.prompt_token_ids) for o in outs)
    result = {
        "elapsed_time": elapsed, "num_requests": len(outs), "total_num_tokens": num_in + num_out,
        "requests_per_second": len(outs) / elapsed,
        "tokens_per_second": (num_in + num_out) / elapsed,
        "output_tokens_per_second": num_out / elapsed, "startup_seconds": startup,
    }
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, "
          f"{result['tokens_per_second']:.2f} total tokens/s, "
          f"{result['output_tokens_per_second']:.2f} output tokens/s "
          f"({len(outs)} requests, {num_in} in + {num_out} out tokens, {elapsed:.1f} s; "
          f"start-up {startup:.1f} s)")
    _save(args.output_json, result)
    if args.plot:
        from shardserve.bench.plots import save_throughput_plot
        title = (f"bench throughput: {len(outs)} requests x ({args.input_len} in / "
                 f"{args.output_len} out), {result['output_tokens_per_second']:.0f} output tok/s")
        if save_throughput_plot(outs, start_mono, elapsed, args.plot, title):
            print(f"Saved {args.plot}")
    return 0


def run_latency(args: argparse.Namespace) -> int:
    from shardserve.sampling_params import SamplingParams
    from tqdm.auto import tqdm

    check_output_paths(output_json=args.output_json)
    llm = _make_llm(args)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    engine = llm.engine

    def one_batch(seed: int) -> tuple[float, list[float]]:
        prompts = random_prompts(args.batch_size, args.input_len, vocab, seed)
        for p in prompts:
            engine.add_request(p, params)
        steps: list[float] = []
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
        return time.perf_counter() - start, steps

    for i in tqdm(range(args.num_iters_warmup), desc="Warm-up"):
        one_batch(args.bench_seed + 1000 + i)
    latencies, step_times, prompt_steps, tails = [], [], [], []
    for i in tqdm(range(args.num_iters), desc="Measuring"):
        total, steps = one_batch(args.bench_seed + i)
        latencies.append(total)
        step_times.extend(steps[1:])  # the first step is the prefill
        prompt_steps.append(steps[0])
        # Where end to end leaves decode behind: the prompt step, and every step above the
        # median (the first decodes, the last, any stall).
        tails.append(total - len(steps[1:]) * statistics.median(steps[1:] or [0.0]))
    decode_ms = statistics.median(step_times) * 1e3 if step_times else float("nan")
    result = {
        "avg_latency": statistics.mean(latencies),
        "latencies": latencies,
        # Interpolated as vLLM's (numpy's): with the usual 5 to 30 iterations, a nearest-rank
        # index reported the slowest batch as P90 and P99 alike.
        "percentiles": {p: percentile(latencies, p) for p in (10, 25, 50, 75, 90, 99)},
        "median_decode_step_ms": decode_ms,
        "output_tokens_per_second": args.batch_size * args.output_len / statistics.mean(latencies),
        "decode_tokens_per_second": args.batch_size / (decode_ms / 1e3) if step_times else 0.0,
        "median_prompt_step_ms": statistics.median(prompt_steps) * 1e3,
        "median_time_beyond_decode_ms": statistics.median(tails) * 1e3,
    }
    print(f"Avg latency: {result['avg_latency']:.3f} s for batch {args.batch_size} x "
          f"({args.input_len} in / {args.output_len} out); median decode step "
          f"{decode_ms:.2f} ms; {result['output_tokens_per_second']:.1f} output tokens/s end to "
          f"end, {result['decode_tokens_per_second']:.1f} tokens/s in decode")
    print(f"  prompt step {result['median_prompt_step_ms']:.1f} ms; end to end exceeds "
          f"(steps x median step) by {result['median_time_beyond_decode_ms']:.1f} ms")
    for p, v in result["percentiles"].items():
        print(f"  P{p}: {v:.3f} s")
    _save(args.output_json, result)
    return 0


def _save(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
