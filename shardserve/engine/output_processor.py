"""Turns the engine core's token outputs into RequestOutputs: incremental text, stop strings,
logprobs, and n > 1 samples gathered under their parent request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shardserve.engine.detokenizer import IncrementalDetokenizer
from shardserve.engine.outputs import EngineCoreOutput, TokenLogprobs
from shardserve.engine.request import Request
from shardserve.errors import InvalidRequestError
from shardserve.outputs import (CompletionOutput, Logprob, PromptLogprobs, RequestMetrics,
                                RequestOutput, SampleLogprobs)


class _NoText:
    """The detokenizer of a detokenize=False sample: no text, no stop strings."""

    output_text = ""

    def update(self, new_token_ids: Any, stop_terminated: bool = False) -> None:
        return None

    def finish(self) -> None:
        pass

    def get_next_delta(self) -> str:
        return ""


@dataclass
class _Sample:
    index: int
    detokenizer: IncrementalDetokenizer | _NoText
    want_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What the last emitted RequestOutput already carried.
    num_emitted_tokens: int = 0


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    metrics: RequestMetrics
    want_prompt_logprobs: bool
    child_ids: list[str]
    stream: bool = True
    prompt_logprobs: PromptLogprobs = field(default_factory=lambda: [None])
    num_cached_tokens: int = 0
    detokenize: bool = True  # False: logprobs carry no decoded_token either

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: str | None, requests: list[Request],
                    stream: bool = True) -> None:
        """stream=False: only the final RequestOutput is built (the offline LLM's case), which
        saves copying every sample's tokens on every step, and text is decoded only at the end
        unless stop strings need it earlier."""
        # The engine core keys its requests by these ids: a second request under an id in use
        # (or under an n > 1 sample's "id#i") would corrupt both. Refused before anything is
        # queued.
        taken = [rid for rid in (request_id, *(r.request_id for r in requests))
                 if rid in self._parents or rid in self._child_to_parent]
        if taken:
            raise InvalidRequestError(f"Request id {taken[0]!r} is already in use by an "
                                      "unfinished request; give this one another id.",
                                      "request_id")
        first = requests[0]
        samples = []
        for i, req in enumerate(requests):
            p = req.sampling_params
            detok = (IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                            p.skip_special_tokens, p.stop,
                                            p.include_stop_str_in_output, lazy=not stream,
                                            min_tokens=p.min_tokens,
                                            spaces_between_special_tokens=(
                                                p.spaces_between_special_tokens))
                     if p.detokenize else _NoText())
            samples.append(_Sample(i, detok, p.logprobs is not None))
            self._child_to_parent[req.request_id] = (request_id, i)
        self._parents[request_id] = _Parent(
            request_id, prompt, first.prompt_token_ids, samples, RequestMetrics(first.arrival_time),
            first.sampling_params.prompt_logprobs is not None, [r.request_id for r in requests],
            stream=stream, detokenize=first.sampling_params.detokenize)

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return list(parent.child_ids) if parent else []

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    @property
    def num_unfinished(self) -> int:
        return len(self._parents)

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """Finish a parent from the front end (client gone, error); returns its last output."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for sample in parent.samples:
            if sample.finish_reason is None:
                sample.finish_reason = reason
        return self._emit(parent)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated RequestOutputs and the child request ids the engine core must
        abort (a stop string was found in their text)."""
        now = time.monotonic()
        # Parents to emit: streaming ones with news, and the others once they finish.
        touched: dict[str, _Parent] = {}
        to_abort: list[str] = []
        child_to_parent, parents = self._child_to_parent, self._parents
        for out in outputs:
            key = child_to_parent.get(out.req_id)
            if key is None:
                continue
            parent = parents[key[0]]
            sample = parent.samples[key[1]]
            if parent.stream:
                touched[parent.request_id] = parent
            # Every sample of n > 1 scores the same prompt: keep the first one's, once.
            if out.new_prompt_logprobs and key[1] == 0:
                parent.prompt_logprobs.extend(self._convert(out.new_prompt_logprobs,
                                                            parent.detokenize))
            new_ids = out.new_token_ids
            if (not new_ids and out.finish_reason is None) or sample.finish_reason is not None:
                continue
            parent.num_cached_tokens = out.num_cached_tokens
            metrics = parent.metrics
            if metrics.first_token_time is None and new_ids:
                metrics.first_token_time = now
            metrics.last_token_time = now
            sample.token_ids.extend(new_ids)
            if out.new_logprobs and sample.want_logprobs:
                converted = self._convert(out.new_logprobs, parent.detokenize)
                sample.logprobs.extend(converted)
                sample.cumulative_logprob += sum(e.logprobs[0] for e in out.new_logprobs)
            # An EOS or stop token ended it (stop strings are found here, not in the core):
            # as in vLLM, that token adds no text unless include_stop_str_in_output.
            stop_str = sample.detokenizer.update(new_ids, out.finish_reason == "stop")
            if stop_str is not None:
                sample.finish_reason, sample.stop_reason = "stop", stop_str
                if out.finish_reason is None:
                    to_abort.append(out.req_id)
            elif out.finish_reason is not None:
                sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            if sample.finish_reason is not None:
                sample.detokenizer.finish()
                if parent.finished:
                    touched[parent.request_id] = parent
        results = [self._emit(p) for p in touched.values()]
        return results, to_abort

    def _emit(self, parent: _Parent) -> RequestOutput:
        completions = []
        for s in parent.samples:
            new_ids = s.token_ids[s.num_emitted_tokens:]
            delta_lp = s.logprobs[s.num_emitted_tokens:] if s.want_logprobs else None
            s.num_emitted_tokens = len(s.token_ids)
            completions.append(CompletionOutput(
                s.index, s.detokenizer.output_text, list(s.token_ids),
                s.cumulative_logprob if s.want_logprobs else None,
                s.logprobs if s.want_logprobs else None, s.finish_reason, s.stop_reason,
                s.detokenizer.get_next_delta(), new_ids, delta_lp))
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = time.monotonic()
            del self._parents[parent.request_id]
            for child_id in parent.child_ids:
                self._child_to_parent.pop(child_id, None)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             finished, parent.prompt_logprobs if parent.want_prompt_logprobs else None,
                             parent.num_cached_tokens, parent.metrics)

    def _convert(self, entries: list[TokenLogprobs], detokenize: bool) -> list[dict[int, Logprob]]:
        out = []
        for e in entries:
            d: dict[int, Logprob] = {}
            for tid, lp, rank in zip(e.token_ids, e.logprobs, e.ranks):
                if tid not in d:
                    d[tid] = Logprob(lp, rank, self.tokenizer.decode([tid]) if detokenize else None)
            out.append(d)
        return out
