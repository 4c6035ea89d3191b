"""SamplingMetadata: what the sampler needs for the R rows of one step, built from their
requests' SamplingParams and already on the logits' device (layers/sampler.py consumes it).

It is built in two parts. `build_rows` covers what depends only on which requests the rows
are; the model runner keeps that part while a batch's rows stay the same requests
(executor/sampling_batch.py). `with_step_inputs` adds what changes every step: the penalties'
token ids, and the ids banned this step (min_tokens, bad words). Host-side flags (`no_*`,
`all_*`) let the common cases skip whole [R, V] passes without reading device data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from shardserve.sampling_params import _GREEDY_EPS, SamplingParams

# Rows of the packed per-row float parameters (one host-to-device copy for all of them).
_TEMPERATURE, _TOP_P, _MIN_P, _PRESENCE, _FREQUENCY, _REPETITION = range(6)


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs for the R rows being sampled, already on the logits' device.

    The `no_*` / `all_*` flags are host booleans so the common cases (all greedy, no penalties,
    no top-p/top-k) skip whole [R, V] passes without looking at device data.
    """

    temperature: torch.Tensor  # [R] float32; 1.0 on greedy rows so dividing is always safe
    greedy_mask: torch.Tensor  # [R] bool: temperature < 1e-5
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor  # [R] float32, 1.0 = off
    top_k: torch.Tensor  # [R] int64, 0 = off
    min_p: torch.Tensor  # [R] float32, 0.0 = off
    # row -> that request's own generator (seeded requests only); other rows use the global one
    generators: dict[int, torch.Generator]
    presence_penalties: torch.Tensor  # [R] float32
    frequency_penalties: torch.Tensor  # [R] float32
    repetition_penalties: torch.Tensor  # [R] float32, 1.0 = off
    # [R, Lp] prompt ids padded with vocab_size; None unless some row has a repetition penalty
    prompt_token_ids: torch.Tensor | None
    # [R, Lo] output ids so far padded with vocab_size; None when no_penalties
    output_token_ids: torch.Tensor | None
    # (rows, token ids) pairs set to -inf this step: EOS and stop ids of rows still short of
    # min_tokens, and the last token of each bad word whose other tokens were just generated
    banned_rows: torch.Tensor | None
    banned_token_ids: torch.Tensor | None
    # (rows, token ids, biases) added to the logits: OpenAI's logit_bias; None when no row has one
    logit_bias_rows: torch.Tensor | None
    logit_bias_token_ids: torch.Tensor | None
    logit_bias_values: torch.Tensor | None
    num_logprobs: list[int | None]  # per row, as asked (host side: only used to cut the lists)
    max_num_logprobs: int | None  # None: no row asked for logprobs
    no_penalties: bool
    no_top_p_top_k: bool
    no_min_p: bool
    vocab_size: int
    # Per row, host side: has any penalty / a repetition penalty (which rows need token ids).
    has_penalty: list[bool] = field(default_factory=list)
    has_repetition: list[bool] = field(default_factory=list)
    # allowed_token_ids: the rows that have them [A] and their mask [A, V] (True: not allowed);
    # None when no row has any
    allowed_rows: torch.Tensor | None = None
    allowed_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, params_list: Sequence[SamplingParams],
              output_token_ids_list: Iterable[Sequence[int]],
              prompt_token_ids_list: Iterable[Sequence[int]],
              generators_list: Sequence[torch.Generator | None],
              min_tokens_masks: Sequence[Sequence[int] | None],
              vocab_size: int, device: torch.device | str) -> "SamplingMetadata":
        """All lists are aligned with the logits' rows.

        min_tokens_masks[i]: token ids row i must not sample this step (EOS and stop ids while
        it is short of min_tokens, see `min_tokens_stop_ids`; bad words' last tokens), or
        None / empty.
        """
        rows = cls.build_rows(params_list, generators_list, vocab_size, device)
        return rows.with_step_inputs(output_token_ids_list, prompt_token_ids_list,
                                     enumerate(min_tokens_masks))

    @classmethod
    def build_rows(cls, params_list: Sequence[SamplingParams],
                   generators_list: Sequence[torch.Generator | None],
                   vocab_size: int, device: torch.device | str) -> "SamplingMetadata":
        """What depends only on which requests the rows are: the per-step inputs (penalties'
        token ids, banned ids) are left unset; `with_step_inputs` adds them. The model
        runner keeps this part while a batch's rows stay the same requests."""
        device = torch.device(device)
        if not params_list:
            return _empty(vocab_size, device)
        greedy = [p.greedy for p in params_list]
        packed = torch.tensor(
            [[p.temperature for p in params_list], [p.top_p for p in params_list],
             [p.min_p for p in params_list], [p.presence_penalty for p in params_list],
             [p.frequency_penalty for p in params_list],
             [p.repetition_penalty for p in params_list]], dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params_list], dtype=torch.int64)
        packed, top_k = _to_device(packed, device), _to_device(top_k, device)
        greedy_mask = packed[_TEMPERATURE] < _GREEDY_EPS
        temperature = torch.where(greedy_mask, torch.ones_like(packed[_TEMPERATURE]),
                                  packed[_TEMPERATURE])

        random_params = [p for p, g in zip(params_list, greedy) if not g]
        no_top_p_top_k = all(p.top_p >= 1.0 and p.top_k <= 0 for p in random_params)
        no_min_p = all(p.min_p <= 0.0 for p in random_params)
        has_rep = [p.repetition_penalty != 1.0 for p in params_list]
        has_pen = [r or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                   for r, p in zip(has_rep, params_list)]
        num_logprobs = [p.logprobs for p in params_list]
        asked = [k for k in num_logprobs if k is not None]
        bias_rows = bias_ids = bias_values = None
        biases = [(row, tok, b) for row, p in enumerate(params_list)
                  for tok, b in (p.logit_bias or {}).items()]
        if biases:
            ids = _to_device(torch.tensor([[r, t] for r, t, _ in biases], dtype=torch.int64), device)
            bias_rows, bias_ids = ids[:, 0], ids[:, 1]
            bias_values = _to_device(torch.tensor([b for _, _, b in biases], dtype=torch.float32),
                                     device)
        allowed_rows, allowed_mask = _allowed_mask(params_list, vocab_size, device)
        return cls(
            temperature=temperature, greedy_mask=greedy_mask,
            all_greedy=all(greedy), all_random=not any(greedy),
            top_p=packed[_TOP_P], top_k=top_k, min_p=packed[_MIN_P],
            generators={row: g for row, g in enumerate(generators_list)
                        if g is not None and not greedy[row]},
            presence_penalties=packed[_PRESENCE], frequency_penalties=packed[_FREQUENCY],
            repetition_penalties=packed[_REPETITION],
            prompt_token_ids=None, output_token_ids=None,
            banned_rows=None, banned_token_ids=None,
            logit_bias_rows=bias_rows, logit_bias_token_ids=bias_ids, logit_bias_values=bias_values,
            num_logprobs=num_logprobs, max_num_logprobs=max(asked) if asked else None,
            no_penalties=not any(has_pen), no_top_p_top_k=no_top_p_top_k, no_min_p=no_min_p,
            vocab_size=vocab_size, has_penalty=has_pen, has_repetition=has_rep,
            allowed_rows=allowed_rows, allowed_mask=allowed_mask)

    def with_step_inputs(self, output_token_ids_list: Iterable[Sequence[int]],
                         prompt_token_ids_list: Iterable[Sequence[int]],
                         banned: Iterable[tuple[int, Sequence[int] | None]]
                         ) -> "SamplingMetadata":
        """This step's metadata: these rows plus the inputs that change every step. The token
        lists are read only when a row has a penalty (they may be generators); banned holds
        (row, ids) pairs of ids the row must not sample now (min_tokens, bad words), and may
        leave out rows with nothing to ban. Returns self when the step adds nothing."""
        device = self.temperature.device
        output_ids = prompt_ids = None
        if not self.no_penalties:
            # Rows without penalties contribute no ids: padding stays as short as it can be.
            output_ids = _padded([o if h else () for o, h in zip(output_token_ids_list,
                                                                 self.has_penalty)],
                                 self.vocab_size, device)
            if any(self.has_repetition):
                prompt_ids = _padded([q if h else () for q, h in zip(prompt_token_ids_list,
                                                                     self.has_repetition)],
                                     self.vocab_size, device)
        banned_rows = banned_ids = None
        pairs = [(row, tok) for row, ids in banned for tok in (ids or ())]
        if pairs:
            both = _to_device(torch.tensor(pairs, dtype=torch.int64), device)
            banned_rows, banned_ids = both[:, 0], both[:, 1]
        if output_ids is None and banned_rows is None:
            return self
        return replace(self, prompt_token_ids=prompt_ids, output_token_ids=output_ids,
                       banned_rows=banned_rows, banned_token_ids=banned_ids)


