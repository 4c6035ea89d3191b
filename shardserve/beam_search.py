"""Beam search over the public engine API, as vLLM's LLM.beam_search does it (and its server's
use_beam_search, through beam_search_async on the AsyncLLM).

Each step asks the engine for one token of every live beam, with logprobs=2 * beam_width:

    beams of a prompt ──▶ generate(max_tokens=1, logprobs=2W) ──▶ each beam × its 2W best tokens
         ▲                                                              │
         └──── the W best by score, EOS endings set aside as finished ◀─┘

A beam's prompt is the original prompt plus its tokens so far, so prefix caching serves all
but its last block from the cache: a step costs about one decode per beam, not a prefill.
Candidates are the logprobs' tokens (the sampled one and the top 2W; with temperature > 0 the
sampled one may lie outside the top 2W and is a candidate too, as in vLLM). At the end the
finished and live beams are ranked together by get_beam_search_score and the best W returned.

vLLM's conventions, kept for scripts ported from it: `tokens` holds the prompt's tokens and
then the generated ones, `text` decodes all of them (special tokens included), and the score's
length counts the prompt too. Unlike vLLM, any of the model's EOS ids (generation_config's
list, not only the tokenizer's one) finishes a beam, as it finishes generate().
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from shardserve.engine.input_processor import ProcessedPrompt
from shardserve.errors import InvalidRequestError
from shardserve.outputs import RequestOutput, SampleLogprobs
from shardserve.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from shardserve.engine.async_llm import AsyncLLM
    from shardserve.llm import LLM

T = TypeVar("T")

MAX_BEAM_WIDTH = 10  # 2 * beam_width logprobs a step, and logprobs go up to 20


@dataclass
class BeamSearchSequence:
    """One beam: the prompt's tokens then the generated ones, the logprobs of each generated
    position (the candidates seen there), and their summed logprob."""

    tokens: list[int]
    logprobs: SampleLogprobs = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None  # set on the returned sequences only
    finish_reason: str | None = None  # "stop" (an EOS token) or "length"
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass
class BeamSearchOutput:
    """The best sequences of one prompt, best first (at most beam_width of them)."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: Sequence[int], cumulative_logprob: float,
                          eos_token_ids: Collection[int], length_penalty: float = 1.0) -> float:
    """vLLM's (after transformers'): cum_logprob / length ** length_penalty, the length being
    all of `tokens` (prompt included, as vLLM counts it) less a final EOS."""
    seq_len = len(tokens)
    if tokens[-1] in eos_token_ids:
        seq_len -= 1
    return cumulative_logprob / (seq_len ** length_penalty)


