"""One GPU run: shardserve vs Hugging Face transformers on the same random-weight
Llama-3-8B-shaped bf16 model, the same workloads, plus the bandwidth roofline.

    python benchmarks/llama8b_vs_hf.py --model-dir /tmp/llama3-8b [--quick] [--skip-hf-compile]

Prints one table of tokens/s with ratios against transformers and the roofline; --json saves it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (copy_bandwidth, log, logits_errors, prompt_logits,  # noqa: E402
                               random_prompts)
from benchmarks.common import make_model_dir as _make_model_dir  # noqa: E402


def make_model_dir(path: str, num_layers: int | None) -> str:
    return _make_model_dir(path, "llama-3-8b", num_layers)


@torch.inference_mode()
def hf_generate_tps(model, prompts: list[list[int]], new_tokens: int, **gen_kwargs) -> float:
    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **gen_kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def run_hf(path: str, args, results: dict, check_prompt: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' speeds into results; returns its prompt logits in bf16 and float32."""
    from transformers import AutoModelForCausalLM
    log("transformers: loading")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        ref_logits = model(torch.tensor([check_prompt], device="cuda")).logits[0].float().cpu()
        # The float32 truth both bf16 results are measured against: how far transformers' own
        # bf16 is from it is the noise floor for "agrees with transformers" (bf16 -> float32
        # -> bf16 is exact, so the model is unchanged afterwards).
        model.float()
        ref32 = model(torch.tensor([check_prompt], device="cuda")).logits[0].float().cpu()
        model.to(torch.bfloat16)
    results["hf_bf16_vs_fp32"] = logits_errors(ref_logits, ref32)
    log(f"transformers bf16 vs float32 logits: rel err "
        f"{results['hf_bf16_vs_fp32']['logits_rel_err_vs_hf']:.2e}")
    b1 = random_prompts(1, 128, vocab, 1)
    hf_generate_tps(model, b1, 8)  # warm-up
    if not args.hf_compile_only:
        results["hf_eager_b1"] = hf_generate_tps(model, b1, args.b1_out)
        log(f"transformers eager batch 1: {results['hf_eager_b1']:.1f} tok/s")
        big = random_prompts(args.b256_num, 512, vocab, 2)
        results["hf_eager_b256"] = hf_generate_tps(model, big, args.b256_out)
        log(f"transformers eager batch {args.b256_num}: {results['hf_eager_b256']:.1f} tok/s")
    if not args.skip_hf_compile:
        # transformers compiles the forward itself when generate() runs with a static cache
        # (its generation_config.compile_config); a manual torch.compile(mode="reduce-overhead")
        # around it failed (a CUDA-graph output read after the next replay overwrote it).
        try:
            for _ in range(2):  # compile, then one more warm run
                hf_generate_tps(model, b1, 16, cache_implementation="static")
            results["hf_static_compile_b1"] = hf_generate_tps(model, b1, args.b1_out,
                                                              cache_implementation="static")
            from torch._dynamo.utils import counters
            graphs = int(counters["stats"]["unique_graphs"])
            results["hf_static_compiled_graphs"] = graphs  # 0: it ran eager, not compiled
            log(f"transformers static cache + compile batch 1: "
                f"{results['hf_static_compile_b1']:.1f} tok/s ({graphs} graphs compiled)")
        except Exception as err:  # report, don't lose the rest of the run
            log(f"transformers static+compile failed: {type(err).__name__}: {err}")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return ref_logits, ref32


