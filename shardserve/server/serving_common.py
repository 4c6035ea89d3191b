"""What both generation endpoints share: reading and checking a body, building SamplingParams,
merging several prompts' streams, noticing a client that went away, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.types import Receive

from shardserve.closing_response import ClosingStreamingResponse
from shardserve.errors import ContextLengthError, InvalidRequestError
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams, logit_bias_by_id
from shardserve.server.errors import APIError, from_exception, validation_error
from shardserve.server.protocol import StreamOptions, UsageInfo
from shardserve.server.state import ServerState

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


# ---- request bodies ------------------------------------------------------------------------


async def read_request(request: Request, state: ServerState, model: type[M]) -> M:
    """The body parsed into `model`: 413 over the size limit, 400 for bad JSON or fields."""
    body = await read_body(request, state.args.max_request_body_bytes)
    try:
        # Strict UTF-8, a BOM allowed (json.loads on bytes lets raw surrogate bytes through).
        text = body.decode("utf-8-sig")
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}") from None
    except RecursionError:
        raise APIError(400, "The request body is not valid JSON: it is nested too deeply.") from None
    if _SURROGATE_ESCAPE.search(text):  # rare (emoji escaped as pairs): only then walk the data
        _check_unicode(data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, model) from None


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"The request body is larger than the server's limit of {limit} "
                              "bytes (--max-request-body-bytes).", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise too_large
        except ValueError:
            raise APIError(400, "The Content-Length header is not an integer.") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _reject_constant(name: str) -> float:
    # NaN or Infinity in a sampling field would poison the logits of a whole batch.
    raise ValueError(f"{name} is not allowed; send finite numbers")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(data: Any) -> None:
    """400 for a string holding a lone surrogate: JSON's \\ud800 escapes decode to a str that
    cannot be encoded as UTF-8, which would fail later in the tokenizer or on the way to the
    engine as a 500. Iterative, as the nesting can be as deep as the JSON parser allows."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "The request body holds a string with a lone UTF-16 surrogate "
                                    f"escape ({ascii(value[:40])}); send valid Unicode text.") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


# ---- sampling ------------------------------------------------------------------------------

# Request fields for features this server does not have -> what the 400 says about them.
# Answering without the feature (unconstrained text for a JSON schema, say) would look like
# success to the client.
_STRUCTURED = ("is vLLM's structured output (guided decoding), which this server does not "
               "do: the output would not be constrained. Leave it out.")
UNSUPPORTED_FIELDS = {
    **{name: _STRUCTURED for name in ("guided_json", "guided_regex", "guided_choice",
                                      "guided_grammar", "structural_tag", "structured_outputs")},
    "logits_processors": "is not supported by this server (no custom logits processors).",
    "return_tokens_as_token_ids": "is not supported by this server: logprobs name tokens by "
                                  "their text.",
    "chat_template": "is not accepted per request (as vLLM without "
                     "--trust-request-chat-template); start the server with --chat-template "
                     "instead.",
    "documents": "(documents for the chat template) is not supported by this server.",
}


def check_unsupported(req: Any) -> None:
    """400 naming the first field the request sets for a feature this server lacks."""
    for name, why in UNSUPPORTED_FIELDS.items():
        if getattr(req, name, None) not in (None, False):
            raise InvalidRequestError(f"{name} {why}", name)
    response_format = getattr(req, "response_format", None)
    if response_format and response_format.get("type") not in (None, "text"):
        raise InvalidRequestError(
            f"response_format {response_format.get('type')!r} is structured output, which this "
            "server does not do; leave response_format out or send {\"type\": \"text\"}.",
            "response_format")


MAX_LOGIT_BIAS = 1024  # entries per request (OpenAI documents no limit; this bounds the work)


