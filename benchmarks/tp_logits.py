"""Tensor-parallel accuracy on the GPU: prompt logits and greedy continuations of one
random-weight model under several TP sizes, against one GPU in the same dtype and against one
GPU in float32 (the truth both are rounded from), and optionally against transformers.

    python benchmarks/tp_logits.py --model-dir /tmp/llama3-8b --tp 1,2
    python benchmarks/tp_logits.py --tp 1 --dtype float32 --skip-fp32 --hf float32,bfloat16

--hf runs transformers on the same weights (its own load, eager, one prompt at a time: full
prompt logits, then greedy decoding with its KV cache) in each dtype given, and compares every
shardserve layout with transformers in the layout's dtype and in float32.

Each layout runs in its own process (so one run's GPU memory never stays for the next) and
saves every prompt's full-vocabulary logits (Worker.prompt_logits: outside the KV cache, on TP
rank 0) and its greedy tokens (the engine: paged cache, CUDA graphs, the fused all-reduce +
RMSNorm in decode). The table gives the norm-wise relative error ||a - b|| / ||b|| over all
logits, argmax agreement per position, and the matching prefix of the greedy continuations.

Prompts of 64 tokens keep a [64, 4096] bf16 activation within the custom all-reduce's one-shot
size, so the prompt forward takes the fused kernel too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (log, logits_errors, make_model_dir, prompt_logits,  # noqa: E402
                               random_prompts)


def run_layout(args) -> None:
    """Child: one layout's logits and greedy tokens into args.out (torch.save)."""
    from shardserve import LLM, SamplingParams
    llm = LLM(args.model_dir, dtype=args.dtype, tensor_parallel_size=args.tp,
              max_model_len=args.prompt_len + args.new_tokens + 16, gpu_memory_utilization=0.85,
              enforce_eager=args.enforce_eager, **json.loads(args.engine_args))
    prompts = random_prompts(args.num_prompts, args.prompt_len,
                             int(llm.config.model_config.hf_config.vocab_size), args.seed)
    logits = [prompt_logits(llm, prompt) for prompt in prompts]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=args.new_tokens,
                                       ignore_eos=True), use_tqdm=False)
    torch.save({"logits": torch.stack(logits), "tokens": [o.outputs[0].token_ids for o in outs]},
               args.out)


def run_hf(args) -> None:
    """Child: transformers' logits and greedy tokens of the same prompts into args.out."""
    from transformers import AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the script's own test
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype),
                                                 device_map=device).eval()
    prompts = random_prompts(args.num_prompts, args.prompt_len, int(model.config.vocab_size),
                             args.seed)
    from tests.e2e.hf_reference import hf_greedy  # the test suite's reference decoding
    with torch.inference_mode():
        logits = [model(torch.tensor([p], device=device)).logits[0].float().cpu()
                  for p in prompts]
    tokens = [hf_greedy(model, p, args.new_tokens) for p in prompts]  # never stops at EOS
    torch.save({"logits": torch.stack(logits), "tokens": tokens}, args.out)


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(ours: dict, ref: dict) -> dict:
    errors = logits_errors(ours["logits"].reshape(-1, ours["logits"].shape[-1]),
                           ref["logits"].reshape(-1, ref["logits"].shape[-1]))
    argmax = (ours["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    prefixes = [matching_prefix(a, b) for a, b in zip(ours["tokens"], ref["tokens"])]
    return {"rel_err": errors["logits_rel_err_vs_hf"], "argmax_agreement": argmax,
            "greedy_identical": sum(p == len(t) for p, t in zip(prefixes, ref["tokens"])),
            "greedy_mean_prefix": sum(prefixes) / len(prefixes)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/llama3-8b-random")
    p.add_argument("--preset", default="llama-3-8b", help="shape of the model written if "
                   "--model-dir holds none (random weights drawn on the GPU)")
    p.add_argument("--num-layers", type=int, default=None, help="shrink the model (smoke runs)")
    p.add_argument("--tp", default="1,2", help="TP sizes, the first is the base")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--skip-fp32", action="store_true", help="no float32 reference run")
    p.add_argument("--hf", default="", metavar="DTYPES",
                   help="also run transformers in these dtypes (e.g. float32,bfloat16)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--engine-args", default="{}", help="JSON of extra LLM() arguments")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.tp = int(args.tp)
        run_layout(args)
        return
    if args.hf_child:
        run_hf(args)
        return

    make_model_dir(args.model_dir, args.preset, args.num_layers)
    sizes = [int(t) for t in args.tp.split(",")]
    runs = [(tp, args.dtype) for tp in sizes]
    if not args.skip_fp32:
        runs.append((sizes[0], "float32"))
    runs += [(None, dtype) for dtype in args.hf.split(",") if dtype]  # None: transformers
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp, dtype in runs:
            name = f"tp{tp}-{dtype}" if tp is not None else f"hf-{dtype}"
            out = os.path.join(tmp, name + ".pt")
            log(f"{name}: starting")
            mode = ["--child", "--tp", str(tp)] if tp is not None else ["--hf-child"]
            cmd = [sys.executable, os.path.abspath(__file__), *mode,
                   "--dtype", dtype, "--out", out, "--model-dir", args.model_dir,
                   "--num-prompts", str(args.num_prompts), "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens), "--seed", str(args.seed),
                   "--engine-args", args.engine_args]
            if args.enforce_eager:
                cmd.append("--enforce-eager")
            if subprocess.run(cmd).returncode != 0:
                log(f"{name}: failed")
                continue
            results[name] = torch.load(out)
            log(f"{name}: done")
    base = f"tp{sizes[0]}-{args.dtype}"
    fp32 = f"tp{sizes[0]}-float32"
    table = {}
    print(f"\n| layout | against | logits rel err | argmax agreement | greedy identical "
          f"(of {args.num_prompts}) | mean matching prefix (of {args.new_tokens}) |")
    print("|---|---|---|---|---|---|")
    for name in results:
        if name.startswith("hf-"):
            continue  # a reference only
        dtype = name.split("-", 1)[1]
        refs = (base, fp32, f"hf-{dtype}", "hf-float32")
        if name == fp32 and fp32 != base:  # the float32 truth: against transformers' only
            refs = ("hf-float32",)
        for ref in dict.fromkeys(refs):
            if ref == name or ref not in results:
                continue
            row = compare(results[name], results[ref])
            table[f"{name} vs {ref}"] = row
            print(f"| {name} | {ref} | {row['rel_err']:.2e} | {row['argmax_agreement'] * 100:.1f}% "
                  f"| {row['greedy_identical']} | {row['greedy_mean_prefix']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
