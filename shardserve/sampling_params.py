"""Per-request sampling settings, with vLLM's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from shardserve.errors import InvalidRequestError

# Below this temperature sampling is treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's `SamplingParams`)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling (OpenAI's logit_bias; -100 bans, 100 forces)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.logit_bias is not None:
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None

    def validate(self) -> None:
        """Raise InvalidRequestError naming the field and the accepted range."""
        def bad(param: str, msg: str) -> None:
            raise InvalidRequestError(msg, param=param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, f"{name} must be a finite number, got {value!r}.")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            bad("seed", f"seed must fit in a signed 64-bit integer, got {self.seed}.")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            bad("temperature", f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or self.top_k >= 2**31:
            bad("top_k", f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}.")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty.")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                bad("logit_bias", f"logit_bias keys must be token ids (non-negative integers), "
                                  f"got {token!r}.")
            if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                    or not -100.0 <= bias <= 100.0):
                bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got "
                                  f"{bias!r} for token {token}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def for_child(self, index: int) -> "SamplingParams":
        """The params of the index-th of n parallel samples: n=1, and a distinct seed if seeded."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
