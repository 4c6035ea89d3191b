"""Helpers every GPU benchmark script shares: timestamps, a random-weight model folder drawn on
the GPU, the measured copy bandwidth (the roofline's denominator), random token prompts, and
one measurement run in a process of its own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_child(script: str, args: list[str], name: str) -> dict | None:
    """`python script --child --out FILE *args` in its own process, so that one measurement's
    GPU memory never stays for the next; the JSON it wrote to FILE, or None (logged) when it
    failed."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        log(f"{name}: starting")
        done = subprocess.run([sys.executable, os.path.abspath(script), "--child", "--out", out,
                               *args], check=False)
        if done.returncode != 0:
            log(f"{name}: failed (exit {done.returncode})")
            return None
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def make_model_dir(path: str, preset: str, num_layers: int | None = None,
                   weights: bool = True) -> str:
    """A random-weight folder of `preset` at `path` (kept if it exists), drawn on the GPU
    (where there is one); weights=False: config and tokenizer only, for --load-format dummy."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from shardserve.testing import write_random_model
    overrides = {"num_hidden_layers": num_layers} if num_layers else {}
    log(f"writing a random {preset}-shaped model to {path} {overrides}")
    start = time.perf_counter()
    import torch
    on_gpu = weights and torch.cuda.is_available()
    write_random_model(path, preset=preset, device="cuda" if on_gpu else "cpu",
                       weights=weights, **overrides)
    log(f"written in {time.perf_counter() - start:.0f} s")
    return path


def logits_errors(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far our logits [T, V] are from transformers', over all of them (float64):

    logits_rel_err_vs_hf        ||ours - ref|| / ||ref||, the usual norm-wise relative error
    logits_max_err_over_max     max |ours - ref| / max |ref|, what the scripts reported before:
                                one element's worst rounding over another element's size, so
                                it moves with single outliers and reads larger
    """
    ours, ref = ours.double(), ref.double()
    diff = ours - ref
    return {"logits_rel_err_vs_hf": (diff.norm() / ref.norm()).item(),
            "logits_max_err_over_max": (diff.abs().max() / ref.abs().max()).item()}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), over a 2 GiB buffer."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * n / (time.perf_counter() - start)
    del x, y
    torch.cuda.empty_cache()
    return bw


def cuda_graph_us(body, replays: int, barrier=lambda: None, warm_replays: int = 2) -> float:
    """Microseconds per replay of a CUDA graph captured from body() (run once eagerly first, on
    a side stream, as torch asks). `barrier` lines ranks up before the capture (NCCL captures
    are collective-ordered) and before the timed replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(warm_replays):
        graph.replay()
    torch.cuda.synchronize()
    barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) * 1000.0 / replays


def prompt_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Full-vocabulary float32 logits [len, vocab] of one prompt, outside the KV cache, from
    any layout (Worker.prompt_logits on every rank; the TP group's first rank answers)."""
    import numpy as np
    shape, data = next(r for r in llm.engine.core.executor.collective_rpc(
        "prompt_logits", [list(token_ids)]) if r)
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts clear of the low ids where special tokens usually live."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(num)]