def build_sampling_params(req: Any, state: ServerState, max_tokens: int | None,
                          logprobs: int | None, num_prompts: int = 1) -> SamplingParams:
    """SamplingParams from the OpenAI/vLLM fields; out-of-range values raise 400 naming the
    field (here for what would otherwise reach a tensor, in SamplingParams for the rest)."""
    vocab_size = int(state.config.model_config.hf_config.vocab_size)
    if req.n < 1 or req.n * num_prompts > state.args.max_n:
        raise InvalidRequestError(
            f"n times the number of prompts must be in [1, {state.args.max_n}] (--max-n); "
            f"got n={req.n} for {num_prompts} prompt(s).", "n")
    logit_bias = _logit_bias(req.logit_bias, vocab_size)
    if req.seed is not None and not _INT64_MIN <= req.seed <= _INT64_MAX - req.n:
        raise InvalidRequestError("seed must fit in a signed 64-bit integer.", "seed")
    bad_stop_ids = [t for t in req.stop_token_ids or [] if not 0 <= t < vocab_size]
    if bad_stop_ids:
        raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab_size}); got "
                                  f"{bad_stop_ids[:5]}.", "stop_token_ids")
    # Fields the request leaves unset take the model's recommended defaults
    # (generation_config.json, --generation-config), then SamplingParams' own, as in vLLM.
    defaults = state.config.model_config.generation_defaults

    def unset_or(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return defaults.get(name, fallback) if value is None else value

    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    top_k = unset_or("top_k", 0)
    if top_k > _INT64_MAX:
        raise InvalidRequestError("top_k is out of range.", "top_k")
    if req.stream_options is not None and not req.stream:  # vLLM's rule too
        raise InvalidRequestError("stream_options can only be set with stream=true.",
                                  "stream_options")
    if req.stream and req.prompt_logprobs is not None:  # vLLM's rule: they come whole, at the end
        raise InvalidRequestError("prompt_logprobs are not available with stream=true.",
                                  "prompt_logprobs")
    if isinstance(req.stop, list) and len(req.stop) > 64:
        raise InvalidRequestError("At most 64 stop strings are allowed.", "stop")
    return SamplingParams(
        n=req.n,
        temperature=unset_or("temperature", 1.0),
        top_p=unset_or("top_p", 1.0),
        top_k=min(top_k, vocab_size),
        min_p=unset_or("min_p", 0.0),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=unset_or("repetition_penalty", 1.0),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        logit_bias=logit_bias,
        allowed_token_ids=req.allowed_token_ids,
        bad_words=req.bad_words,
    )


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {id: bias}, ids in the vocabulary."""
    if not raw:
        return None
    if len(raw) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries.",
                                  "logit_bias")
    out = logit_bias_by_id(raw)
    for token in out:
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab_size}); "
                                      f"got {token}.", "logit_bias")
    return out


def check_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
               param: str, min_tokens: int = 0) -> None:
    """400 when the prompt plus the tokens asked for exceed the context (OpenAI's wording).

    vLLM's server rule, stricter than its engine's (which takes a prompt of max_model_len and
    gives it one token): without max_tokens the prompt must leave room for at least one."""
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"request has {num_prompt_tokens} input tokens, which leaves no room to "
                "generate; shorten the prompt.", "prompt")
        # Without max_tokens the room left is the limit (vLLM's server makes it max_tokens), so
        # SamplingParams cannot check min_tokens against it: more could never be generated,
        # and a count past 64 bits would fail on its way to the engine (a 500).
        room = max_model_len - num_prompt_tokens
        if min_tokens > room:
            raise InvalidRequestError(
                f"min_tokens ({min_tokens}) must not exceed the {room} tokens the context has "
                f"left after the prompt ({num_prompt_tokens} of {max_model_len}).", "min_tokens")
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} in the completion). Reduce the prompt or {param}.", param)


def stream_usage(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage in every chunk too): OpenAI's include_usage and
    vLLM's continuous_usage_stats, which only counts with include_usage."""
    include = bool(options and options.include_usage)
    return include, include and bool(options.continuous_usage_stats)


def chunk_usage(continuous: bool, num_prompt: int, num_tokens: int) -> dict[str, int] | None:
    """A chunk's usage: null (OpenAI) or, continuous, its prompt and its choice's tokens so far."""
    if not continuous:
        return None
    return UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_tokens,
                     total_tokens=num_prompt + num_tokens).model_dump()


def prompt_logprobs_of(out: RequestOutput, k: int | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs field: per prompt token, null for the first (nothing precedes
    it), else {token id: {logprob, rank, decoded_token}} for the token itself and the top k."""
    if k is None:
        return None
    result: list[dict[str, Any] | None] = []
    for entry in out.prompt_logprobs or []:
        if entry is None:
            result.append(None)
            continue
        result.append({str(token): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                                    "decoded_token": lp.decoded_token}
                       for i, (token, lp) in enumerate(entry.items()) if i == 0 or lp.rank <= k})
    return result


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


# ---- concurrency and disconnects -----------------------------------------------------------


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, tagged with the iterator's index. Closing the
    merge (or an error in one) cancels and closes them all, which aborts their requests."""
    pending: dict[asyncio.Future, tuple[int, AsyncIterator[T]]] = {
        asyncio.ensure_future(anext(it)): (i, it) for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i, it = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(it))] = (i, it)
                yield i, item
    finally:
        for future in pending:
            future.cancel()
        try:
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            await close_all(iterators)


async def close_all(iterators: Iterable[AsyncIterator[Any]]) -> None:
    """Close async generators (each one's finally aborts its request), best effort: a
    cancellation that interrupts one must not leave the others open."""
    for it in iterators:
        try:
            await it.aclose()  # type: ignore[attr-defined]
        except (RuntimeError, asyncio.CancelledError):  # already running, or cancelled again
            continue


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or cancel it (aborting its requests) and raise ClientDisconnected
    when the client goes away first. Only after the body has been read."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ---- server-sent events --------------------------------------------------------------------


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the 200 header went out: one error event, then [DONE]."""
    return sse(from_exception(exc).body())


class SSEResponse(ClosingStreamingResponse):
    """Server-sent events that always run `on_close` (abort what is left, count the request
    done), however the stream ends."""

    def __init__(self, content: AsyncIterator[str],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, on_close, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
