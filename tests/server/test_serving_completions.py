"""How /v1/completions turns a request's prompts into what the engine takes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from shardserve.engine.input_processor import InputProcessor, ProcessedPrompt
from shardserve.loader.source import ModelSource
from shardserve.tokenizer import encode_prompt, load_tokenizer


def test_add_special_tokens_false_leaves_out_the_bos(tiny_llama_dir):
    """vLLM's add_special_tokens=false (what create_completion passes on), for a text prompt
    that already starts with the BOS: the tokenizer adds no second one; the text is kept
    (echo), token ids are as sent."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_llama_dir), "tiny"))
    tokenizer.add_bos_token = True  # as Llama's tokenizer_config.json says
    model_config = SimpleNamespace(max_model_len=64,
                                   hf_config=SimpleNamespace(vocab_size=len(tokenizer)))
    processor = InputProcessor(SimpleNamespace(model_config=model_config), tokenizer, [2])
    text = "Hello world"
    assert encode_prompt(tokenizer, text)[0] == tokenizer.bos_token_id
    prompt = processor.process_prompt(text, None, add_special_tokens=False)
    assert prompt == ProcessedPrompt(text, encode_prompt(tokenizer, text)[1:])
    ids = processor.process_prompt({"prompt_token_ids": [5, 6]}, None, add_special_tokens=False)
    assert ids == ProcessedPrompt(None, [5, 6])


def _echo_output(tokenizer, prompt: str, completion: str):
    """A finished RequestOutput for prompt + completion, each token with logprob -1."""
    from shardserve.outputs import CompletionOutput, Logprob, RequestOutput

    def entries(ids):
        return [{t: Logprob(-1.0, 1, tokenizer.decode([t]))} for t in ids]

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(completion, add_special_tokens=False)
    lps = entries(ids)
    out = CompletionOutput(0, completion, ids, -1.0 * len(ids), lps, "length", None,
                           completion, ids, lps)
    return RequestOutput("r", prompt, prompt_ids, [out], True,
                         [None] + entries(prompt_ids[1:]))


def test_echo_text_offsets_continue_after_the_prompt_tokens(tiny_llama_dir):
    """Offsets count the tokens' own text (vLLM's); a prompt character split over byte tokens
    reads as several U+FFFD, so the completion's first offset follows the last prompt token's
    end, not len(prompt), which overlapped it. Streamed or not."""
    from shardserve.server.protocol import CompletionRequest
    from shardserve.server.serving_completions import _Echo, _response, _stream

    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_llama_dir), "tiny"))
    out = _echo_output(tokenizer, "世界 hi", " there")
    req = CompletionRequest(model="m", prompt="世界 hi", echo=True, logprobs=0)
    echo = _Echo(True, False, 0, tokenizer)
    lp = _response("r", "m", [out], req, echo).choices[0].logprobs
    num_prompt = len(out.prompt_token_ids)
    assert lp.tokens[num_prompt - 1] == " hi" and num_prompt > 3  # 世界 is byte tokens
    ends = [o + len(t) for o, t in zip(lp.text_offset, lp.tokens)]
    assert lp.text_offset[1:] == ends[:-1]  # each token starts where the one before ends

    async def streamed():
        async def rest():
            return
            yield
        return [e async for e in _stream("r", "m", req, (0, out), rest(), echo)]

    chunks = [json.loads(e[len("data: "):]) for e in asyncio.run(streamed())
              if e.startswith("data: {")]
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == lp.text_offset
