"""The engine core's view of one request (one sequence; n > 1 fans out before it gets here)."""

from __future__ import annotations

import enum
import time

from shardserve.engine.bad_words import needs_history
from shardserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything past this point is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """Token state of one sequence. The scheduler's one rule: num_computed_tokens catches up
    with num_tokens (prompt + outputs) under the step's token budget."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), arrival_time: float | None = None,
                 max_tokens: int | None = None, primary_eos_token_id: int | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids  # the tokenizer's EOS plus generation_config's
        # The tokenizer's own EOS: stopping on it leaves stop_reason None; on any other of
        # eos_token_ids, stop_reason is the id (vLLM treats those as stop_token_ids).
        self.primary_eos_token_id = primary_eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # The effective output limit (max_tokens, or what is left of max_model_len).
        self.max_tokens = max_tokens if max_tokens is not None else (sampling_params.max_tokens or 1)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first scheduling; -1: not yet
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Prompt positions whose logprobs went out (a preempted request recomputes them).
        self.num_prompt_logprobs_sent = 0
        self.admitted_step_id = 0  # the scheduler step that last (re)admitted it
        # Prefix-cache hashes of this request's full blocks, extended as tokens arrive.
        self.block_hashes: list[int] = []
        # How many of all_token_ids the workers already hold (they get the rest as a diff).
        self.num_synced_tokens = 0
        # Async scheduling: tokens that steps in flight will sample, not known here yet. The
        # next step may already run on them (the worker feeds them on the device).
        self.num_output_placeholders = 0
        self.first_scheduled_time: float | None = None
        p = sampling_params
        # Penalties read every earlier output token on the host, so a step that samples for
        # this request cannot start before the previous one's token is known.
        # So do bad words of several tokens (is the word's start the last output?).
        self.needs_known_tokens = (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                                   or p.frequency_penalty != 0.0
                                   or needs_history(p._bad_words_token_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