class _Instance:
    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.beams = [BeamSearchSequence(tokens=list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []


def check_beam_width(params: BeamSearchParams) -> None:
    if not isinstance(params, BeamSearchParams):
        raise InvalidRequestError(f"params must be a BeamSearchParams, got "
                                  f"{type(params).__name__}.", "params")
    if params.beam_width > MAX_BEAM_WIDTH:
        raise InvalidRequestError(f"beam_width must be at most {MAX_BEAM_WIDTH} (each step asks "
                                  f"for 2 * beam_width logprobs, at most 20); got "
                                  f"{params.beam_width}.", "beam_width")


class _Search:
    """One search's rules, whatever runs its steps: LLM.beam_search (blocking, a batch of
    prompts' beams a step) or the server's beam_search_async (each beam a concurrent request)."""

    def __init__(self, params: BeamSearchParams, eos_ids: Collection[int],
                 max_model_len: int) -> None:
        check_beam_width(params)
        self.params, self.eos_ids, self.max_model_len = params, eos_ids, max_model_len
        # Only the logprobs are used: no text to decode per step.
        self.step_params = SamplingParams(logprobs=2 * params.beam_width, max_tokens=1,
                                          temperature=params.temperature, detokenize=False)

    def key(self, beam: BeamSearchSequence) -> float:
        return get_beam_search_score(beam.tokens, beam.cum_logprob, self.eos_ids,
                                     self.params.length_penalty)

    def live(self, instances: list[_Instance]) -> list[BeamSearchSequence]:
        """The beams to extend this step, in instance order."""
        for inst in instances:
            # A beam at the context limit cannot grow: it is finished, as generate() would end it.
            full = [b for b in inst.beams if len(b.tokens) >= self.max_model_len]
            for beam in full:
                beam.finish_reason = "length"
            inst.completed.extend(full)
            inst.beams = [b for b in inst.beams if len(b.tokens) < self.max_model_len]
        return [b for inst in instances for b in inst.beams]

    def extend(self, instances: list[_Instance], live: list[BeamSearchSequence],
               results: Sequence[RequestOutput]) -> None:
        """Each live beam's one-token result -> the instances' next beams and finished ones."""
        bounds = [0, *itertools.accumulate(len(inst.beams) for inst in instances)]
        for inst, lo, hi in zip(instances, bounds, bounds[1:]):
            candidates = []
            for beam, result in zip(live[lo:hi], results[lo:hi]):
                logprobs = result.outputs[0].logprobs
                if not logprobs:
                    continue
                step = logprobs[0]
                for token_id, lp in step.items():
                    new = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [step],
                                             beam.cum_logprob + lp.logprob)
                    if token_id in self.eos_ids and not self.params.ignore_eos:
                        new.finish_reason, new.stop_reason = "stop", token_id
                        inst.completed.append(new)
                    else:
                        candidates.append(new)
            inst.beams = sorted(candidates, key=self.key, reverse=True)[:self.params.beam_width]

    def best(self, inst: _Instance) -> list[BeamSearchSequence]:
        """The finished and live beams ranked together, the beam_width best, best first."""
        for beam in inst.beams:
            beam.finish_reason = "length"
        return sorted(inst.completed + inst.beams, key=self.key,
                      reverse=True)[:self.params.beam_width]


def beam_search(llm: "LLM", prompts: Sequence, params: BeamSearchParams, use_tqdm: bool = False,
                concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
    check_beam_width(params)
    if concurrency_limit is not None and (isinstance(concurrency_limit, bool) or not isinstance(
            concurrency_limit, int) or concurrency_limit < 1):
        raise InvalidRequestError(f"concurrency_limit must be a positive integer or None, got "
                                  f"{concurrency_limit!r}.", "concurrency_limit")
    engine = llm.engine
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    processed = [engine.input_processor.process_prompt(p) for p in prompts]
    instances = [_Instance(p.prompt_token_ids) for p in processed]
    search = _Search(params, engine.input_processor.eos_token_ids,
                     engine.input_processor.max_model_len)

    limit = concurrency_limit or max(len(instances), 1)
    bar = _progress_bar(params.max_tokens) if use_tqdm else None
    try:
        for start in range(0, len(instances), limit):
            batch = instances[start:start + limit]
            for _ in range(params.max_tokens):
                live = search.live(batch)
                if not live:
                    break
                results = llm._run([ProcessedPrompt(None, b.tokens) for b in live],
                                   [search.step_params] * len(live), use_tqdm=False)
                search.extend(batch, live, results)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    tokenizer = engine.tokenizer
    outputs = []
    pieces: dict[int, str] = {}
    for inst in instances:
        best = search.best(inst)
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens)
            # The steps ran without text; vLLM's returned logprobs carry each token's (only
            # the returned beams' are decoded, each distinct token once).
            for step in beam.logprobs:
                for token_id, lp in step.items():
                    if lp.decoded_token is None:
                        if token_id not in pieces:
                            pieces[token_id] = tokenizer.decode([token_id])
                        lp.decoded_token = pieces[token_id]
        outputs.append(BeamSearchOutput(sequences=best))
    return outputs


async def beam_search_async(engine: "AsyncLLM", prompts: Sequence[ProcessedPrompt],
                            params: BeamSearchParams,
                            request_id: str) -> list[list[BeamSearchSequence]]:
    """Each prompt's best sequences, searched on the server's engine (vLLM's use_beam_search):
    a step's beams run as concurrent one-token requests, so they batch with each other, with
    the other prompts' and with other clients' requests. The sequences come without text.
    Cancelling it, or an error in one request, aborts every request in flight."""
    search = _Search(params, engine.input_processor.eos_token_ids,
                     engine.input_processor.max_model_len)

    async def one(prompt: ProcessedPrompt, prompt_id: str) -> list[BeamSearchSequence]:
        inst = _Instance(prompt.prompt_token_ids)
        for step in range(params.max_tokens):
            live = search.live([inst])
            if not live:
                break
            results = await _gather(_final(engine.generate(
                ProcessedPrompt(None, b.tokens), search.step_params, f"{prompt_id}-{step}-{j}"))
                for j, b in enumerate(live))
            search.extend([inst], live, results)
        return search.best(inst)

    return await _gather(one(p, f"{request_id}-{i}") for i, p in enumerate(prompts))


async def _gather(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """asyncio.gather, except that a failure or a cancellation cancels all the others (each
    cancelled generate() aborts its request) before it propagates."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _final(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for final in outputs:
        pass
    assert final is not None and final.finished
    return final


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Beam search", unit="token")
