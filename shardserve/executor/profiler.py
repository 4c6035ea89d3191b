"""torch.profiler on every rank, started and stopped by the engine (vLLM's start_profile /
stop_profile, and its VLLM_TORCH_PROFILER_DIR as SHARDSERVE_TORCH_PROFILER_DIR).

A profiler in the caller's process sees only that process: under tensor or pipeline
parallelism the model runs in the rank processes, so each rank profiles itself and writes

    <dir>/trace_rank<R>.json      a Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev)
    <dir>/kernels_rank<R>.txt     the kernels (CUDA) or operators (CPU) with the most time

and the summary comes back to the caller (LLM.stop_profile()) as one dict a rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch

PROFILER_DIR_ENV = "SHARDSERVE_TORCH_PROFILER_DIR"
TOP_ROWS = 30


def profiler_dir(out_dir: str | os.PathLike | None) -> str:
    """The folder to write to: the argument, else $SHARDSERVE_TORCH_PROFILER_DIR."""
    chosen = out_dir or os.environ.get(PROFILER_DIR_ENV)
    if not chosen:
        raise ValueError(f"start_profile needs a folder: pass out_dir or set {PROFILER_DIR_ENV}.")
    return os.path.abspath(os.fspath(chosen))


class RankProfiler:
    """One rank's profiler: start() begins recording, stop() writes the files."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self._prof: Any = None
        self._dir = ""

    @property
    def running(self) -> bool:
        return self._prof is not None

    def start(self, out_dir: str) -> None:
        from torch.profiler import ProfilerActivity, profile
        if self._prof is not None:
            raise RuntimeError(f"Rank {self.rank} is already profiling; call stop_profile first.")
        os.makedirs(out_dir, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._dir = out_dir
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self) -> dict[str, Any]:
        if self._prof is None:
            raise RuntimeError(f"Rank {self.rank} is not profiling; call start_profile first.")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued kernels belong to this window
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        trace = os.path.join(self._dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(trace)
        rows = top_rows(prof, on_device=self.device.type == "cuda")
        table = os.path.join(self._dir, f"kernels_rank{self.rank}.txt")
        with open(table, "w") as fh:
            fh.write(format_rows(rows, self.rank, self.device.type))
        return {"rank": self.rank, "trace": trace, "summary": table, "top": rows[:10]}


def top_rows(prof: Any, on_device: bool, limit: int | None = TOP_ROWS) -> list[dict[str, Any]]:
    """Kernels by total device time (CUDA), or operators by self CPU time (CPU); all of them
    with limit None."""
    from torch.autograd import DeviceType
    rows = []
    for evt in prof.key_averages():
        if on_device:
            # Kernels only: an eager operator also carries its kernels' time, listed apart.
            if getattr(evt, "device_type", None) == DeviceType.CPU:
                continue
            us = float(getattr(evt, "self_device_time_total", 0.0) or 0.0)
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            rows.append({"name": evt.key, "count": int(evt.count), "total_us": us})
    rows.sort(key=lambda r: -r["total_us"])
    return rows[:limit]


def format_rows(rows: list[dict[str, Any]], rank: int, device: str) -> str:
    what = "kernels by GPU time" if device == "cuda" else "operators by self CPU time"
    total = sum(r["total_us"] for r in rows) or 1.0
    lines = [f"rank {rank}: top {len(rows)} {what}",
             f"{'total ms':>10} {'share':>6} {'calls':>7}  name"]
    for r in rows:
        lines.append(f"{r['total_us'] / 1e3:10.3f} {r['total_us'] / total:6.1%} "
                     f"{r['count']:7d}  {r['name'][:120]}")
    return "\n".join(lines) + "\n"
