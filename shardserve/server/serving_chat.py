"""POST /v1/chat/completions: messages through the model's chat template, n samples, as JSON or
as server-sent events (role first, then content deltas, then the finish reason).

vLLM's continue_final_message renders the last (assistant) message open so the answer continues
it; echo puts that message's text before the answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from shardserve.errors import InvalidRequestError
from shardserve.outputs import Logprob, RequestOutput, SampleLogprobs
from shardserve.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                        ChatStreamChoice, ChatTokenLogprob, DeltaMessage,
                                        TokenizeRequest, TopLogprob, random_id)
from shardserve.server.serving_beam_search import beam_search_params, run_beam_search
from shardserve.server.serving_common import (SSE_DONE, ClientDisconnected, SSEResponse,
                                              build_sampling_params, check_fits,
                                              check_unsupported, close_all,
                                              chunk_usage, prompt_logprobs_of, read_request, sse,
                                              sse_error, stream_usage, unless_disconnected,
                                              usage_of)
from shardserve.server.state import ServerState
from shardserve.tokenizer import apply_chat_template, token_bytes


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    req = await read_request(request, state, ChatCompletionRequest)
    state.check_model(req.model)
    _check_unsupported(req)
    engine = state.engine
    engine.check_started()  # before the template: while loading there is no tokenizer yet
    prompt_ids = prompt_token_ids(engine.tokenizer, req)
    processed = engine.process_prompt({"prompt_token_ids": prompt_ids},
                                      req.truncate_prompt_tokens)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:  # here, to name the field the client sent
        raise InvalidRequestError(f"{param} must be at least 1, got {max_tokens}.", param)
    check_fits(len(processed.prompt_token_ids), max_tokens, state.config.model_config.max_model_len,
               param, req.min_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(req, state, max_tokens, logprobs)

    request_id = req.request_id or random_id("chatcmpl")
    model = state.model_name  # the first served name, whichever alias was asked for (vLLM)
    if req.use_beam_search:
        beam_params = beam_search_params(req, max_tokens, state.config.model_config.max_model_len)
        finals = await run_beam_search(request, state, [processed], beam_params, request_id,
                                       req.skip_special_tokens)
        if finals is None:
            return Response(status_code=499)  # nobody reads it; the requests are aborted
        return JSONResponse(_response(request_id, model, finals[0], req,
                                      engine.tokenizer).model_dump())
    state.admit()
    gen = engine.generate(processed, params, request_id)
    streaming = False
    try:
        if not req.stream:
            final = await unless_disconnected(request, _last(gen))
            return JSONResponse(_response(request_id, model, final, req,
                                          engine.tokenizer).model_dump())
        first = await unless_disconnected(request, anext(gen))
        streaming = True
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the request is aborted
    finally:
        if not streaming:
            await close_all([gen])
            state.release()

    async def on_close() -> None:
        await close_all([gen])
        state.release()

    return SSEResponse(_stream(request_id, model, req, first, gen, engine.tokenizer),
                       on_close)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    check_unsupported(req)
    # vLLM's rule: with tool_choice "none" the tools go to the chat template (the model sees
    # them) and the answer is text; any other choice asks for a tool call we cannot parse.
    if req.tools and req.tool_choice != "none":
        raise InvalidRequestError("Tool calling is not supported by this server: tools are "
                                  "accepted only with tool_choice \"none\" (a text answer).",
                                  "tools")
    if req.functions:
        raise InvalidRequestError("Function calling is not supported by this server.", "functions")
    # vLLM's and OpenAI's rule: any tool_choice but "none" needs tools.
    if req.tool_choice not in (None, "none") and not req.tools:
        raise InvalidRequestError("When using tool_choice, tools must be set (or use "
                                  "tool_choice \"none\").", "tool_choice")
    # "required" or a named function ask for a tool call we cannot make.
    if req.tool_choice is not None and req.tool_choice not in ("none", "auto"):
        raise InvalidRequestError("tool_choice can only be \"none\" or \"auto\": tool calling is "
                                  "not supported by this server.", "tool_choice")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true.", "top_logprobs")
        if not 0 <= req.top_logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {req.top_logprobs}.",
                                      "top_logprobs")


def prompt_token_ids(tokenizer: Any, req: ChatCompletionRequest | TokenizeRequest) -> list[int]:
    """The chat rendered by the template and tokenized; vLLM's add_special_tokens (off by
    default, as the template writes any BOS itself) adds the tokenizer's own as well. /tokenize
    counts a chat through here too, so its ids are the ones a chat completion would get."""
    return apply_chat_template(tokenizer, req.messages, req.add_generation_prompt,
                               req.chat_template_kwargs, bool(req.add_special_tokens),
                               tools=req.tools,
                               continue_final_message=req.continue_final_message)


async def _last(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for out in gen:
        final = out
    assert final is not None and final.finished
    return final


def _response(request_id: str, model: str, final: RequestOutput, req: ChatCompletionRequest,
              tokenizer: Any) -> ChatCompletionResponse:
    echo = _echoed(req)
    choices = [ChatChoice(index=c.index,
                          message=ChatMessage(role="assistant", content=echo + c.text),
                          logprobs=(_logprobs(c.logprobs, req.top_logprobs or 0, tokenizer)
                                    if req.logprobs else None),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in final.outputs]
    return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=usage_of([final]),
                                  prompt_logprobs=prompt_logprobs_of(final, req.prompt_logprobs))


async def _stream(request_id: str, model: str, req: ChatCompletionRequest, first: RequestOutput,
                  gen: AsyncIterator[RequestOutput], tokenizer: Any) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage, continuous = stream_usage(req.stream_options)
    num_prompt = len(first.prompt_token_ids)
    finished: set[int] = set()
    final = first

    def chunk(choices: list[ChatStreamChoice], num_tokens: int = 0) -> str:
        data = ChatCompletionChunk(id=request_id, created=created, model=model,
                                   choices=choices).model_dump()
        if include_usage:
            data["usage"] = chunk_usage(continuous, num_prompt, num_tokens)
        return sse(data)

    def events(out: RequestOutput) -> list[str]:
        result = []
        for c in out.outputs:
            if c.index in finished or (not c.delta_text and not c.delta_token_ids and not c.finished()):
                continue
            if c.finished():
                finished.add(c.index)
            logprobs = (_logprobs(c.delta_logprobs, req.top_logprobs or 0, tokenizer)
                        if req.logprobs else None)
            result.append(chunk([ChatStreamChoice(
                index=c.index, delta=DeltaMessage(content=c.delta_text), logprobs=logprobs,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)], len(c.token_ids)))
        return result

    try:
        # OpenAI's first chunk of each choice carries the role and empty content.
        for i in range(req.n):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        echo = _echoed(req)
        for i in range(req.n if echo else 0):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=echo))])
        for event in events(first):
            yield event
        async for out in gen:
            final = out
            for event in events(out):
                yield event
        if include_usage:
            data = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                       usage=usage_of([final]))
            yield sse(data)
    except Exception as exc:  # the engine died mid-stream: tell the client, then end cleanly
        yield sse_error(exc)
    yield SSE_DONE


def _echoed(req: ChatCompletionRequest) -> str:
    """vLLM's echo: the answer starts with the last message's text when that message is the
    assistant's (the one continue_final_message continues); otherwise nothing."""
    last = req.messages[-1] if req.echo else {}
    if last.get("role") != "assistant":
        return ""
    content = last.get("content") or ""
    if isinstance(content, list):  # text parts (checked by the template step), as it joins them
        content = "\n".join(part.get("text", "") for part in content)
    return content


def _logprobs(entries: SampleLogprobs | None, k: int, tokenizer: Any) -> ChatLogprobs:
    content = []
    for entry in entries or []:
        items = list(entry.items())
        if not items:
            continue
        top = sorted((item for item in items if item[1].rank <= k),
                     key=lambda item: item[1].rank)[:k]
        chosen = _token_logprob(tokenizer, *items[0])
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[
            _token_logprob(tokenizer, token_id, lp) for token_id, lp in top]))
    return ChatLogprobs(content=content)


def _token_logprob(tokenizer: Any, token_id: int, lp: Logprob) -> TopLogprob:
    token = lp.decoded_token or ""
    return TopLogprob(token=token, logprob=lp.logprob,
                      bytes=list(token_bytes(tokenizer, token_id, token)))