def _allowed_mask(params_list: Sequence[SamplingParams], vocab_size: int,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows with allowed_token_ids and, per such row, True on every id it may not sample.
    Built once per set of rows (the batch keeps it while its rows stay the same)."""
    rows = [i for i, p in enumerate(params_list) if p.allowed_token_ids is not None]
    if not rows:
        return None, None
    mask = torch.ones(len(rows), vocab_size, dtype=torch.bool)
    for j, i in enumerate(rows):
        mask[j, params_list[i].allowed_token_ids] = False
    return (_to_device(torch.tensor(rows, dtype=torch.int64), device),
            _to_device(mask, device))


def min_tokens_stop_ids(params: SamplingParams, num_output_tokens: int,
                        eos_token_ids: Sequence[int]) -> list[int]:
    """Token ids a request must not sample yet: its stop ids and EOS while it has fewer than
    min_tokens outputs. EOS even with ignore_eos, as vLLM (min_tokens: "before EOS or
    stop_token_ids can be generated"); ignore_eos only keeps a sampled EOS from stopping it."""
    if num_output_tokens >= params.min_tokens:
        return []
    return [*(params.stop_token_ids or ()), *eos_token_ids]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    # numpy fills row slices from lists ~3x faster than torch.tensor(list of padded lists).
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return _to_device(torch.from_numpy(out), device)


def _empty(vocab_size: int, device: torch.device) -> SamplingMetadata:
    f = torch.zeros(0, dtype=torch.float32, device=device)
    return SamplingMetadata(
        temperature=f, greedy_mask=f.bool(), all_greedy=True, all_random=True, top_p=f,
        top_k=f.long(), min_p=f, generators={}, presence_penalties=f, frequency_penalties=f,
        repetition_penalties=f, prompt_token_ids=None, output_token_ids=None,
        banned_rows=None, banned_token_ids=None, logit_bias_rows=None,
        logit_bias_token_ids=None, logit_bias_values=None, num_logprobs=[], max_num_logprobs=None,
        no_penalties=True, no_top_p_top_k=True, no_min_p=True, vocab_size=vocab_size)
