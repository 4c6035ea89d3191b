"""Tensor parallelism on the GPU: TP 1 vs TP 2 (or any list) on the Llama-3-8B shape in bf16.

    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b               # the full run
    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --quick       # minutes, not tens
    python benchmarks/tp_scaling.py --model-dir /tmp/llama3-8b --enforce-eager   # comm share

For each TP size, in its own process (so one run's GPU memory never stays behind for the next):
  - agreement: greedy tokens of a few prompts, compared with the first TP size's
    (bf16 under a different reduction order: report the matching prefix, not equality);
  - batch-1 decode tokens/s: (N - 1) tokens over the time of an N-token generation minus a
    1-token one, so prefill and start-up drop out;
  - throughput: --num-prompts random prompts of --input-len tokens, --output-len tokens each
    (ignore_eos), all submitted at once; output and total tokens/s;
  - the communication share: time in TP collectives (all-reduces and the logits gather; CUDA
    events on the driver rank) over the step time, for the batch-1 decode and for the throughput run. All-reduces inside replayed
    CUDA graphs cannot be timed, so with graphs on (the default) decode steps show few timed
    collectives; --enforce-eager measures every step (slower steps, so a lower bound on the
    share with graphs, where compute shrinks and communication does not).

Writes the model folder first if --model-dir holds none (random weights drawn on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/llama3-8b")
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--num-layers", type=int, default=None, help="shorter model of the same width")
    p.add_argument("--tp", default="1,2", help="comma-separated TP sizes; the first is the base")
    p.add_argument("--decode-tokens", type=int, default=256, help="batch-1 decode length")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="64 decode tokens; 128 x (256 in / 128 out) throughput")
    p.add_argument("--json", default=None, help="save every result here")
    p.add_argument("--one-run", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script on a tiny model")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; sizes given explicitly still win
        quick = {"decode_tokens": 64, "num_prompts": 128, "input_len": 256, "output_len": 128}
        for name, value in quick.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, vocab) for _ in range(length)]}
            for _ in range(num)]


def comm_delta(before: dict, after: dict) -> dict:
    steps = after.get("num_steps", 0) - before.get("num_steps", 0)
    step_s = after.get("step_seconds_total", 0.0) - before.get("step_seconds_total", 0.0)
    comm_s = after.get("tp_comm_seconds_total", 0.0) - before.get("tp_comm_seconds_total", 0.0)
    reduces = (after.get("tp_collectives_per_step", 0.0) * after.get("num_steps", 0)
               - before.get("tp_collectives_per_step", 0.0) * before.get("num_steps", 0))
    return {"comm_share": comm_s / step_s if step_s > 0 else None,
            "timed_collectives_per_step": reduces / steps if steps else 0.0,
            "step_broadcast_us_avg": after.get("step_broadcast_us_avg"),
            "step_encode_us_avg": after.get("step_encode_us_avg")}


def one_run(args: argparse.Namespace, tp: int) -> dict:
    """Everything measured for one TP size (runs in a child process)."""
    from shardserve import LLM, SamplingParams

    max_len = max(args.input_len + args.output_len, 64 + args.decode_tokens) + 16
    start = time.perf_counter()
    llm = LLM(args.model_dir, tensor_parallel_size=tp, dtype=args.dtype, device=args.device,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager)
    result: dict = {"tp": tp, "startup_s": time.perf_counter() - start,
                    "num_kv_blocks": llm.config.cache_config.num_blocks}
    executor = llm.engine.core.executor
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm.generate(random_prompts(2, 16, vocab, 99), greedy, use_tqdm=False)  # warm-up

    outs = llm.generate(random_prompts(8, 64, vocab, 1), greedy, use_tqdm=False)
    result["greedy_tokens"] = [o.outputs[0].token_ids for o in outs]

    prompt = random_prompts(1, 32, vocab, 2)

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - t0

    timed(args.decode_tokens)  # warm-up at this length
    t1 = min(timed(1) for _ in range(3))
    before = executor.comm_stats()
    tn = timed(args.decode_tokens)
    result["batch1_decode_tok_s"] = (args.decode_tokens - 1) / (tn - t1)
    result["batch1_comm"] = comm_delta(before, executor.comm_stats())
    log(f"TP {tp}: batch-1 decode {result['batch1_decode_tok_s']:.1f} tok/s; "
        f"comm {result['batch1_comm']}")

    if not args.skip_throughput:
        prompts = random_prompts(args.num_prompts, args.input_len, vocab, 3)
        params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
        before = executor.comm_stats()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        num_out = sum(len(o.outputs[0].token_ids) for o in outs)
        result["throughput"] = {"elapsed_s": elapsed, "output_tok_s": num_out / elapsed,
                                "total_tok_s": (num_out + args.num_prompts * args.input_len)
                                / elapsed,
                                "comm": comm_delta(before, executor.comm_stats())}
        log(f"TP {tp}: throughput {result['throughput']}")
    llm.shutdown()
    return result


def main() -> None:
    args = parse_args()
    if args.one_run is not None:
        result = one_run(args, args.one_run)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return

    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        from shardserve.testing import write_random_model
        overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else {}
        log(f"writing a random {args.preset} bf16 model to {args.model_dir} {overrides}")
        write_random_model(args.model_dir, preset=args.preset, device="cuda", **overrides)

    results = []
    for tp in [int(t) for t in args.tp.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        argv = [a for a in sys.argv[1:]]
        log(f"TP {tp}: starting")
        code = subprocess.call([sys.executable, os.path.abspath(__file__), *argv,
                                "--one-run", str(tp), "--result-file", path])
        if code != 0:
            log(f"TP {tp}: the run failed with exit code {code}")
            continue
        with open(path) as f:
            results.append(json.load(f))
        os.unlink(path)
    if not results:
        sys.exit(1)
    report(args, results)


def report(args: argparse.Namespace, results: list[dict]) -> None:
    base = results[0]
    print()
    print(f"{args.model_dir} ({args.dtype}, {args.device}){', eager' if args.enforce_eager else ', CUDA graphs'}; "
          f"batch-1 decode of {args.decode_tokens} tokens; throughput {args.num_prompts} x "
          f"({args.input_len} in / {args.output_len} out)")
    header = (f"{'TP':>3} {'KV blocks':>10} {'b1 tok/s':>9} {'speed-up':>9} {'b1 comm':>8} "
              f"{'out tok/s':>10} {'speed-up':>9} {'tput comm':>10} {'greedy match':>13}")
    print(header)
    for r in results:
        match = _agreement(base["greedy_tokens"], r["greedy_tokens"])
        tput = r.get("throughput") or {}
        base_tput = (base.get("throughput") or {}).get("output_tok_s")
        print(f"{r['tp']:>3} {r['num_kv_blocks']:>10} {r['batch1_decode_tok_s']:>9.1f} "
              f"{r['batch1_decode_tok_s'] / base['batch1_decode_tok_s']:>8.2f}x "
              f"{_share(r['batch1_comm']):>8} "
              f"{tput.get('output_tok_s', float('nan')):>10.1f} "
              f"{(tput.get('output_tok_s', float('nan')) / base_tput if base_tput else float('nan')):>8.2f}x "
              f"{_share(tput.get('comm')):>10} {match:>13}")
    print("comm = time in TP collectives / step time on the driver rank (n/a: TP 1, or the "
          "steps ran in CUDA graphs; see --enforce-eager). greedy match = tokens equal to TP "
          f"{base['tp']}'s before the first difference, summed over 8 prompts x 32.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def _share(comm: dict | None) -> str:
    if not comm or comm.get("comm_share") is None or comm["timed_collectives_per_step"] < 2:
        return "n/a"
    return f"{100 * comm['comm_share']:.1f}%"


def _agreement(base: list[list[int]], other: list[list[int]]) -> str:
    same = 0
    for a, b in zip(base, other):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return f"{same}/{sum(len(a) for a in base)}"


if __name__ == "__main__":
    main()
