"""The sampling metadata of the rows a step samples, kept across steps.

Building it costs a pass over every row's SamplingParams, a host tensor and two host-to-device
copies; in a decode batch the rows are the same requests, in the same order, step after step.
So the per-request part (temperature, top-p/k, min-p, penalties' weights, seeded generators,
logprob counts) is rebuilt only when the rows change, and each step adds only what really
changes per step, for the rows that need it: the output (and prompt) token ids of rows with
penalties and the banned ids of rows still short of min_tokens or with bad words.

    step N    rows [a b c d]  ─ build_rows ─▶ kept
    step N+1  rows [a b c d]  ─ same objects ─▶ kept + this step's inputs
    step N+2  rows [a c d e]  ─ changed ─▶ build_rows again

Rows are compared by their CachedRequestState objects: a request resumed after preemption gets a
new state (and a new generator), so it never reuses its earlier run's rows.
"""

from __future__ import annotations

import operator

import torch

from shardserve.executor.request_state import CachedRequestState
from shardserve.engine.bad_words import banned_last_tokens
from shardserve.layers.sampler import vocab_parallel_ok
from shardserve.layers.sampling_metadata import SamplingMetadata, min_tokens_stop_ids


class SamplingBatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._states: list[CachedRequestState] = []
        self._rows: SamplingMetadata | None = None
        self._min_tokens_rows: list[int] = []  # rows whose request has min_tokens > 0
        self._bad_words_rows: list[int] = []  # rows whose request has bad words
        self.num_rebuilds = 0  # how often the rows changed (a check for tests)
        # vocab_parallel_ok of the last rows asked about (they are the same step after step)
        self._vp_states: list[CachedRequestState] = []
        self._vp_key: tuple | None = None
        self._vp = False

    def metadata(self, states: list[CachedRequestState], num_outputs: list[int],
                 vocab_size: int) -> SamplingMetadata:
        """The metadata for rows `states`; num_outputs[i]: row i's output tokens before this
        step's sample (counting placeholders), for min_tokens."""
        if not self._same_rows(states, vocab_size):
            self._rows = SamplingMetadata.build_rows(
                [s.sampling_params for s in states], [s.generator for s in states],
                vocab_size, self.device)
            self._states = list(states)
            self._min_tokens_rows = [i for i, s in enumerate(states)
                                     if s.sampling_params.min_tokens > 0]
            self._bad_words_rows = [i for i, s in enumerate(states)
                                    if s.sampling_params._bad_words_token_ids]
            self.num_rebuilds += 1
        masks = [(i, min_tokens_stop_ids(states[i].sampling_params, num_outputs[i],
                                         states[i].eos_token_ids))
                 for i in self._min_tokens_rows]
        # A request with bad words of several tokens samples only once its outputs are known
        # (Request.needs_known_tokens), so token_ids ends with its latest output here.
        masks += [(i, banned_last_tokens(states[i].sampling_params._bad_words_token_ids,
                                         states[i].token_ids, states[i].num_prompt_tokens))
                  for i in self._bad_words_rows]
        # Generators: the token lists are copied only when a penalty needs them; with neither
        # penalties nor masks this is the kept rows themselves.
        return self._rows.with_step_inputs((s.output_token_ids for s in states),
                                     (s.prompt_token_ids for s in states), masks)

    def vocab_parallel(self, states: list[CachedRequestState], on_gpu: bool,
                       vocab_size: int) -> bool:
        """layers/sampler.vocab_parallel_ok for these rows, kept while they stay the same
        requests (a request's params never change; a resumed one has a new state)."""
        key = (on_gpu, vocab_size)
        if not (key == self._vp_key and _same_requests(states, self._vp_states)):
            self._vp = vocab_parallel_ok([s.sampling_params for s in states], on_gpu,
                                         vocab_size)
            self._vp_states, self._vp_key = list(states), key
        return self._vp

    def _same_rows(self, states: list[CachedRequestState], vocab_size: int) -> bool:
        return (self._rows is not None and self._rows.vocab_size == vocab_size
                and _same_requests(states, self._states))


def _same_requests(states: list[CachedRequestState], kept: list[CachedRequestState]) -> bool:
    """The same request states, row for row (a request's params never change; a resumed
    request has a new state object)."""
    return len(states) == len(kept) and all(map(operator.is_, states, kept))
