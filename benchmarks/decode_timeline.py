"""Where a batch-1 decode step's time goes, on every rank: speed without the profiler, then a
profiled run whose per-rank Chrome traces are read back as a GPU timeline.

    python benchmarks/decode_timeline.py --model-dir /tmp/llama3-8b --tp 1,2 \
        --engine-args '{"load_format": "dummy"}'

For each tensor-parallel size: batch-1 tok/s over --output-len tokens (no profiler), then
LLM.start_profile() around --profile-tokens more, and from each rank's trace:

    kernels/token, kernel ms/token      how much GPU work a token is
    busy                                union of kernel intervals / the profiled window
    gaps                                idle stretches between kernels, by size, and the kernels
                                        on either side of the largest ones (what the GPU waits
                                        for: the host's next launch, a copy, a collective)
    outside graphs                      kernels launched eagerly (not by a CUDA graph replay)

The profiler slows the host, so its wall times read high; the ratios and the gaps' places are
what it is for. The no-profiler tok/s is the speed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import log, make_model_dir, random_prompts  # noqa: E402


def load_trace(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def kernel_timeline(events: list[dict]) -> list[tuple[float, float, str, bool]]:
    """(start us, end us, name, from a graph) of every GPU kernel and memcpy/memset, by start."""
    graph_corr = set()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ("cudaGraphLaunch", "cudaGraphLaunch_v10000"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                graph_corr.add(corr)
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        corr = (e.get("args") or {}).get("correlation")
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        out.append((ts, ts + dur, e.get("name", "?"), corr in graph_corr))
    out.sort()
    return out


def analyse(timeline: list[tuple[float, float, str, bool]], tokens: int,
            gap_floor_us: float = 5.0, top: int = 8) -> dict:
    if not timeline:
        return {"kernels": 0}
    window = timeline[-1][1] - timeline[0][0]
    busy, cur_s, cur_e = 0.0, timeline[0][0], timeline[0][1]
    gaps: list[tuple[float, str, str]] = []
    for (s, e, name, _), prev in zip(timeline[1:], timeline):
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= gap_floor_us:
                gaps.append((s - cur_e, prev[2], name))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    eager = collections.Counter()
    for s, e, name, in_graph in timeline:
        by_name[name][0] += 1
        by_name[name][1] += e - s
        if not in_graph:
            eager[name[:70]] += 1
    buckets = collections.Counter()
    for g, _, _ in gaps:
        buckets["5-20us" if g < 20 else "20-100us" if g < 100 else "100us-1ms" if g < 1000
                else ">1ms"] += g
    gaps.sort(reverse=True)
    places = collections.Counter((a[:50], b[:50]) for _, a, b in gaps[:200])
    return {
        "kernels": len(timeline), "kernels_per_token": len(timeline) / tokens,
        "kernel_ms_per_token": sum(v[1] for v in by_name.values()) / 1e3 / tokens,
        "window_ms_per_token": window / 1e3 / tokens, "busy": busy / window if window else 0.0,
        "gap_ms_per_token": {k: v / 1e3 / tokens for k, v in sorted(buckets.items())},
        "largest_gap_places": [[n, a, b] for (a, b), n in places.most_common(top)],
        "eager_kernels_per_token": {k: v / tokens for k, v in eager.most_common(top)},
        "top_kernels": [[name[:90], v[0] / tokens, v[1] / 1e3 / tokens] for name, v in
                        sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top * 2]],
    }


def print_analysis(label: str, a: dict) -> None:
    if not a.get("kernels"):
        print(f"{label}: no kernels in the trace")
        return
    print(f"{label}: {a['kernels_per_token']:.0f} kernels/token, {a['kernel_ms_per_token']:.3f} "
          f"ms kernels/token over a {a['window_ms_per_token']:.3f} ms window, busy {a['busy']:.0%}")
    print("  idle by gap size (ms/token): " + ", ".join(
        f"{k} {v:.3f}" for k, v in a["gap_ms_per_token"].items()))
    for n, before, after in a["largest_gap_places"]:
        print(f"  {n:4d} of the largest gaps: after {before!r} before {after!r}")
    for name, count in a["eager_kernels_per_token"].items():
        print(f"  eager {count:5.1f}/token  {name}")
    for name, count, ms in a["top_kernels"]:
        print(f"  {ms:7.3f} ms/token {count:6.1f}x  {name}")


def run_tp(args, tp: int) -> dict:
    from shardserve import LLM, SamplingParams

    kwargs = {"dtype": "bfloat16", **args.engine_args}
    llm = LLM(args.model_dir, tensor_parallel_size=tp,
              max_model_len=args.input_len + args.output_len + args.profile_tokens + 64, **kwargs)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    prompt = {"prompt_token_ids": random_prompts(1, args.input_len, vocab, 2)[0]}
    params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.generate(prompt, params(16), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompt, params(1), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompt, params(args.output_len), use_tqdm=False)
    wall = time.perf_counter() - start
    # Decode-only rate: the prompt's own step (measured alone just before) taken out.
    tok_s = (args.output_len - 1) / max(wall - prefill_s, 1e-9)
    log(f"TP {tp}: batch 1, {args.input_len} in / {args.output_len} out: "
        f"{args.output_len / wall:.1f} tok/s end to end, {tok_s:.1f} tok/s decode")
    if tp == 1:  # the engine runs in this process: what linear() picked per shape
        from shardserve.layers.linear_op import chosen
        for (n, k, dtype, bias, _), config in sorted(chosen().items(), key=str):
            log(f"  GEMV [{n}, {k}]{' +bias' if bias else ''}: {config or 'F.linear (cuBLAS)'}")
    out_dir = os.path.join(args.out, f"tp{tp}")
    llm.start_profile(out_dir)
    llm.generate(prompt, params(args.profile_tokens), use_tqdm=False)
    ranks = llm.stop_profile()
    result = {"tp": tp, "tok_s_e2e": args.output_len / wall, "tok_s_decode": tok_s,
              "ranks": {}}
    for r in ranks:
        a = analyse(kernel_timeline(load_trace(r["trace"])), args.profile_tokens)
        result["ranks"][r["rank"]] = a
        print_analysis(f"TP {tp} rank {r['rank']}", a)
        if not args.keep_traces:
            os.remove(r["trace"])
    if args.profile_prompt:
        result["prompt_step"] = profile_prompt_step(llm, args, vocab, out_dir, tp)
    llm.shutdown()
    del llm
    return result


def profile_prompt_step(llm, args, vocab: int, out_dir: str, tp: int) -> dict:
    """A fresh prompt's own step (no prefix-cache hit; max_tokens=1): wall time without the
    profiler, then one profiled, read back as the same timeline (busy share: whether the GPU
    waits for the host's eager launches)."""
    from shardserve import SamplingParams
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    fresh = [{"prompt_token_ids": p} for p in random_prompts(2, args.input_len, vocab, 11)]
    start = time.perf_counter()
    llm.generate(fresh[0], one, use_tqdm=False)
    wall_ms = (time.perf_counter() - start) * 1e3
    log(f"TP {tp}: a fresh {args.input_len}-token prompt's step: {wall_ms:.1f} ms end to end")
    llm.start_profile(os.path.join(out_dir, "prompt"))
    llm.generate(fresh[1], one, use_tqdm=False)
    out = {"wall_ms": wall_ms, "ranks": {}}
    for r in llm.stop_profile():
        a = analyse(kernel_timeline(load_trace(r["trace"])), 1)
        out["ranks"][r["rank"]] = a
        print_analysis(f"TP {tp} rank {r['rank']} prompt step", a)
        if not args.keep_traces:
            os.remove(r["trace"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="/tmp/llama3-8b")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--profile-tokens", type=int, default=32)
    p.add_argument("--engine-args", default='{"load_format": "dummy"}', type=json.loads)
    p.add_argument("--out", default="/tmp/decode_timeline")
    p.add_argument("--keep-traces", action="store_true")
    p.add_argument("--profile-prompt", action="store_true",
                   help="also time and profile one fresh prompt's step (eager, not a graph)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dummy = args.engine_args.get("load_format") == "dummy"
    make_model_dir(args.model_dir, args.preset, weights=not dummy)
    results = [run_tp(args, int(t)) for t in args.tp.split(",")]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print("\n| TP | tok/s (end to end) | tok/s (decode) | rank 0 kernels/token | "
          "kernel ms/token | busy |")
    print("|---|---|---|---|---|---|")
    for r in results:
        a = r["ranks"].get(0) or next(iter(r["ranks"].values()), {})
        print(f"| {r['tp']} | {r['tok_s_e2e']:.1f} | {r['tok_s_decode']:.1f} | "
              f"{a.get('kernels_per_token', 0):.0f} | {a.get('kernel_ms_per_token', 0):.3f} | "
              f"{a.get('busy', 0):.0%} |")


if __name__ == "__main__":
    main()
