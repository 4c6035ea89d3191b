"""What one fresh prompt adds to a decode step: the step time of running requests alone, then
with a new short prompt joining them (a mixed step), for a few shapes of the running batch
(rows x context). Run with mixed CUDA graphs (the default), eagerly, or with the graphs' decode
kernel split for another row count; each variant in its own process, at TP 1.

    python benchmarks/mixed_step.py --model-dir /tmp/l8cfg --cases 1x32000,64x2000 \
        --variants graphs,eager,split2

A mixed graph is captured once per padded token count, so its decode kernel's split count is
fixed at capture (sized for MIXED_GRAPH_SPLIT_ROWS decode rows over max_model_len): one row at a
long context gets fewer programs than an eager step would give it, many rows more. This
measures what that costs beside what the graph saves on the host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import make_model_dir, random_prompts, run_child  # noqa: E402


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'1x32000,64x2000' -> [(1, 32000), (64, 2000)] (rows, context tokens)."""
    cases = []
    for item in text.split(","):
        rows, _, ctx = item.strip().partition("x")
        if not rows.isdigit() or not ctx.isdigit() or int(rows) < 1 or int(ctx) < 1:
            raise SystemExit(f"--cases: {item!r} is not ROWSxCONTEXT, e.g. 64x2000")
        cases.append((int(rows), int(ctx)))
    return cases


def engine_kwargs(variant: str) -> dict:
    if variant == "eager":
        return {"mixed_cuda_graphs": False}
    if variant == "graphs" or variant.startswith("split"):
        return {}
    raise SystemExit(f"--variants: {variant!r}: use graphs, eager or splitN")


def measure_case(llm, rows: int, ctx: int, prompt_len: int, steps: int, seed: int) -> dict:
    """Median step milliseconds with `rows` requests decoding at about `ctx` tokens of context,
    alone and with one fresh `prompt_len`-token prompt added before each step."""
    import torch

    from shardserve import SamplingParams
    engine = llm.llm_engine
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    running = SamplingParams(temperature=0.0, max_tokens=4 * steps + 16, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, running)
           for p in random_prompts(rows, ctx, vocab, seed)]
    budget = llm.config.scheduler_config.max_num_batched_tokens
    for _ in range(math.ceil(rows * ctx / budget) + 3):  # every prompt chunked in, then decoding
        engine.step()
    graphs = llm.engine.core.executor.worker.runner.graph_runner
    replays = dict(graphs.replays) if graphs is not None else {"mixed": 0}
    times: dict[str, list[float]] = {"decode": [], "mixed": []}
    fresh = iter(random_prompts(2 * steps, prompt_len, vocab, seed + 1))
    for kind in ("decode", "mixed") * 2:  # interleaved, so drift hits both
        for _ in range(steps // 2):
            if kind == "mixed":
                engine.add_request({"prompt_token_ids": next(fresh)}, one)
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            times[kind].append((time.perf_counter() - start) * 1e3)
    mixed_replays = (graphs.replays["mixed"] - replays["mixed"]) if graphs is not None else 0
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"decode_ms": statistics.median(times["decode"]),
            "mixed_ms": statistics.median(times["mixed"]), "mixed_replays": mixed_replays}


def run_variant(args) -> None:
    """Child: one variant's results into args.out (JSON)."""
    if args.variant.startswith("split"):
        import shardserve.executor.cuda_graph as cuda_graph
        cuda_graph.MIXED_GRAPH_SPLIT_ROWS = int(args.variant[5:])  # read when capturing
    from shardserve import LLM
    cases = parse_cases(args.cases)
    llm = LLM(args.model_dir, dtype=args.dtype, max_num_seqs=max(r for r, _ in cases) + 8,
              max_model_len=max(c for _, c in cases) + args.prompt_len + 4 * args.steps + 64,
              **engine_kwargs(args.variant), **json.loads(args.engine_args))
    try:
        result = {f"{r}x{c}": measure_case(llm, r, c, args.prompt_len, args.steps, 100 + i)
                  for i, (r, c) in enumerate(cases)}
    finally:
        llm.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)


def table(results: dict[str, dict], prompt_len: int) -> str:
    lines = [f"| variant | rows x context | decode step (ms) | with a {prompt_len}-token prompt "
             "(ms) | added (ms) | mixed graph replays |", "|---|---|---|---|---|---|"]
    for variant, cases in results.items():
        for case, r in cases.items():
            lines.append(f"| {variant} | {case} | {r['decode_ms']:.2f} | {r['mixed_ms']:.2f} | "
                         f"{r['mixed_ms'] - r['decode_ms']:+.2f} | {r['mixed_replays']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/l8cfg")
    p.add_argument("--preset", default="llama-3-8b",
                   help="shape written (config only, for load_format dummy) if --model-dir has none")
    p.add_argument("--cases", default="1x32000,64x2000", help="ROWSxCONTEXT, comma-separated")
    p.add_argument("--variants", default="graphs,eager,split2",
                   help="graphs (default engine), eager (no mixed graphs), splitN (graphs whose "
                        "decode kernel is split for N rows)")
    p.add_argument("--prompt-len", type=int, default=127)
    p.add_argument("--steps", type=int, default=20, help="steps timed per kind and case")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--engine-args", default='{"load_format": "dummy"}',
                   help="LLM() keyword arguments as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_variant(args)
        return
    parse_cases(args.cases)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if not v.startswith("split"):
            engine_kwargs(v)
        elif not v[5:].isdigit() or int(v[5:]) < 1:
            raise SystemExit(f"--variants: {v!r}: splitN takes a row count N >= 1")
    engine_args = json.loads(args.engine_args)
    make_model_dir(args.model_dir, args.preset, weights=engine_args.get("load_format") != "dummy")
    results = {}
    for variant in variants:
        result = run_child(__file__, [
            "--variant", variant, "--model-dir", args.model_dir, "--cases", args.cases,
            "--prompt-len", str(args.prompt_len), "--steps", str(args.steps),
            "--dtype", args.dtype, "--engine-args", args.engine_args], variant)
        if result is not None:
            results[variant] = result
    print()
    print(table(results, args.prompt_len))


if __name__ == "__main__":
    main()
