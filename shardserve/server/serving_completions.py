"""POST /v1/completions: one engine request per prompt, merged back into one response (choice
index = prompt index x n + sample index), as JSON or as server-sent events.

echo puts the prompt before each choice's text (with logprobs: the prompt tokens' logprobs
first, the first token's None, as OpenAI does). echo with max_tokens 0 scores the prompt
alone, as evaluation harnesses ask for log-likelihoods: the engine samples one token, which is
dropped from the text, the logprobs and the usage."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from shardserve.errors import InvalidRequestError
from shardserve.outputs import RequestOutput, SampleLogprobs
from shardserve.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                        CompletionResponse, random_id)
from shardserve.server.serving_beam_search import beam_search_params, run_beam_search
from shardserve.server.serving_common import (SSE_DONE, ClientDisconnected, SSEResponse,
                                              build_sampling_params, check_fits,
                                              check_unsupported, chunk_usage,
                                              close_all, merge_async_iterators,
                                              prompt_logprobs_of, read_request, sse, sse_error,
                                              stream_usage, unless_disconnected, usage_of)
from shardserve.server.state import ServerState


async def create_completion(request: Request, state: ServerState) -> Response:
    req = await read_request(request, state, CompletionRequest)
    state.check_model(req.model)
    check_unsupported(req)
    if req.suffix:
        raise InvalidRequestError("suffix is not supported.", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("best_of must equal n (or be left out).", "best_of")
    score_only = req.max_tokens == 0
    if score_only and not req.echo:
        raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo, which "
                                  "returns the prompt and, with logprobs, its logprobs).",
                                  "max_tokens")
    max_tokens = 1 if score_only else req.max_tokens
    engine = state.engine
    prompts = _prompts(req.prompt)
    processed = [engine.process_prompt(p, req.truncate_prompt_tokens, req.add_special_tokens)
                 for p in prompts]
    max_model_len = state.config.model_config.max_model_len
    for p in processed:
        # Echo with max_tokens 0 scores the prompt and generates nothing (vLLM counts 0 here).
        check_fits(len(p.prompt_token_ids), 0 if score_only else max_tokens, max_model_len,
                   "max_tokens", req.min_tokens)
    params = build_sampling_params(req, state, max_tokens, req.logprobs, len(prompts))
    if req.echo and req.logprobs is not None:
        params = dataclasses.replace(
            params, prompt_logprobs=max(req.logprobs, params.prompt_logprobs or 0))
    echo = _Echo(bool(req.echo), score_only, req.logprobs, engine.tokenizer)

    request_id = req.request_id or random_id("cmpl")
    model = state.model_name  # the first served name, whichever alias was asked for (vLLM)
    if req.use_beam_search:
        beam_params = beam_search_params(req, max_tokens, max_model_len)
        finals = await run_beam_search(request, state, processed, beam_params, request_id,
                                       req.skip_special_tokens)
        if finals is None:
            return Response(status_code=499)  # nobody reads it; the requests are aborted
        return JSONResponse(_response(request_id, model, finals, req, echo).model_dump())
    state.admit()
    merged = None
    gens: list = []
    streaming = False
    try:
        gens = [engine.generate(p, params, f"{request_id}-{i}") for i, p in enumerate(processed)]
        merged = merge_async_iterators(*gens)
        if not req.stream:
            finals = await unless_disconnected(request, _collect(merged, len(prompts)))
            return JSONResponse(_response(request_id, model, finals, req, echo).model_dump())
        # Wait for the first output before answering 200, so that admission errors (overload,
        # queue time, a dead engine) still get their HTTP status.
        first = await unless_disconnected(request, anext(merged))
        streaming = True
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the requests are aborted
    finally:
        if not streaming:
            await close_all([merged, *gens] if merged is not None else [])
            state.release()
    stream = _stream(request_id, model, req, first, merged, echo)

    async def on_close() -> None:
        # Closing the merge closes each request's generator; closing them again directly covers
        # a merge whose own cleanup was cut short by a cancellation.
        await close_all([merged, *gens])
        state.release()

    return SSEResponse(stream, on_close)


def _prompts(prompt: Any) -> list[Any]:
    """OpenAI's four prompt shapes -> the engine's prompt dicts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    out = []
    for p in prompt:
        if not p:
            raise InvalidRequestError("prompt contains an empty token list.", "prompt")
        out.append({"prompt_token_ids": p})
    return out


async def _collect(merged: AsyncIterator[tuple[int, RequestOutput]],
                   num_prompts: int) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for i, out in merged:
        if out.finished:
            finals[i] = out
    return [finals[i] for i in range(num_prompts)]


class _Echo:
    """What echo and scoring (max_tokens 0) add to or take from a choice."""

    def __init__(self, echo: bool, score_only: bool, logprobs: int | None, tokenizer) -> None:
        self.echo, self.score_only, self.k, self.tokenizer = echo, score_only, logprobs, tokenizer

    def prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.tokenizer.decode(out.prompt_token_ids)

    def prompt_logprobs(self, out: RequestOutput) -> CompletionLogprobs:
        """The prompt tokens as logprob entries: the first has no logprob (nothing precedes
        it), each other its logprob given the tokens before it and the top k."""
        first = self.tokenizer.decode(out.prompt_token_ids[:1])
        head = CompletionLogprobs(text_offset=[0], token_logprobs=[None], tokens=[first],
                                  top_logprobs=[None])
        return _joined(head, _logprobs((out.prompt_logprobs or [None])[1:], self.k, 0),
                       len(first))


