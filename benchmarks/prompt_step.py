"""How long one prompt's step takes alone, end to end: LLM.generate(max_tokens=1) of a fresh
prompt (no prefix-cache hit), the median over several prompts of each length after a warm-up
of that length. Each layout runs in its own process, so one never holds the GPU for the next.

    python benchmarks/prompt_step.py --model-dir /tmp/l8cfg --tp 1,2 --lengths 32,128,512
    python benchmarks/prompt_step.py --tp 1 --engine-args '{"mixed_cuda_graphs": false}'
    python benchmarks/prompt_step.py --tp 1 --cprofile 30    # host time by function (TP 1)

This is the time to first token of a lone request, less HTTP: at batch 1 it is the part of
end-to-end latency that decode speed does not cover. Eagerly, a prompt step's hundreds of
kernel launches from Python can take longer than its GPU work; `--cprofile N` prints where
the host's time goes (the engine runs in this process only at TP 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import make_model_dir, random_prompts, run_child  # noqa: E402


def measure(llm, lengths: list[int], repeats: int, seed: int = 100) -> dict[int, float]:
    """Median milliseconds of a fresh prompt's step, per length."""
    from shardserve import SamplingParams
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    medians = {}
    for i, n in enumerate(lengths):
        for p in random_prompts(2, n, vocab, seed + 2 * i):  # warm-up at this length
            llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)
        times = []
        for p in random_prompts(repeats, n, vocab, seed + 2 * i + 1):
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)
            times.append((time.perf_counter() - start) * 1e3)
        medians[n] = statistics.median(times)
    return medians


def host_profile(llm, length: int, count: int, top: int = 30) -> str:
    """cProfile of `count` fresh prompt steps of `length` tokens, by own time then total."""
    import cProfile
    import io
    import pstats

    from shardserve import SamplingParams
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    prompts = random_prompts(count, length, vocab, 7)
    profile = cProfile.Profile()
    profile.enable()
    for p in prompts:
        llm.generate({"prompt_token_ids": p}, one, use_tqdm=False)
    profile.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def run_layout(args) -> None:
    """Child: one layout's medians into args.out (JSON)."""
    from shardserve import LLM
    lengths = [int(n) for n in args.lengths.split(",")]
    llm = LLM(args.model_dir, tensor_parallel_size=int(args.tp), dtype=args.dtype,
              max_model_len=max(lengths) + 64, **json.loads(args.engine_args))
    try:
        medians = measure(llm, lengths, args.repeats)
        if args.cprofile:
            print(host_profile(llm, lengths[len(lengths) // 2], args.cprofile), flush=True)
    finally:
        llm.shutdown()
    with open(args.out, "w") as f:
        json.dump({str(n): ms for n, ms in medians.items()}, f)


def table(rows: list[tuple[str, dict[str, float]]], lengths: list[int]) -> str:
    lines = ["| layout | " + " | ".join(f"{n} tokens (ms)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, medians in rows:
        lines.append(f"| {name} | " + " | ".join(
            f"{medians[str(n)]:.1f}" if str(n) in medians else "-" for n in lengths) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/l8cfg")
    p.add_argument("--preset", default="llama-3-8b",
                   help="shape written (config only, for load_format dummy) if --model-dir has none")
    p.add_argument("--tp", default="1", help="TP sizes, each in its own process")
    p.add_argument("--lengths", default="32,128,512")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--engine-args", default='{"load_format": "dummy"}',
                   help="LLM() keyword arguments as JSON")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also cProfile N prompt steps of the middle length (useful at TP 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_layout(args)
        return
    engine_args = json.loads(args.engine_args)
    make_model_dir(args.model_dir, args.preset, weights=engine_args.get("load_format") != "dummy")
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        medians = run_child(__file__, [
            "--model-dir", args.model_dir, "--tp", str(tp), "--lengths", args.lengths,
            "--repeats", str(args.repeats), "--dtype", args.dtype,
            "--engine-args", args.engine_args, "--cprofile", str(args.cprofile)], f"TP {tp}")
        if medians is not None:
            rows.append((f"TP {tp}", medians))
    print()
    print(table(rows, [int(n) for n in args.lengths.split(",")]))


if __name__ == "__main__":
    main()
