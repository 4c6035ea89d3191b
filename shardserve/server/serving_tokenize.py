"""vLLM's POST /tokenize and /detokenize: the token ids the server would use for a prompt or a
chat (its template applied, as /v1/chat/completions does), and the text of token ids. Clients
use them to count tokens and to trim prompts to the context before sending them."""

from __future__ import annotations

from fastapi import Request

from shardserve.errors import InvalidRequestError
from shardserve.server.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                        TokenizeResponse)
from shardserve.server.serving_chat import prompt_token_ids
from shardserve.server.serving_common import check_unsupported, read_request
from shardserve.server.state import ServerState
from shardserve.tokenizer import encode_prompt


async def tokenize(request: Request, state: ServerState) -> TokenizeResponse:
    req = await read_request(request, state, TokenizeRequest)
    state.check_model(req.model)
    check_unsupported(req)
    state.engine.check_started()  # no tokenizer while the model loads
    tokenizer = state.engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("Send either prompt (text) or messages (a chat).", "prompt")
    if req.prompt is not None:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = encode_prompt(tokenizer, req.prompt, add_special)
    else:
        # The chat completions path's own rendering (template options, tools; no BOS added
        # unless asked, as the template writes it), so the count is the one a chat would use.
        ids = prompt_token_ids(tokenizer, req)
    return TokenizeResponse(
        count=len(ids), max_model_len=state.config.model_config.max_model_len, tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None)


async def detokenize(request: Request, state: ServerState) -> DetokenizeResponse:
    req = await read_request(request, state, DetokenizeRequest)
    state.check_model(req.model)
    state.engine.check_started()
    vocab_size = int(state.config.model_config.hf_config.vocab_size)
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"tokens must be ids in [0, {vocab_size}); got {bad[:5]}.",
                                  "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens))