def _end_offset(lp: CompletionLogprobs, text: str) -> int:
    """The text_offset of an entry following lp's: the end of its last token, as offsets count
    the tokens' own text (vLLM's). That is len(text) unless a character of it spans tokens
    (each byte token reads U+FFFD) or the tokens hold a BOS the text does not."""
    if not lp.tokens:
        return len(text)
    return lp.text_offset[-1] + len(lp.tokens[-1])


def _joined(first: CompletionLogprobs, second: CompletionLogprobs, shift: int) -> CompletionLogprobs:
    """first's entries, then second's with their text offsets moved by shift characters."""
    return CompletionLogprobs(
        text_offset=first.text_offset + [o + shift for o in second.text_offset],
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs)


def _response(request_id: str, model: str, finals: list[RequestOutput],
              req: CompletionRequest, echo: _Echo) -> CompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        prompt_text = echo.prompt_text(out) if echo.echo else ""
        prompt_lp = (echo.prompt_logprobs(out) if echo.echo and req.logprobs is not None
                     else CompletionLogprobs())
        for c in out.outputs:
            text = "" if echo.score_only else c.text
            logprobs = None
            if req.logprobs is not None:
                own = CompletionLogprobs() if echo.score_only else _logprobs(c.logprobs,
                                                                             req.logprobs, 0)
                logprobs = _joined(prompt_lp, own, _end_offset(prompt_lp, prompt_text))
            choices.append(CompletionChoice(
                index=i * req.n + c.index, text=prompt_text + text, logprobs=logprobs,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                prompt_logprobs=prompt_logprobs_of(out, req.prompt_logprobs)))
    return CompletionResponse(id=request_id, model=model, choices=choices,
                              usage=_usage(finals, echo))


def _usage(finals: list[RequestOutput], echo: _Echo):
    usage = usage_of(finals)
    if echo.score_only:
        usage.completion_tokens = 0
        usage.total_tokens = usage.prompt_tokens
    return usage


async def _stream(request_id: str, model: str, req: CompletionRequest, first: tuple[int, RequestOutput],
                  merged: AsyncIterator[tuple[int, RequestOutput]],
                  echo: _Echo) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage, continuous = stream_usage(req.stream_options)
    finals: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}  # choice index -> text_offset of its next logprobs token
    finished: set[int] = set()
    prompts: dict[int, tuple[str, CompletionLogprobs]] = {}  # echo: prompt i's text, logprobs

    def chunks(i: int, out: RequestOutput) -> list[str]:
        events = []
        if out.finished:
            finals[i] = out
        for c in out.outputs:
            index = i * req.n + c.index
            if index in finished:
                continue
            if not c.delta_text and not c.delta_token_ids and not c.finished():
                continue
            delta_text = "" if echo.score_only else c.delta_text
            delta_lp = None if echo.score_only else c.delta_logprobs
            prefix, prefix_lp = "", CompletionLogprobs()
            if echo.echo and index not in offsets:  # this choice's first chunk: the prompt
                if i not in prompts:  # once per prompt, whatever its n
                    prompts[i] = (echo.prompt_text(out), echo.prompt_logprobs(out)
                                  if req.logprobs is not None else CompletionLogprobs())
                prefix, prefix_lp = prompts[i]
                offsets[index] = 0
            logprobs = None
            covered = len(delta_text)
            prefix_len = len(prefix)
            if req.logprobs is not None:
                own = _logprobs(delta_lp, req.logprobs, 0)
                prefix_len = _end_offset(prefix_lp, prefix)
                logprobs = _joined(prefix_lp, own, offsets.get(index, 0) + prefix_len)
                # Offsets follow the tokens' own text, as in the whole response: the text
                # (held back while it may start a stop string, cut at one) lags or falls short.
                covered = sum(len(t) for t in own.tokens)
            offsets[index] = offsets.get(index, 0) + prefix_len + covered
            if c.finished():
                finished.add(index)
            choice = CompletionChoice(index=index, text=prefix + delta_text, logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            chunk = CompletionResponse(id=request_id, created=created, model=model,
                                       choices=[choice])
            data = chunk.model_dump()
            if include_usage:
                num_tokens = 0 if echo.score_only else len(c.token_ids)
                data["usage"] = chunk_usage(continuous, len(out.prompt_token_ids), num_tokens)
            events.append(sse(data))
        return events

    try:
        for event in chunks(*first):
            yield event
        async for i, out in merged:
            for event in chunks(i, out):
                yield event
        if include_usage:
            usage = _usage([finals[i] for i in sorted(finals)], echo)
            final = CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                       usage=usage)
            yield sse(final)
    except Exception as exc:  # the engine died mid-stream: tell the client, then end cleanly
        yield sse_error(exc)
    yield SSE_DONE


def _logprobs(entries: SampleLogprobs | None, k: int, start_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = start_offset
    for entry in entries or []:
        items = list(entry.items())
        if not items:
            continue
        _, chosen = items[0]
        token = chosen.decoded_token or ""
        out.tokens.append(token)
        out.token_logprobs.append(chosen.logprob)
        out.text_offset.append(offset)
        offset += len(token)
        top = sorted((lp for _, lp in items if lp.rank <= k or lp is chosen),
                     key=lambda lp: lp.rank)
        out.top_logprobs.append({(lp.decoded_token or ""): lp.logprob for lp in top})
    return out

