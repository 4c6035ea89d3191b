"""DeepSeek-V2-Lite-shaped model (15.7B parameters, 2.4B active, bf16, random weights) on the
GPU: shardserve against Hugging Face transformers in the same run, or EP 2 against TP 2.

    # write the model folder once (on the GPU, ~31 GB), then benchmark
    python benchmarks/deepseek_v2_lite.py --model-dir /tmp/dsv2lite --write-only
    # one H200: batch-1 decode and N x (in / out) throughput, vs transformers
    python benchmarks/deepseek_v2_lite.py --model-dir /tmp/dsv2lite --json ds_single.json
    # two H200: expert parallelism vs tensor parallelism (same model, same workloads)
    python benchmarks/deepseek_v2_lite.py --model-dir /tmp/dsv2lite --mode ep-vs-tp

The model folder is written on the GPU on first use (about 31 GB; --num-layers shrinks it for
smoke runs). Sizes are flags: --num-prompts/--input-len/--output-len (default 1000 x 1000/1000),
--b1-input-len/--b1-output-len, and transformers' throughput subset --hf-num-prompts,
--hf-batch, --hf-output-len (transformers runs static batches; its full 1000 x 1000 would not fit
a 10-minute run). Prints a table with ratios and the batch-1 bandwidth roofline; --json saves it.
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

from benchmarks.common import copy_bandwidth, log, logits_errors, random_prompts  # noqa: E402
from benchmarks.common import make_model_dir as _make_model_dir  # noqa: E402


def make_model_dir(path: str, num_layers: int | None) -> str:
    return _make_model_dir(path, "deepseek-v2-lite", num_layers)


def save_partial(args, results: dict) -> None:
    """Rewrite --json after every measurement, so a run killed later keeps what it measured."""
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)










@torch.inference_mode()
def hf_tps(model, prompts: list[list[int]], new_tokens: int, batch: int) -> float:
    """Output tokens/s of transformers' greedy generate over static batches."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new_tokens
    torch.cuda.synchronize()
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def run_hf(path: str, args, results: dict, check_prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    log("transformers: loading")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    results["hf_experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        ref = model(torch.tensor([check_prompt], device="cuda")).logits[0].float().cpu()
    b1 = random_prompts(1, args.b1_input_len, vocab, 1)
    hf_tps(model, b1, 8, 1)  # warm-up
    results["hf_b1"] = hf_tps(model, b1, args.b1_output_len, 1)
    log(f"transformers batch 1: {results['hf_b1']:.1f} tok/s "
        f"(experts: {results['hf_experts_implementation']})")
    save_partial(args, results)
    if args.hf_num_prompts:
        prompts = random_prompts(args.hf_num_prompts, args.input_len, vocab, 2)
        results["hf_throughput"] = hf_tps(model, prompts, args.hf_output_len, args.hf_batch)
        log(f"transformers {args.hf_num_prompts} x ({args.input_len}/{args.hf_output_len}) in "
            f"batches of {args.hf_batch}: {results['hf_throughput']:.0f} tok/s")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return ref


def bench_engine(llm, args, results: dict, key: str) -> None:
    """Batch-1 decode and N x (in / out) throughput of one engine, into results[key_*]."""
    from shardserve import SamplingParams
    vocab = int(llm.config.model_config.hf_config.vocab_size)

    def tps(num: int, in_len: int, out_len: int, seed: int) -> float:
        prompts = [{"prompt_token_ids": p} for p in random_prompts(num, in_len, vocab, seed)]
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=num > 1)
        elapsed = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed

    tps(1, args.b1_input_len, 16, 0)  # warm-up
    results[f"{key}_b1"] = tps(1, args.b1_input_len, args.b1_output_len, 1)
    log(f"{key} batch 1: {results[f'{key}_b1']:.1f} tok/s")
    save_partial(args, results)
    if args.profile_b1 and torch.cuda.is_available():
        from benchmarks.kernel_profile import print_profile, profile_decode
        prof = profile_decode(llm, random_prompts(1, args.b1_input_len, vocab, 5)[0], 32)
        results[f"{key}_b1_profile"] = prof
        print_profile(prof, f"{key} batch-1 decode")
        save_partial(args, results)
    results[f"{key}_throughput"] = tps(args.num_prompts, args.input_len, args.output_len, 3)
    log(f"{key} {args.num_prompts} x ({args.input_len}/{args.output_len}): "
        f"{results[f'{key}_throughput']:.0f} tok/s")
    save_partial(args, results)


def make_llm(path: str, args, results: dict | None = None, key: str = "shardserve", **kwargs):
    from shardserve import LLM
    start = time.perf_counter()
    llm = LLM(path, dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.9,
              enforce_eager=args.enforce_eager, **kwargs)
    startup = time.perf_counter() - start
    log(f"engine {kwargs or ''} ready in {startup:.1f} s, "
        f"{llm.config.cache_config.num_blocks} KV blocks of {llm.config.cache_config.block_size}")
    if results is not None:
        results[f"{key}_startup_s"] = startup
        results[f"{key}_num_kv_blocks"] = llm.config.cache_config.num_blocks
        save_partial(args, results)
    return llm


def run_single(path: str, args, results: dict, check_prompt: list[int],
               ref: torch.Tensor | None) -> None:
    from shardserve.forward_context import set_forward_context
    llm = make_llm(path, args, results)
    runner = llm.engine.core.executor.worker.runner
    if ref is not None:
        with torch.inference_mode(), set_forward_context(None):
            ids = torch.tensor(check_prompt, device="cuda")
            hidden = runner.model(ids, torch.arange(len(ids), device="cuda"))
            logits = runner.model.compute_logits(hidden).cpu()
        results.update(logits_errors(logits, ref))
        results["argmax_agreement_vs_hf"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        log(f"logits rel err vs transformers {results['logits_rel_err_vs_hf']:.2e}, argmax "
            f"agreement {results['argmax_agreement_vs_hf']:.3f}")
        save_partial(args, results)
    bench_engine(llm, args, results, "shardserve")


def run_ep_vs_tp(path: str, args, results: dict) -> None:
    for mode, ep in (("tp2", False), ("ep2", True)):
        try:  # one mode failing must not lose the other's numbers
            llm = make_llm(path, args, results, mode, tensor_parallel_size=2,
                           enable_expert_parallel=ep)
        except Exception as err:
            log(f"{mode} failed to start: {type(err).__name__}: {err}")
            results[f"{mode}_error"] = f"{type(err).__name__}: {err}"
            save_partial(args, results)
            continue
        try:
            bench_engine(llm, args, results, mode)
        except Exception as err:
            log(f"{mode} failed: {type(err).__name__}: {err}")
            results[f"{mode}_error"] = f"{type(err).__name__}: {err}"
            save_partial(args, results)
        finally:
            llm.shutdown()
        del llm
        gc.collect()


def print_table(args, results: dict) -> None:
    def ratio(a: str, b: str) -> str:
        return f"{results[a] / results[b]:.2f}x" if results.get(a) and results.get(b) else "-"
    b1 = f"batch 1, {args.b1_input_len} in / {args.b1_output_len} out"
    big = f"{args.num_prompts} x ({args.input_len} in / {args.output_len} out)"
    if args.mode == "ep-vs-tp":
        print("\n| workload | TP 2 tok/s | EP 2 tok/s | EP / TP |\n|---|---|---|---|")
        for name, key in ((b1, "b1"), (big, "throughput")):
            print(f"| {name} | {results.get(f'tp2_{key}', float('nan')):.1f} | "
                  f"{results.get(f'ep2_{key}', float('nan')):.1f} | "
                  f"{ratio(f'ep2_{key}', f'tp2_{key}')} |")
        return
    roof = results["roofline_b1"]
    print("\n| workload | shardserve tok/s | transformers tok/s | ratio | roofline |")
    print("|---|---|---|---|---|")
    print(f"| {b1} | {results['shardserve_b1']:.1f} | {results.get('hf_b1', 0):.1f} | "
          f"{ratio('shardserve_b1', 'hf_b1')} | {roof:.0f} "
          f"({results['shardserve_b1'] / roof * 100:.0f}%) |")
    hf_big = (f"{results['hf_throughput']:.0f} ({args.hf_num_prompts} x ({args.input_len} / "
              f"{args.hf_output_len}), batches of {args.hf_batch})" if results.get("hf_throughput")
              else "-")
    print(f"| {big} | {results['shardserve_throughput']:.0f} | {hf_big} | "
          f"{ratio('shardserve_throughput', 'hf_throughput')} | - |")
    if "logits_rel_err_vs_hf" in results:
        print(f"\nlogits rel err vs transformers (bf16): {results['logits_rel_err_vs_hf']:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/deepseek-v2-lite-random")
    p.add_argument("--mode", choices=("single", "ep-vs-tp"), default="single")
    p.add_argument("--num-layers", type=int, default=None, help="shrink the model (smoke runs)")
    p.add_argument("--write-only", action="store_true", help="write the model folder and exit")
    p.add_argument("--b1-input-len", type=int, default=128)
    p.add_argument("--b1-output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--hf-num-prompts", type=int, default=64, help="0: skip its throughput")
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-output-len", type=int, default=128)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--profile-b1", action="store_true",
                   help="after the batch-1 run, the kernels of a 32-token decode by GPU time")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from shardserve.models.deepseek_memory import deepseek_memory
    results: dict = {"kind": "deepseek_v2_lite", "mode": args.mode,
                     "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "args": vars(args)}
    path = make_model_dir(args.model_dir, args.num_layers)
    if args.write_only:
        return
    with open(os.path.join(path, "config.json")) as f:
        mem = deepseek_memory(json.load(f))
    bw = copy_bandwidth()
    # Batch-1 decode reads the active weights once per token (bf16).
    results.update(total_params=mem.total_params, active_params=mem.active_params_per_token,
                   kv_bytes_per_token=mem.kv_bytes_per_token,
                   mha_kv_bytes_per_token=mem.mha_kv_bytes_per_token, copy_bandwidth_Bps=bw,
                   roofline_b1=bw / (2 * mem.active_params_per_token))
    log(f"{mem.total_params / 1e9:.1f}B parameters, {mem.active_params_per_token / 1e9:.2f}B "
        f"active; MLA KV {mem.kv_bytes_per_token} B/token (MHA: {mem.mha_kv_bytes_per_token}); "
        f"copy bandwidth {bw / 1e12:.2f} TB/s; batch-1 roofline {results['roofline_b1']:.0f} tok/s")
    if args.mode == "ep-vs-tp":
        run_ep_vs_tp(path, args, results)
    else:
        check_prompt = random_prompts(1, 128, 102400, 7)[0]
        ref = None
        if not args.skip_hf:
            try:  # transformers failing (or running out of memory) must not cost our numbers
                ref = run_hf(path, args, results, check_prompt)
            except Exception as err:
                log(f"transformers part failed: {type(err).__name__}: {err}")
                results["hf_error"] = f"{type(err).__name__}: {err}"
            # Outside the except block: its traceback would keep transformers' model alive.
            gc.collect()
            torch.cuda.empty_cache()
            save_partial(args, results)
        run_single(path, args, results, check_prompt, ref)
    print_table(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
