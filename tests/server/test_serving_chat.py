"""How /v1/chat/completions turns a request into prompt token ids."""

from __future__ import annotations

from pathlib import Path

from shardserve.loader.source import ModelSource
from shardserve.server.protocol import ChatCompletionRequest
from shardserve.server.serving_chat import prompt_token_ids
from shardserve.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_add_special_tokens_adds_the_tokenizers_bos(tiny_llama_dir):
    """vLLM's add_special_tokens: off by default (the template writes its own BOS); on, the
    tokenizer's BOS comes first, as /tokenize counts with the same flag."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_llama_dir), "tiny"))
    tokenizer.add_bos_token = True  # as Llama's tokenizer_config.json says
    plain = prompt_token_ids(tokenizer, ChatCompletionRequest(messages=CHAT))
    added = prompt_token_ids(tokenizer, ChatCompletionRequest(messages=CHAT,
                                                              add_special_tokens=True))
    assert plain[0] != tokenizer.bos_token_id or plain[1] != tokenizer.bos_token_id
    assert added == [tokenizer.bos_token_id, *plain]
