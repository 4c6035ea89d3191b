"""vLLM's use_beam_search on /v1/completions and /v1/chat/completions, not streamed: n is the
beam width and the n best sequences are the n choices, best first (shardserve/beam_search.py).

A search's steps are one-token requests with logprobs, so the fields that shape a sample (top_p,
penalties, stop strings, logit_bias, logprobs, ...) have no effect on it: a request that sets
one gets a 400 naming it rather than a result that ignored it (vLLM ignores them silently).
temperature defaults to 0, a deterministic search as in transformers (vLLM's default is 1)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from shardserve.beam_search import MAX_BEAM_WIDTH, BeamSearchSequence, beam_search_async
from shardserve.engine.input_processor import ProcessedPrompt
from shardserve.errors import InvalidRequestError
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import BeamSearchParams
from shardserve.server.serving_common import ClientDisconnected, unless_disconnected
from shardserve.server.state import ServerState

# Fields beam search does not apply -> the values that mean "not set".
_NOT_APPLIED: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0),
    "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0), "stop": (None, "", []), "stop_token_ids": (None, []),
    "min_tokens": (0,), "logit_bias": (None, {}), "allowed_token_ids": (None,),
    "bad_words": (None, []), "logprobs": (None, False), "top_logprobs": (None,),
    "prompt_logprobs": (None,),
}


def beam_search_params(req: Any, max_tokens: int | None, max_model_len: int) -> BeamSearchParams:
    """The request's BeamSearchParams; 400 for what beam search cannot honour."""
    if req.stream:
        raise InvalidRequestError("use_beam_search is not available with stream=true; send "
                                  "stream=false.", "stream")
    for name, unset in _NOT_APPLIED.items():
        if getattr(req, name, None) not in unset:
            raise InvalidRequestError(f"{name} is not applied by beam search (use_beam_search); "
                                      f"leave it out.", name)
    if req.n > MAX_BEAM_WIDTH:
        raise InvalidRequestError(f"With use_beam_search, n is the beam width and must be at "
                                  f"most {MAX_BEAM_WIDTH}; got {req.n}.", "n")
    return BeamSearchParams(
        beam_width=req.n,
        # No limit: beams end at the context's end.
        max_tokens=max_model_len if max_tokens is None else max_tokens,
        ignore_eos=req.ignore_eos,
        temperature=0.0 if req.temperature is None else req.temperature,
        length_penalty=req.length_penalty,
        include_stop_str_in_output=req.include_stop_str_in_output)


async def run_beam_search(request: Request, state: ServerState, prompts: list[ProcessedPrompt],
                          params: BeamSearchParams, request_id: str,
                          skip_special_tokens: bool) -> list[RequestOutput] | None:
    """Each prompt's search as a finished RequestOutput (one output per beam, best first), or
    None when the client went away first (the searches' requests are aborted)."""
    engine = state.engine
    state.admit()
    try:
        searches = beam_search_async(engine, prompts, params, request_id)
        results = await unless_disconnected(request, searches)
    except ClientDisconnected:
        return None
    finally:
        state.release()
    return [_request_output(f"{request_id}-{i}", p, beams, engine.tokenizer, params,
                            skip_special_tokens)
            for i, (p, beams) in enumerate(zip(prompts, results))]


def _request_output(request_id: str, prompt: ProcessedPrompt, beams: list[BeamSearchSequence],
                    tokenizer: Any, params: BeamSearchParams,
                    skip_special_tokens: bool) -> RequestOutput:
    num_prompt = len(prompt.prompt_token_ids)
    outputs = []
    for i, beam in enumerate(beams):
        token_ids = beam.tokens[num_prompt:]
        # The EOS that ended a beam is in its tokens (and usage), its text only when asked for.
        text_ids = (token_ids[:-1] if beam.finish_reason == "stop"
                    and not params.include_stop_str_in_output else token_ids)
        text = tokenizer.decode(text_ids, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
        outputs.append(CompletionOutput(index=i, text=text, token_ids=token_ids,
                                        cumulative_logprob=beam.cum_logprob,
                                        finish_reason=beam.finish_reason,
                                        stop_reason=beam.stop_reason))
    return RequestOutput(request_id, prompt.prompt, prompt.prompt_token_ids, outputs,
                         finished=True)
