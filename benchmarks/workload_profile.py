"""Where an offline throughput workload's time goes: steps with prompt tokens against pure decode
steps over the whole run, and the GPU kernels of a few profiled steps of each kind, by category.

    python benchmarks/workload_profile.py --model-dir /tmp/l8cfg --num-prompts 1000 \
        --input-len 1000 --output-len 1000 --engine-args '{"load_format": "dummy"}'

Every engine step is timed (the loop's wall clock) and classified by what the scheduler gave it:
"prefill" steps hold prompt tokens (decode rows may ride along), "decode" steps one token per
request. With async scheduling a step() call waits for the step submitted by the call before,
so each call's time is billed to the previous call's schedule. Two profiled windows of
--profile-steps steps each: the first step holding prompt tokens after --warm-steps, and the
first pure decode step past the middle of the run whose mean context is above the workload's
mean; their kernels are summed by category (GEMMs, attention, norms, ...) with the GPU's busy
share. The profiled steps and trace writing are taken out of the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import log, random_prompts  # noqa: E402
from benchmarks.decode_timeline import analyse, kernel_timeline, load_trace  # noqa: E402

# (category, pattern on the kernel name), first match wins.
CATEGORIES = [
    ("attention decode", r"_decode_kernel|_decode_reduce|mla_decode"),
    ("attention prefill", r"_prefill|flash|fmha"),
    ("gemv (triton)", r"_gemv"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_|xmma|cublas|splitKreduce"),
    ("rmsnorm", r"rms"),
    ("rope + kv store", r"rotary|_store|reshape_and_cache"),
    ("silu-and-mul", r"silu"),
    ("communication", r"all_reduce|allreduce|nccl|cross_device"),
    ("copies", r"^Memcpy|^Memset|copy_kernel|CatArrayBatched|index_select|gather"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other (sampling, embedding, elementwise)"


def by_category(timeline, steps: int) -> list[tuple[str, float, float]]:
    """(category, ms per step, share of kernel time), largest first."""
    totals: dict[str, float] = {}
    for start, end, name, _ in timeline:
        totals[category(name)] = totals.get(category(name), 0.0) + end - start
    whole = sum(totals.values()) or 1.0
    return [(c, t / 1e3 / steps, t / whole) for c, t in sorted(totals.items(), key=lambda kv: -kv[1])]


class StepLog:
    """Wraps Scheduler.schedule: one (prompt tokens, decode rows, decode context sum) a step."""

    def __init__(self, scheduler) -> None:
        self.records: list[tuple[int, int, int]] = []
        self._scheduler = scheduler
        self._schedule = scheduler.schedule
        scheduler.schedule = self._wrapped

    def _wrapped(self, *args, **kwargs):
        out = self._schedule(*args, **kwargs)
        if not out.is_empty:
            prompt = decode = ctx = 0
            for rid, n in out.num_scheduled_tokens.items():
                if n > 1:
                    prompt += n
                else:
                    decode += 1
                    req = self._scheduler.requests.get(rid)
                    ctx += req.num_computed_tokens if req is not None else 0
            self.records.append((prompt, decode, ctx))
        return out


def summarise(records, times, offset: int) -> dict:
    """Bill call i's time to schedule record i - offset; totals by step kind."""
    kinds = {"prefill": [0, 0.0, 0, 0], "decode": [0, 0.0, 0, 0]}  # steps, s, tokens, rows
    ctx_sum = rows_sum = 0
    for i, dt in enumerate(times):
        j = i - offset
        if dt is None or not 0 <= j < len(records):
            continue
        prompt, decode, ctx = records[j]
        k = kinds["prefill" if prompt else "decode"]
        k[0] += 1
        k[1] += dt
        k[2] += prompt
        k[3] += decode
        if not prompt:
            ctx_sum += ctx
            rows_sum += decode
    return {"kinds": kinds, "mean_decode_ctx": ctx_sum / max(rows_sum, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--engine-args", default='{"load_format": "dummy"}', type=json.loads)
    p.add_argument("--warm-steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", default="/tmp/workload_profile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from shardserve import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    kwargs = {"dtype": "bfloat16" if on_gpu else "float32", **args.engine_args}
    llm = LLM(args.model_dir, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              **kwargs)
    engine = llm.engine
    cfg = engine.config.scheduler_config
    log(f"max_num_seqs {cfg.max_num_seqs}, max_num_batched_tokens {cfg.max_num_batched_tokens}, "
        f"async scheduling {cfg.async_scheduling}, KV blocks {engine.config.cache_config.num_blocks}")
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = random_prompts(8, args.input_len, vocab, 1)
    llm.generate([{"prompt_token_ids": t} for t in warm],
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    steps = StepLog(engine.core.scheduler)
    for toks in random_prompts(args.num_prompts, args.input_len, vocab, 2):
        engine.add_request({"prompt_token_ids": toks}, params)
    offset = 1 if engine.core.max_in_flight > 1 else 0
    mean_ctx = args.input_len + args.output_len / 2
    windows: dict[str, dict] = {}
    profiling: str | None = None
    prof_left = 0
    times: list[float | None] = []
    excluded = 0.0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if not args.no_profile and profiling is None and len(times) >= args.warm_steps \
                and steps.records:
            prompt, decode, ctx = steps.records[-1]
            if "prefill" not in windows and prompt:
                profiling = "prefill"
            elif ("decode" not in windows and not prompt and decode
                  and len(times) > 2 * args.warm_steps and ctx / decode > mean_ctx):
                profiling = "decode"
            if profiling:
                first = len(steps.records)
                llm.start_profile(os.path.join(args.out, profiling))
                prof_left = args.profile_steps
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if profiling:
            times.append(None)  # profiled: slowed by the profiler, not billed
            excluded += dt
            prof_left -= 1
            if prof_left == 0 or not engine.has_unfinished_requests():
                t1 = time.perf_counter()
                rank = llm.stop_profile()[0]
                excluded += time.perf_counter() - t1
                recs = steps.records[first:first + args.profile_steps]
                tl = kernel_timeline(load_trace(rank["trace"]))
                os.remove(rank["trace"])
                windows[profiling] = {
                    "steps": len(recs), "prompt_tokens": sum(r[0] for r in recs),
                    "decode_rows": sum(r[1] for r in recs),
                    "mean_ctx": sum(r[2] for r in recs) / max(sum(r[1] for r in recs), 1),
                    "analysis": analyse(tl, max(len(recs), 1)),
                    "categories": by_category(tl, max(len(recs), 1))}
                profiling = None
        else:
            times.append(dt)
    wall = time.perf_counter() - start - excluded
    profiled_calls = sum(t is None for t in times)
    out_tokens = args.num_prompts * args.output_len
    s = summarise(steps.records, times, offset)
    result = {"args": vars(args), "wall_s": wall, "profiled_calls": profiled_calls,
              "preemptions": engine.core.scheduler.num_preemptions,
              "output_tok_s": out_tokens / wall, **s, "windows": windows}

    print(f"\n{args.num_prompts} x ({args.input_len} in / {args.output_len} out): "
          f"{wall:.1f} s without the {profiled_calls} profiled steps, "
          f"{out_tokens / wall:,.0f} output tok/s (a little high: those steps' tokens count)")
    print(f"{'steps':>14} {'count':>6} {'seconds':>8} {'share':>6} {'ms/step':>8} "
          f"{'prompt tok/step':>15} {'decode rows/step':>16}")
    billed = sum(k[1] for k in s["kinds"].values()) or 1.0
    for kind, (n, sec, tok, rows) in s["kinds"].items():
        print(f"{kind:>14} {n:>6} {sec:>8.1f} {sec / billed:>6.0%} {1e3 * sec / max(n, 1):>8.2f} "
              f"{tok / max(n, 1):>15.0f} {rows / max(n, 1):>16.0f}")
    print(f"mean context of a decode row in decode steps: {s['mean_decode_ctx']:.0f} tokens; "
          f"{engine.core.scheduler.num_preemptions} preemptions")
    for name, w in windows.items():
        a = w["analysis"]
        if not a.get("kernels"):
            continue
        print(f"\nprofiled {name} window: {w['steps']} steps, {w['prompt_tokens'] / w['steps']:.0f} "
              f"prompt tokens and {w['decode_rows'] / w['steps']:.0f} decode rows a step (mean "
              f"context {w['mean_ctx']:.0f}); {a['kernel_ms_per_token']:.2f} ms of kernels a step "
              f"over {a['window_ms_per_token']:.2f} ms, GPU busy {a['busy']:.0%}")
        for label, ms, share in w["categories"]:
            print(f"  {ms:9.3f} ms/step {share:6.1%}  {label}")
        for kname, count, ms in a["top_kernels"][:8]:
            print(f"    {ms:9.3f} ms/step {count:6.1f}x  {kname}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    llm.shutdown()


if __name__ == "__main__":
    main()
