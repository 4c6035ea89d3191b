"""Where a step's time goes: wraps the engine's phases with timers (synchronizing the GPU after
the model so its time is not billed to the next phase) and prints the mean per step.

    python benchmarks/step_profile.py --model-dir DIR --batch-sizes 1 256 --input-len 512 --output-len 64

On the CPU, with a tiny random model the forward is cheap and the host phases dominate, so their
cost per step can be measured without a GPU:

    python -m shardserve.testing --arch llama --preset tiny --out /tmp/tiny
    python benchmarks/step_profile.py --model-dir /tmp/tiny --device cpu --dtype float32 \\
        --batch-sizes 256 --input-len 16 --output-len 128 --async-scheduling

"host total" sums the phases that are host work on a GPU (scheduler, worker state, input
building, sampling set-up, output processing); the model, the LM head and the sampler's kernels
are device work there and are left out of it.

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

# Phases that run on the host whatever the device (summed into "host total").
HOST_PHASES = ("Scheduler.schedule", "Scheduler.update_from_output",
               "OutputProcessor.process_outputs", "RequestStates.update", "build_model_inputs",
               "sampling set-up")


# Wall time by default; --clock thread counts this thread's CPU time instead, which other
# processes on a busy machine disturb less (host phases are single-threaded Python).
_clock = time.perf_counter


def _timed(store: dict, name: str, fn, sync: bool = False):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = _clock()
        out = fn(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        store[name] += _clock() - start
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
        (runner.states, "update", False), (runner.model, "compute_logits", True),
        (runner.sampler, "forward", True),
    ]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patches]
    for obj, name, sync in patches:
        label = "model.compute_logits" if obj is runner.model else f"{type(obj).__name__}.{name}"
        setattr(obj, name, _timed(times, label, getattr(obj, name), sync))
    # The logits ([rows, vocab] float) are freed as _sample returns: free on a GPU (the caching
    # allocator), but on the CPU a large free returns pages to the OS, ~5 ms for a 50 MB
    # tensor, which would be billed to sampling set-up. Held here, they are freed untimed.
    held: list = []
    timed_logits, timed_sample = runner.model.compute_logits, runner._sample

    def holding_logits(*args, **kwargs):
        out = timed_logits(*args, **kwargs)
        held.append(out)
        return out

    def releasing_sample(*args, **kwargs):
        try:
            return timed_sample(*args, **kwargs)
        finally:
            held.clear()
    runner.model.compute_logits, runner._sample = holding_logits, releasing_sample
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
            if fn is None:
                delattr(obj, name)  # it was the class's method
            else:
                setattr(obj, name, fn)
        mr.build_model_inputs = real_build
        runner.model.forward = real_forward
        if runner.graph_runner is not None:
            runner.graph_runner.run = real_graph_run
        engine.step = real_step
    # What _sample spends besides the LM head and the sampler's kernels: its per-step set-up.
    times["sampling set-up"] = (times.get("ModelRunner._sample", 0.0)
                                - times.get("model.compute_logits", 0.0)
                                - times.get("Sampler.forward", 0.0))
    times["host total"] = sum(times.get(k, 0.0) for k in HOST_PHASES)
    return {k: v / max(steps, 1) for k, v in times.items()} | {"steps": steps}


def print_profile(prof: dict, title: str) -> None:
    print(f"\n{title}: {prof['steps']} steps, ms per step")
    for k, v in sorted(prof.items(), key=lambda kv: -kv[1] if kv[0] != "steps" else 0):
        if k != "steps":
            mark = "*" if k in HOST_PHASES else " "
            print(f" {mark}{k:32s} {v * 1e3:8.3f}")
    print("  (* host phases, summed in 'host total')")


def main() -> None:
    from shardserve import LLM, SamplingParams
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the engine's (on for CUDA)")
    p.add_argument("--repeat", type=int, default=1, help="profile each batch size this many times")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = p.parse_args()
    if args.clock == "thread":
        global _clock
        _clock = time.thread_time
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        from shardserve.testing import write_random_model
        write_random_model(args.model_dir, preset="llama-3-8b", device="cuda")
    llm = LLM(args.model_dir, device=args.device, dtype=args.dtype, max_model_len=4096,
              enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling)
    vocab = int(llm.config.model_config.hf_config.vocab_size)
    rng = random.Random(0)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                            ignore_eos=True)
    for bs in args.batch_sizes:
        prompts = [{"prompt_token_ids": [rng.randrange(1000, vocab) for _ in range(args.input_len)]}
                   for _ in range(bs)]
        llm.generate(prompts[:4], params, use_tqdm=False)
        for _ in range(args.repeat):
            start = time.perf_counter()
            prof = profile_llm(llm, prompts, params)
            elapsed = time.perf_counter() - start
            print_profile(prof, f"batch {bs} x ({args.input_len} in / {args.output_len} out), "
                                f"{bs * args.output_len / elapsed:.0f} output tok/s with timers on")


if __name__ == "__main__":
    main()
