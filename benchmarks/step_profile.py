"""Where a step's time goes: wraps the engine's phases with timers (synchronizing the GPU after
the model so its time is not billed to the next phase) and prints the mean per step.

    python benchmarks/step_profile.py --model-dir DIR --batch-size 256 --input-len 512 --output-len 64

Also importable: `profile_llm(llm, prompts, params)` returns {phase: seconds per step}.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(store: dict, name: str, fn, sync: bool = False):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        store[name] += time.perf_counter() - start
        return out
    return wrapper


def profile_llm(llm, prompts, params) -> dict[str, float]:
    import shardserve.executor.model_runner as mr

    engine = llm.engine
    core = engine.core
    runner = core.executor.worker.runner
    times: dict[str, float] = collections.defaultdict(float)
    patches = [
        (core.scheduler, "schedule", False), (core.scheduler, "update_from_output", False),
        (engine.output_processor, "process_outputs", False), (runner, "_sample", True),
        (runner.states, "update", False),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, sync in patches:
        setattr(obj, name, _timed(times, f"{type(obj).__name__}.{name}", getattr(obj, name), sync))
    real_build = mr.build_model_inputs
    mr.build_model_inputs = _timed(times, "build_model_inputs", real_build, True)
    real_forward = runner.model.forward
    if runner.graph_runner is not None:
        real_graph_run = runner.graph_runner.run
        runner.graph_runner.run = _timed(times, "model (graph replay)", real_graph_run, True)
    runner.model.forward = _timed(times, "model (eager)", real_forward, True)
    steps = 0
    real_step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return real_step()
    engine.step = _timed(times, "engine.step total", counted_step, True)
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        mr.build_model_inputs = real_build
        runner.model.forward = real_forward
        if runner.graph_runner is not None:
            runner.graph_runner.run = real_graph_run
        engine.step = real_step
    return {k: v / max(steps, 1) for k, v in times.items()} | {"steps": steps}


def print_profile(prof: dict, title: str) -> None:
    print(f"\n{title}: {prof['steps']} steps, ms per step")
    for k, v in sorted(prof.items(), key=lambda kv: -kv[1] if kv[0] != "steps" else 0):
        if k != "steps":
            print(f"  {k:32s} {v * 1e3:8.3f}")


def main() -> None:
    from shardserve import LLM, SamplingParams
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        from shardserve.testing import write_random_model
        write_random_model(args.model_dir, preset="llama-3-8b", device="cuda")
    llm = LLM(args.model_dir, dtype="bfloat16", max_model_len=4096, enforce_eager=args.enforce_eager)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    for bs in args.batch_sizes:
        prompts = [{"prompt_token_ids": [rng.randrange(1000, vocab) for _ in range(args.input_len)]}
                   for _ in range(bs)]
        llm.generate(prompts[:4], params, use_tqdm=False)
        start = time.perf_counter()
        prof = profile_llm(llm, prompts, params)
        elapsed = time.perf_counter() - start
        print_profile(prof, f"batch {bs} x ({args.input_len} in / {args.output_len} out), "
                            f"{bs * args.output_len / elapsed:.0f} output tok/s with timers on")


if __name__ == "__main__":
    main()
