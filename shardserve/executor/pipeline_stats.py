"""Stage busy time under pipeline parallelism: measured on each stage, tallied by the engine.

Worker side, `StageTimer`: each step's stage work (after the previous stage's hidden states
have arrived, through the forward and, on the last stage, sampling) is one span. On CPU the
span is wall time (time.monotonic, the same clock in every process of a host, so spans of
different stages can be laid side by side); on CUDA the busy seconds come from a pair of CUDA
events around the work (the CPU only launches it), read once they have completed.

Engine side, `PipelineStats`: TP rank 0 of every stage reports each step's span ("pstat"
messages; the driver's rides on its "out" reply). Per stage it keeps cumulative busy seconds
and a window of recent spans; the busy ratio is the stage's busy time over the wall time those
spans cover. With one micro-batch in flight each stage idles while the others work (ratio
about 1/P); with P in flight every stage can stay busy (ratio near 1). `trace` keeps the last
spans, (stage, seq, start, end), for tests and benchmarks.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class StageTimer:
    """Times one stage's work per step (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.use_cuda_events = device.type == "cuda"
        self._start = 0.0
        self._start_event = None
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._cuda_busy_s = 0.0

    def start(self) -> None:
        self._start = time.monotonic()
        if self.use_cuda_events:
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def stop(self) -> tuple[float, float, float]:
        """(start, end, busy seconds) of the span begun by start(). On CUDA the busy seconds
        are those of earlier spans whose events have completed since (so they lag a step)."""
        end = time.monotonic()
        if not self.use_cuda_events:
            return self._start, end, end - self._start
        end_event = torch.cuda.Event(enable_timing=True)
        end_event.record()
        self._pending.append((self._start_event, end_event))
        busy = 0.0
        while self._pending and self._pending[0][1].query():
            s, e = self._pending.popleft()
            busy += s.elapsed_time(e) / 1000.0
        return self._start, end, busy


class PipelineStats:
    """The engine's per-stage tally of the stages' reports (see the module doc)."""

    def __init__(self, num_stages: int, window: int = 64, trace_len: int = 4096) -> None:
        self.num_stages = num_stages
        self.busy_s = [0.0] * num_stages
        self.num_spans = [0] * num_stages
        self._recent: list[deque[tuple[float, float, float]]] = [
            deque(maxlen=window) for _ in range(num_stages)]
        self.trace: deque[tuple[int, int, float, float]] = deque(maxlen=trace_len)
        self._in_flight_sum = 0
        self._num_submits = 0

    def record(self, stage: int, seq: int, start: float, end: float, busy_s: float) -> None:
        self.busy_s[stage] += busy_s
        self.num_spans[stage] += 1
        self._recent[stage].append((start, end, busy_s))
        self.trace.append((stage, seq, start, end))

    def record_submit(self, num_in_flight: int) -> None:
        """The number of steps in flight just after one was submitted."""
        self._in_flight_sum += num_in_flight
        self._num_submits += 1

    def busy_ratio(self, stage: int) -> float:
        recent = self._recent[stage]
        if not recent:
            return 0.0
        wall = recent[-1][1] - recent[0][0]
        busy = sum(b for _, _, b in recent)
        return min(busy / wall, 1.0) if wall > 0 else 0.0

    def as_dict(self) -> dict[str, list[float] | float]:
        """pp_stage_busy_ratio and pp_stage_busy_seconds_total (lists indexed by stage),
        pp_stage_steps_total, and pp_micro_batches_in_flight_avg."""
        return {
            "pp_stage_busy_ratio": [self.busy_ratio(s) for s in range(self.num_stages)],
            "pp_stage_busy_seconds_total": list(self.busy_s),
            "pp_stage_steps_total": [float(n) for n in self.num_spans],
            "pp_micro_batches_in_flight_avg": (self._in_flight_sum / self._num_submits
                                               if self._num_submits else 0.0),
        }
