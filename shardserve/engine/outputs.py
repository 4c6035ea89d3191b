"""Every process boundary is one of these plain dataclasses (DESIGN.md).

    engine core ── SchedulerOutput ──▶ workers ── ModelRunnerOutput ──▶ engine core
    engine core ── EngineCoreOutputs ──▶ front end (detokenizer, LLM / server)

The scheduler sends diffs: a request's prompt and sampling params travel once (NewRequestData);
after that only its new blocks and new tokens do (CachedRequestData).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the workers have not seen, or one resumed after preemption (workers dropped it)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resumed after preemption
    sampling_params: SamplingParams
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens already in the cache (prefix hit or earlier chunks)
    eos_token_ids: list[int]  # masked until min_tokens are out


@dataclass(slots=True)
class CachedRequestData:
    """A request the workers hold from an earlier step."""

    req_id: str
    new_token_ids: list[int]  # tokens appended since the workers last heard of it
    new_block_ids: list[int]  # blocks appended to its block table
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's work: which requests run and how many tokens of each."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # workers drop these (finished, aborted or preempted)
    step_id: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs at one position: the chosen token and the top-k alternatives.

    Log-softmax of the raw logits (before temperature and penalties), as vLLM reports them.
    `ranks[i]` is 1 for the most likely token.
    """

    token_ids: list[int]  # chosen token first, then the top-k (the chosen one may repeat)
    logprobs: list[float]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """What the sampling rank sends back after a step."""

    req_ids: list[str]  # requests that reached the end of their tokens and got a sample
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None  # aligned with req_ids when any request asked
    # req_id -> logprobs of the prompt tokens this step's chunk predicts (positions 1..)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """One request's news from one step."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class EngineCoreOutputs:
    outputs: list[EngineCoreOutput]
    timestamp: float = 0.0
