"""Per-request sampling settings, with vLLM's names and defaults."""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import InitVar, dataclass, field, replace
from typing import Any

from shardserve.errors import InvalidRequestError

_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
               "truncate_prompt_tokens")
_OPTIONAL_INT_FIELDS = frozenset({"seed", "max_tokens", "logprobs", "prompt_logprobs",
                                  "truncate_prompt_tokens"})

# SamplingParams.from_optional: these take their default when given as None (vLLM's).
_NONE_MEANS_DEFAULT = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty",
                       "temperature", "top_p")

# BeamSearchParams.length_penalty's bound (see its check).
MAX_LENGTH_PENALTY = 30

# Below this temperature sampling is treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5


def check_truncate_prompt_tokens(keep: object) -> None:
    """SamplingParams' rule, also for the server's field, which reaches the prompt unwrapped."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not (keep == -1 or keep >= 1):
        raise InvalidRequestError(f"truncate_prompt_tokens must be at least 1, or -1 "
                                  f"(max_model_len), got {keep!r}.", "truncate_prompt_tokens")


def logit_bias_by_id(raw: dict[Any, Any]) -> dict[int, Any]:
    """{token id: bias} from a mapping whose keys may be strings of ids (a JSON object's)."""
    out = {}
    for key, bias in raw.items():
        try:
            out[int(key)] = bias
        except (TypeError, ValueError):
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}.",
                                      param="logit_bias") from None
    return out


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's `SamplingParams`)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0, -1 or None: no top-k cut
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
    detokenize: bool = True  # False: token ids only (text "", no stop strings), as in vLLM
    # token id -> added to its logit before sampling (OpenAI's logit_bias; -100 bans, 100 forces)
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids); None: any.
    allowed_token_ids: list[int] | None = None
    # Words that must not be generated (vLLM's): a word's last token is banned whenever the
    # tokens before it are the last ones generated; both the word's own and its leading-space
    # tokenization count (see shardserve/engine/bad_words.py).
    bad_words: list[str] | None = None
    # Slow tokenizers' decode option (vLLM's); fast ones always join special tokens as they are.
    spaces_between_special_tokens: bool = True
    # Keep only the prompt's last k tokens (vLLM's; left truncation, for text and token-id
    # prompts alike); -1: the last max_model_len. None: the whole prompt.
    truncate_prompt_tokens: int | None = None
    # bad_words as token ids: set by the engine, which has the tokenizer (vLLM's name).
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    # vLLM's structured outputs (and its older name): taken so that a ported script gets a
    # clear refusal instead of a TypeError, never stored.
    structured_outputs: InitVar[Any] = None
    guided_decoding: InitVar[Any] = None

    def __post_init__(self, structured_outputs: Any = None, guided_decoding: Any = None) -> None:
        for name, value in (("structured_outputs", structured_outputs),
                            ("guided_decoding", guided_decoding)):
            if value is not None:
                raise InvalidRequestError(f"{name} is not supported: shardserve has no structured "
                                          "(JSON schema, regex, grammar, choice) decoding; leave "
                                          f"{name} unset.", param=name)
        if self.top_k is None:
            self.top_k = 0
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.logit_bias is not None:
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(int(t) for t in self.allowed_token_ids))
        # Repeats are dropped, as in vLLM; an empty list is none.
        self.bad_words = list(dict.fromkeys(self.bad_words or [])) or None

    def _check_types(self) -> None:
        """Counts must be integers (numpy ones are converted): a float or a bool would pass
        the range checks and fail later inside a step (torch.topk, manual_seed)."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INT_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                none = " or None" if name in _OPTIONAL_INT_FIELDS else ""
                raise InvalidRequestError(f"{name} must be an integer{none}, got {value!r}.",
                                          param=name)
            setattr(self, name, int(value))
        if not (self.stop is None or isinstance(self.stop, str) or (
                isinstance(self.stop, (list, tuple)) and all(isinstance(x, str) for x in self.stop))):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got "
                                      f"{self.stop!r}.", param="stop")
        ids = self.stop_token_ids
        if not (ids is None or (isinstance(ids, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids))):
            raise InvalidRequestError(f"stop_token_ids must be a list of token ids (integers), "
                                      f"got {ids!r}.", param="stop_token_ids")
        ids = self.allowed_token_ids
        if not (ids is None or (isinstance(ids, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids))):
            raise InvalidRequestError(f"allowed_token_ids must be a list of token ids (integers), "
                                      f"got {ids!r}.", param="allowed_token_ids")
        words = self.bad_words
        if not (words is None or (isinstance(words, (list, tuple))
                                  and all(isinstance(w, str) for w in words))):
            raise InvalidRequestError(f"bad_words must be a list of strings, got {words!r}.",
                                      param="bad_words")
        if not isinstance(self.spaces_between_special_tokens, bool):
            raise InvalidRequestError(f"spaces_between_special_tokens must be True or False, "
                                      f"got {self.spaces_between_special_tokens!r}.",
                                      param="spaces_between_special_tokens")

    def validate(self) -> None:
        """Raise InvalidRequestError naming the field and the accepted range."""
        def bad(param: str, msg: str) -> None:
            raise InvalidRequestError(msg, param=param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, f"{name} must be a finite number, got {value!r}.")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}.")
        # The n samples are seeded seed, seed + 1, ..., seed + n - 1 (see for_child).
        if self.seed is not None and not -2**63 <= self.seed <= 2**63 - self.n:
            bad("seed", f"seed must fit in a signed 64-bit integer, and so must seed + n - 1; "
                        f"got seed={self.seed}, n={self.n}.")
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
        if self.truncate_prompt_tokens is not None:
            check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty.")
        if self.stop and not self.detokenize:
            bad("stop", "stop strings are matched in the text, so they need detokenize=True; "
                        "use stop_token_ids instead.")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                bad("logit_bias", f"logit_bias keys must be token ids (non-negative integers), "
                                  f"got {token!r}.")
            if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                    or not -100.0 <= bias <= 100.0):
                bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got "
                                  f"{bias!r} for token {token}.")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "allowed_token_ids must hold at least one token id "
                                         "(None allows every token).")
            negative = [t for t in self.allowed_token_ids if t < 0]
            if negative:
                bad("allowed_token_ids", f"allowed_token_ids must be token ids (non-negative "
                                         f"integers), got {negative[:5]}.")
        if any(not w for w in self.bad_words or ()):
            bad("bad_words", "bad_words must be non-empty strings.")

    @staticmethod
    def from_optional(**kwargs: Any) -> "SamplingParams":
        """vLLM's constructor for values straight from a request: None for n, temperature,
        top_p or a penalty means its default, and logit_bias keys may be strings of token ids
        (a JSON object's), with biases clipped to [-100, 100]."""
        for name in _NONE_MEANS_DEFAULT:
            if kwargs.get(name, 0) is None:
                del kwargs[name]
        bias = kwargs.get("logit_bias")
        if bias is not None:
            kwargs["logit_bias"] = {
                token: min(100.0, max(-100.0, value)) if isinstance(value, (int, float)) else value
                for token, value in logit_bias_by_id(bias).items()}
        return SamplingParams(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's): changing it leaves this one as it was."""
        return copy.deepcopy(self)

    def for_child(self, index: int) -> "SamplingParams":
        """The params of the index-th of n parallel samples: n=1, and a distinct seed if seeded."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass
class BeamSearchParams:
    """LLM.beam_search's settings (vLLM's `BeamSearchParams`): keep the beam_width best
    sequences by cumulative logprob, each step extending every one by its 2 * beam_width most
    likely next tokens, for at most max_tokens steps. length_penalty ranks the finished
    sequences by cum_logprob / len ** length_penalty, as vLLM does (see shardserve/beam_search.py).
    include_stop_str_in_output is accepted for vLLM's signature; the offline beam search, like
    vLLM's, keeps the EOS token in a finished sequence's tokens and text either way."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}.",
                                          param=name)
            setattr(self, name, int(value))
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise InvalidRequestError(f"{name} must be a finite number, got {value!r}.",
                                          param=name)
        if self.temperature < 0.0:
            raise InvalidRequestError(f"temperature must be non-negative, got "
                                      f"{self.temperature}.", param="temperature")
        # Scores divide by len ** length_penalty, which for any length below 2**31 stays a
        # finite, non-zero float only within this range; past it the ranking failed mid-search
        # (OverflowError, ZeroDivisionError). Useful penalties are a few units at most.
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise InvalidRequestError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, "
                                      f"{MAX_LENGTH_PENALTY}], got {self.length_penalty}.",
                                      param="length_penalty")
