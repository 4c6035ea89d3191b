"""POST /v1/completions: one engine request per prompt, merged back into one response (choice
index = prompt index x n + sample index), as JSON or as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from shardserve.errors import InvalidRequestError
from shardserve.outputs import RequestOutput, SampleLogprobs
from shardserve.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                        CompletionResponse, random_id)
from shardserve.server.serving_common import (SSE_DONE, ClientDisconnected, SSEResponse,
                                              build_sampling_params, check_fits, close_all,
                                              merge_async_iterators, read_request, sse, sse_error,
                                              unless_disconnected, usage_of)
from shardserve.server.state import ServerState


async def create_completion(request: Request, state: ServerState) -> Response:
    req = await read_request(request, state, CompletionRequest)
    state.check_model(req.model)
    if req.echo:
        raise InvalidRequestError("echo is not supported.", "echo")
    if req.suffix:
        raise InvalidRequestError("suffix is not supported.", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError("best_of must equal n (or be left out).", "best_of")
    engine = state.engine
    prompts = _prompts(req.prompt)
    processed = [engine.process_prompt(p) for p in prompts]
    max_model_len = state.config.model_config.max_model_len
    for p in processed:
        check_fits(len(p.prompt_token_ids), req.max_tokens, max_model_len, "max_tokens")
    params = build_sampling_params(req, state, req.max_tokens, req.logprobs, len(prompts))

    request_id = req.request_id or random_id("cmpl")
    model = req.model or state.model_name
    state.admit()
    merged = None
    gens: list = []
    streaming = False
    try:
        gens = [engine.generate(p, params, f"{request_id}-{i}") for i, p in enumerate(processed)]
        merged = merge_async_iterators(*gens)
        if not req.stream:
            finals = await unless_disconnected(request, _collect(merged, len(prompts)))
            return JSONResponse(_response(request_id, model, finals, req).model_dump())
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
    stream = _stream(request_id, model, req, first, merged)

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


def _response(request_id: str, model: str, finals: list[RequestOutput],
              req: CompletionRequest) -> CompletionResponse:
    choices = []
    for i, out in enumerate(finals):
        for c in out.outputs:
            logprobs = _logprobs(c.logprobs, req.logprobs, 0) if req.logprobs is not None else None
            choices.append(CompletionChoice(index=i * req.n + c.index, text=c.text,
                                            logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
    return CompletionResponse(id=request_id, model=model, choices=choices,
                              usage=usage_of(finals))


async def _stream(request_id: str, model: str, req: CompletionRequest, first: tuple[int, RequestOutput],
                  merged: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    finals: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}  # choice index -> length of its text so far (logprob offsets)
    finished: set[int] = set()

    def chunks(i: int, out: RequestOutput) -> list[str]:
        events = []
        if out.finished:
            finals[i] = out
        for c in out.outputs:
            index = i * req.n + c.index
            if index in finished:
                continue
            if not c.delta_text and not c.delta_token_ids and not c.finished:
                continue
            logprobs = None
            if req.logprobs is not None:
                logprobs = _logprobs(c.delta_logprobs, req.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(c.delta_text)
            if c.finished:
                finished.add(index)
            choice = CompletionChoice(index=index, text=c.delta_text, logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            chunk = CompletionResponse(id=request_id, created=created, model=model,
                                       choices=[choice])
            data = chunk.model_dump()
            if include_usage:
                data["usage"] = None
            events.append(sse(data))
        return events

    try:
        for event in chunks(*first):
            yield event
        async for i, out in merged:
            for event in chunks(i, out):
                yield event
        if include_usage:
            usage = usage_of([finals[i] for i in sorted(finals)])
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

