"""The messages between the front end (AsyncLLM) and the engine core process.

    front ── EngineCoreRequest | AbortRequests | ShutdownCore ──▶ core     (ZMQ PUSH/PULL)
    front ◀── CoreReady | CoreStepOutputs | CoreFailed ─────────── core     (ZMQ PUSH/PULL)

All are plain dataclasses, msgpack-encoded by engine/serial.py (no pickle on the wire); the
per-request payloads reuse the engine's own boundary classes (EngineCoreOutput,
SamplingParams, SchedulerStats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.engine.outputs import EngineCoreOutput, TokenLogprobs
from shardserve.engine.scheduler import SchedulerStats
from shardserve.engine.serial import Serializer
from shardserve.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """One sequence to generate, already validated and tokenized by the front end (n > 1 has
    fanned out into one of these per sample)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float  # time.monotonic() of the front; CLOCK_MONOTONIC is host-wide
    max_tokens: int  # the effective output limit (max_tokens clamped to the context)
    primary_eos_token_id: int | None = None  # the tokenizer's EOS (see Request)


@dataclass
class AbortRequests:
    """Finish these sequences now and free their KV blocks (client gone, stop string found)."""

    request_ids: list[str]


@dataclass
class ShutdownCore:
    """Leave the loop and exit 0."""


@dataclass
class ProfileControl:
    """Start (into out_dir) or stop torch.profiler on every rank (executor/profiler.py)."""

    action: str  # "start" | "stop"
    out_dir: str = ""


@dataclass
class ProfileResult:
    """The answer to ProfileControl: each rank's summary on stop, or why it failed."""

    action: str
    summaries: list = field(default_factory=list)
    error: str = ""


@dataclass
class CoreReady:
    """The model is loaded and the KV cache allocated; requests may come."""

    pid: int
    num_blocks: int
    startup_seconds: dict[str, float]


@dataclass
class CoreStats:
    """A periodic snapshot for metrics."""

    scheduler: SchedulerStats
    # GPU index -> bytes in use / in total, where the core can see GPUs; empty on CPU.
    gpu_memory_used_bytes: dict[int, int] = field(default_factory=dict)
    gpu_memory_total_bytes: dict[int, int] = field(default_factory=dict)
    # EngineCore.parallel_stats(): tp_comm_time_ratio, pp_stage_busy_ratio_<i>, ...
    parallel: dict[str, float] = field(default_factory=dict)


@dataclass
class CoreStepOutputs:
    """What the core has to say after a step (or after handling aborts while idle)."""

    outputs: list[EngineCoreOutput]
    # Request id -> time.monotonic() it was first scheduled, for requests first scheduled since
    # the last message (the front derives queue time and its own waiting count from it).
    scheduled: dict[str, float]
    stats: CoreStats | None = None
    timestamp: float = 0.0
    # Tokens the model computed in the step these outputs came from (0: no step came back).
    num_step_tokens: int = 0


@dataclass
class CoreFailed:
    """The core hit an exception and exits non-zero; every request it held got an error output."""

    message: str
    traceback: str = ""


WIRE_CLASSES = (EngineCoreRequest, AbortRequests, ShutdownCore, CoreReady, CoreStats,
                CoreStepOutputs, CoreFailed, ProfileControl, ProfileResult, EngineCoreOutput, TokenLogprobs, SamplingParams,
                SchedulerStats)


def make_serializer() -> Serializer:
    return Serializer(WIRE_CLASSES)
