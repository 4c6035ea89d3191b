"""Where a decode step's GPU time goes: the kernels of a short batch-1 generation, by total time.

    from benchmarks.kernel_profile import profile_decode, print_profile
    prof = profile_decode(llm, prompt_ids, new_tokens=32)
    print_profile(prof)

torch.profiler records every kernel (those replayed inside CUDA graphs too) while one request
generates `new_tokens` tokens. Reported: wall time per output token, summed kernel time per
token (their ratio is how busy the GPU was: well under 1 means the step waits on the host or on
launches), and the kernels with the most time, grouped by name.
"""

from __future__ import annotations

import time


def profile_decode(llm, prompt_ids: list[int], new_tokens: int = 32, top: int = 15) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shardserve import SamplingParams
    from shardserve.executor.profiler import top_rows

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    request = [{"prompt_token_ids": list(prompt_ids)}]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    llm.generate(request, params, use_tqdm=False)  # warm-up: compiled kernels, graphs
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        llm.generate(request, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - start
    rows = top_rows(prof, on_device=True, limit=None) if cuda else []
    kernel_us = sum(r["total_us"] for r in rows)
    return {"new_tokens": new_tokens, "wall_ms_per_token": wall * 1e3 / new_tokens,
            "kernel_ms_per_token": kernel_us / 1e3 / new_tokens,
            "gpu_busy": kernel_us / 1e6 / wall if wall > 0 else 0.0,
            "kernels_per_token": sum(r["count"] for r in rows) / new_tokens,
            "top": rows[:top]}


def print_profile(prof: dict, label: str = "batch-1 decode") -> None:
    print(f"{label}: {prof['wall_ms_per_token']:.2f} ms per token wall, "
          f"{prof['kernel_ms_per_token']:.2f} ms in kernels (GPU busy {prof['gpu_busy']:.0%}), "
          f"{prof['kernels_per_token']:.0f} kernels per token; the kernels with the most time:")
    per = prof["new_tokens"]
    for row in prof["top"]:
        print(f"  {row['total_us'] / 1e3 / per:8.3f} ms/token  {row['count'] / per:6.1f}x  "
              f"{row['name'][:110]}")
