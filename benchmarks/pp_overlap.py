"""Pipeline parallelism: throughput with P micro-batches in flight vs one at a time.

Every stage sleeps inside its forward, standing in for a model whose stages are heavy (the
tiny model's own compute is small beside it), so the numbers isolate the scheduling:

- per-token cost (SHARDSERVE_PP_STAGE_DELAY_PER_TOKEN_S; compute-bound stages, e.g. prefill
  or large batches): one micro-batch in flight leaves P-1 stages idle; P in flight, each with
  1/P of the requests, keep them all busy: up to P times the throughput.
- fixed cost per forward (SHARDSERVE_PP_STAGE_DELAY_S; bandwidth-bound decode at small batch):
  splitting the same requests over P micro-batches costs each one the full forward, so the
  busy ratio rises but throughput does not; it grows only with more requests per micro-batch.

    python benchmarks/pp_overlap.py [--pp 2] [--requests 8] [--tokens 16]

Prints, per regime and for 1 and P micro-batches in flight: wall time, output tokens/s, the
average in flight, the stages' busy ratios, and the gain. CPU only (gloo); needs no GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def run(model_dir: str, pp: int, in_flight: int, num_requests: int, num_tokens: int) -> dict:
    from shardserve import LLM, SamplingParams

    llm = LLM(model_dir, pipeline_parallel_size=pp, device="cpu", dtype="float32",
              max_model_len=256, kv_cache_memory_bytes=16 << 20)
    try:
        llm.engine.core.max_in_flight = in_flight  # 1: the classic one-step-at-a-time loop
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": [i + 1, i + 2, i + 3, i + 4]} for i in range(num_requests)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = llm.engine.core.executor.pipeline_stats()
        return {"wall_s": wall, "tok_s": tokens / wall, "tokens": outs,
                "busy": stats["pp_stage_busy_ratio"],
                "in_flight": stats["pp_micro_batches_in_flight_avg"]}
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--per-token", type=float, default=0.005,
                        help="seconds per token per stage forward (compute-bound regime)")
    parser.add_argument("--per-forward", type=float, default=0.04,
                        help="seconds per stage forward (bandwidth-bound regime)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from shardserve.testing import write_random_model

    regimes = [("per-token", "SHARDSERVE_PP_STAGE_DELAY_PER_TOKEN_S", args.per_token,
                f"{args.per_token * 1000:g} ms/token"),
               ("per-forward", "SHARDSERVE_PP_STAGE_DELAY_S", args.per_forward,
                f"{args.per_forward * 1000:g} ms/forward")]
    print(f"pp={args.pp}, {args.requests} requests x {args.tokens} output tokens, 4-token "
          "prompts (CPU, gloo); every stage sleeps in its forward")
    print(f"{'stage cost':>18} {'in flight':>9} {'wall s':>7} {'tok/s':>7} {'avg in flight':>13}"
          "  stage busy ratio")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_random_model(tmp, architecture="llama", preset="tiny", seed=0,
                                           num_hidden_layers=args.layers))
        for _, env, value, label in regimes:
            os.environ[env] = str(value)
            one = run(model_dir, args.pp, 1, args.requests, args.tokens)
            many = run(model_dir, args.pp, args.pp, args.requests, args.tokens)
            del os.environ[env]
            same = ([o.outputs[0].token_ids for o in one["tokens"]]
                    == [o.outputs[0].token_ids for o in many["tokens"]])
            for n, r in ((1, one), (args.pp, many)):
                busy = " ".join(f"{b:.2f}" for b in r["busy"])
                print(f"{label:>18} {n:>9} {r['wall_s']:>7.2f} {r['tok_s']:>7.1f} "
                      f"{r['in_flight']:>13.2f}  {busy}")
            print(f"{'':>18} gain with {args.pp} in flight: {many['tok_s'] / one['tok_s']:.2f}x "
                  f"(ideal {args.pp}x in the per-token regime); same tokens: {same}")


if __name__ == "__main__":
    main()