def run_shardserve(path: str, args, results: dict, check_prompt: list[int], ref_logits,
                   ref32=None) -> None:
    from shardserve import LLM, SamplingParams
    log("shardserve: starting engine")
    t0 = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.9,
              enforce_eager=args.enforce_eager)
    results["shardserve_startup_s"] = time.perf_counter() - t0
    log(f"shardserve: ready in {results['shardserve_startup_s']:.1f} s, "
        f"{llm.config.cache_config.num_blocks} KV blocks")
    if ref_logits is not None:  # without transformers' logits (--skip-hf) nothing to compare
        logits = prompt_logits(llm, check_prompt)
        results.update(logits_errors(logits, ref_logits))
        if ref32 is not None:
            results["shardserve_bf16_vs_fp32"] = logits_errors(logits, ref32)
            log(f"shardserve bf16 vs float32 logits: rel err "
                f"{results['shardserve_bf16_vs_fp32']['logits_rel_err_vs_hf']:.2e} (transformers' "
                f"bf16: {results['hf_bf16_vs_fp32']['logits_rel_err_vs_hf']:.2e})")
        lp = llm.generate({"prompt_token_ids": check_prompt},
                          SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0].prompt_logprobs
        ref_lp = torch.log_softmax(ref_logits, -1)
        diffs = [abs(lp[i][t].logprob - ref_lp[i - 1, t].item())
                 for i, t in enumerate(check_prompt) if i > 0]
        results["paged_prompt_logprob_max_abs_diff"] = max(diffs)
        log(f"logits rel err {results['logits_rel_err_vs_hf']:.2e} (norm-wise; max/max "
            f"{results['logits_max_err_over_max']:.2e}); paged prompt logprob max diff "
            f"{results['paged_prompt_logprob_max_abs_diff']:.3f}")

    vocab = int(llm.config.model_config.hf_config.vocab_size)

    def tps(num, in_len, out_len, seed, greedy=True):
        prompts = [{"prompt_token_ids": p} for p in random_prompts(num, in_len, vocab, seed)]
        params = SamplingParams(temperature=0.0 if greedy else 1.0, max_tokens=out_len, ignore_eos=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=num > 1)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed

    def lockstep(fn):
        """The same workload with async scheduling off (one step in flight), to measure what
        overlapping the host's work with the GPU gains. Switched between runs, when idle."""
        def run():
            core = llm.engine.core
            saved = core.max_in_flight, core.scheduler.async_scheduling
            core.max_in_flight, core.scheduler.async_scheduling = 1, False
            try:
                return fn()
            finally:
                core.max_in_flight, core.scheduler.async_scheduling = saved
        return run

    results["async_scheduling"] = bool(llm.config.scheduler_config.async_scheduling)
    # Warm-up: every kernel shape the runs below meet (compiles and autotuning stay out).
    tps(1, 128, 16, 0)
    tps(min(args.b256_num, 64), 512, 8, 10)
    # Each run has prompts of its own seed: a repeat would hit the prefix cache.
    runs = (("shardserve_b1", lambda: tps(1, 128, args.b1_out, 1)),
            ("shardserve_b1_lockstep", lockstep(lambda: tps(1, 128, args.b1_out, 11))),
            ("shardserve_b256", lambda: tps(args.b256_num, 512, args.b256_out, 2)),
            ("shardserve_b256_lockstep",
             lockstep(lambda: tps(args.b256_num, 512, args.b256_out, 12))),
            ("shardserve_1000x1000",
             lambda: tps(args.big_num, args.big_len, args.big_len, 3, greedy=False)))
    for key, run in runs:
        if ((args.skip_lockstep and key.endswith("_lockstep"))
                or (args.skip_1000x1000 and key == "shardserve_1000x1000")):
            continue
        try:
            results[key] = run()
            log(f"{key}: {results[key]:.1f} output tok/s")
        except Exception as err:  # keep the other measurements
            log(f"{key} failed: {type(err).__name__}: {err}")
        print(json.dumps(results), flush=True)

    # Where a step's time goes, for batch 1 and a full batch (decode-dominated).
    from benchmarks.step_profile import print_profile, profile_llm
    for bs, out_len in ((1, 64), (args.b256_num, 64)):
        prompts = [{"prompt_token_ids": p} for p in random_prompts(bs, 512, vocab, 9)]
        params = SamplingParams(temperature=1.0, max_tokens=out_len, ignore_eos=True)
        try:
            print_profile(profile_llm(llm, prompts, params), f"step profile, batch {bs}")
        except Exception as err:
            log(f"step profile failed: {type(err).__name__}: {err}")
    # The GPU side of batch 1: which kernels, and how busy the GPU is between them.
    try:
        from benchmarks.kernel_profile import print_profile as print_kernels
        from benchmarks.kernel_profile import profile_decode
        results["shardserve_b1_kernels"] = profile_decode(llm, random_prompts(1, 128, vocab, 6)[0])
        print_kernels(results["shardserve_b1_kernels"])
    except Exception as err:
        log(f"kernel profile failed: {type(err).__name__}: {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/llama3-8b-random")
    p.add_argument("--num-layers", type=int, default=None, help="shrink the model (smoke runs)")
    p.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-hf-compile", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--hf-compile-only", action="store_true",
                   help="transformers with a static cache (compiled) at batch 1, nothing else")
    p.add_argument("--skip-lockstep", action="store_true",
                   help="measure async scheduling only (not lock-step beside it)")
    p.add_argument("--skip-1000x1000", action="store_true",
                   help="leave out the 1000 x (1000/1000) run (bench throughput measures it)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.b1_out, args.b256_num, args.b256_out = 256, 256, 256
    args.big_num, args.big_len = 1000, 1000
    if args.quick:
        args.b1_out, args.b256_num, args.b256_out, args.big_num, args.big_len = 64, 32, 32, 64, 128

    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    path = make_model_dir(args.model_dir, args.num_layers)
    weight_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
    bw = copy_bandwidth()
    results.update(weight_bytes=weight_bytes, copy_bandwidth_Bps=bw, roofline_b1=bw / weight_bytes)
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; "
        f"batch-1 roofline {results['roofline_b1']:.0f} tok/s")
    # What no engine can beat on the batch-256 workload here (benchmarks/workload_bound.py):
    # the 8x-transformers target is judged against it.
    from benchmarks.gemm_bench import peak_tflops
    from benchmarks.workload_bound import Shape, workload_bound
    with open(os.path.join(path, "config.json")) as f:
        shape = Shape.from_config(json.load(f))
    tflops = peak_tflops(torch.bfloat16)
    bound = workload_bound(shape, args.b256_num, 512, args.b256_out, tflops * 1e12, bw)
    results.update(gemm_tflops=tflops, bound_b256=bound.output_tokens_per_s)
    log(f"bf16 GEMM {tflops:.0f} TFLOP/s; {args.b256_num} x (512/{args.b256_out}) bound "
        f"{bound.output_tokens_per_s:,.0f} tok/s")
    check_prompt = random_prompts(1, 128, 128256, 7)[0]
    ref_logits = ref32 = None
    if not args.skip_hf:
        try:
            ref_logits, ref32 = run_hf(path, args, results, check_prompt)
        except Exception as err:
            log(f"transformers part failed: {type(err).__name__}: {err}")
        print(json.dumps(results), flush=True)
    if args.hf_compile_only:
        print(json.dumps(results), flush=True)
        return
    run_shardserve(path, args, results, check_prompt, ref_logits, ref32)

    for key in ("shardserve_b1", "shardserve_b256", "shardserve_1000x1000"):
        results.setdefault(key, 0.0)

    def ratio(a, b):
        return f"{results[a] / results[b]:.2f}x" if results.get(a) and results.get(b) else "-"
    print("\n| workload | shardserve tok/s | transformers tok/s | ratio | roofline |")
    print("|---|---|---|---|---|")
    print(f"| batch 1, 128 in / {args.b1_out} out | {results['shardserve_b1']:.1f} | "
          f"eager {results.get('hf_eager_b1', 0):.1f}; static+compile {results.get('hf_static_compile_b1', 0):.1f} | "
          f"{ratio('shardserve_b1', 'hf_eager_b1')} eager, {ratio('shardserve_b1', 'hf_static_compile_b1')} compiled | "
          f"{results['roofline_b1']:.0f} ({results['shardserve_b1'] / results['roofline_b1'] * 100:.0f}%) |")
    print(f"| {args.b256_num} x (512 in / {args.b256_out} out) | {results['shardserve_b256']:.0f} | "
          f"eager {results.get('hf_eager_b256', 0):.0f} | {ratio('shardserve_b256', 'hf_eager_b256')} | "
          f"bound {results['bound_b256']:,.0f} ({ratio('bound_b256', 'hf_eager_b256')} "
          f"transformers; {results['shardserve_b256'] / results['bound_b256'] * 100:.0f}% reached) |")
    print(f"| {args.big_num} x ({args.big_len} in / {args.big_len} out) | {results['shardserve_1000x1000']:.0f} | - | - | - |")
    print(f"\nasync scheduling (default {results.get('async_scheduling')}) vs lock-step: batch 1 "
          f"{ratio('shardserve_b1', 'shardserve_b1_lockstep')}, batch {args.b256_num} "
          f"{ratio('shardserve_b256', 'shardserve_b256_lockstep')}")
    err = results.get("logits_rel_err_vs_hf")
    print(f"\nlogits rel err vs transformers (bf16, ||a-b||/||b||): "
          f"{f'{err:.2e}' if err is not None else 'not measured (--skip-hf)'}; "
          f"start-up {results['shardserve_startup_s']:.1f} s")
    ours32, hf32 = results.get("shardserve_bf16_vs_fp32"), results.get("hf_bf16_vs_fp32")
    if ours32 and hf32:
        print(f"against transformers' float32 logits: shardserve bf16 "
              f"{ours32['logits_rel_err_vs_hf']:.2e}, transformers bf16 "
              f"{hf32['logits_rel_err_vs_hf']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
