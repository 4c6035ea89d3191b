"""Time spent in collectives, for the communication share of a step (the seed's 通信占比).

A `CommTimer` is installed on one GroupCoordinator of one rank (the driver's TP group) with
`group.enable_comm_timer(timer)`; the group's all_reduce, all_gather and gather are then timed,
and nothing else pays for it (an un-timed group keeps its plain methods). On CUDA a collective
runs asynchronously on the stream, so the timer records a pair of CUDA events around each one and reads their elapsed
times only at `collect()`, after the step has synchronised (the sampled tokens' .tolist()); on
CPU (gloo) the call is synchronous and perf_counter suffices.

The time includes waiting for the slowest rank to arrive, so load imbalance between ranks shows
up as communication, as it would in any profiler.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class CommTimer:
    """Accumulates the time of the collectives it wraps, per step."""

    def __init__(self, device: torch.device) -> None:
        self.use_cuda_events = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._count = 0

    def time(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) and count its duration."""
        if self.use_cuda_events and torch.cuda.is_current_stream_capturing():
            # Timing events cannot be recorded into a CUDA graph: replayed steps go unmeasured
            # (measure the share with enforce_eager).
            return fn(*args, **kwargs)
        self._count += 1
        if self.use_cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._seconds += time.perf_counter() - t0
        return out

    def collect(self) -> tuple[float, int]:
        """(seconds, number of collectives) since the last collect; waits for pending events."""
        return self.resolve(self.detach())

    def detach(self) -> tuple[list, float, int]:
        """This step's records so far, without waiting: with async scheduling the next step
        is queued before this one's are read (resolve() them once its tokens are back)."""
        taken = (self._events, self._seconds, self._count)
        self._events, self._seconds, self._count = [], 0.0, 0
        return taken

    @staticmethod
    def resolve(taken: tuple[list, float, int]) -> tuple[float, int]:
        events, seconds, count = taken
        if events:
            events[-1][1].synchronize()
            seconds += sum(s.elapsed_time(e) for s, e in events) / 1000.0
        return seconds, count


class StepStats:
    """The engine's tally of the driver's per-step reports, for /metrics.

    `as_dict()["tp_comm_time_ratio"]` is the communication share over the last `window` steps
    (what a gauge should show); the *_total counters are cumulative (for rates).
    """

    def __init__(self, window: int = 64) -> None:
        self.num_steps = 0
        self.step_s = 0.0
        self.comm_s = 0.0
        self.num_comm = 0
        self.broadcast_s = 0.0
        self.num_broadcast = 0
        self.encode_s = 0.0  # engine side: encoding and sending each step
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)

    def record(self, report: dict[str, float]) -> None:
        """One step's report from the driver: step_s, comm_s, num_comm and broadcast_s (send
        to decoded on the driver; negative when the driver is on another host)."""
        self.num_steps += 1
        self.step_s += report["step_s"]
        self.comm_s += report["comm_s"]
        self.num_comm += int(report["num_comm"])
        if report["broadcast_s"] >= 0:
            self.broadcast_s += report["broadcast_s"]
            self.num_broadcast += 1
        self._recent.append((report["step_s"], report["comm_s"]))

    def as_dict(self) -> dict[str, float]:
        recent_step = sum(step for step, _ in self._recent)
        recent_comm = sum(comm for _, comm in self._recent)
        n = max(self.num_steps, 1)
        return {
            "tp_comm_time_ratio": recent_comm / recent_step if recent_step > 0 else 0.0,
            "tp_comm_seconds_total": self.comm_s,
            "step_seconds_total": self.step_s,
            "num_steps": self.num_steps,
            "tp_collectives_per_step": self.num_comm / n,
            "step_encode_us_avg": self.encode_s / n * 1e6,
            "step_broadcast_us_avg": (self.broadcast_s / self.num_broadcast * 1e6
                                      if self.num_broadcast else 0.0),
        }
