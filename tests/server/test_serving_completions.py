"""How /v1/completions turns a request's prompts into what the engine takes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from shardserve.loader.source import ModelSource
from shardserve.server.serving_completions import without_special_tokens
from shardserve.tokenizer import encode_prompt, load_tokenizer


def test_add_special_tokens_false_leaves_out_the_bos(tiny_llama_dir):
    """vLLM's add_special_tokens=false, for a text prompt that already starts with the BOS:
    the tokenizer adds no second one; the text is kept (echo), token ids are as sent."""
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_llama_dir), "tiny"))
    tokenizer.add_bos_token = True  # as Llama's tokenizer_config.json says
    engine = SimpleNamespace(tokenizer=tokenizer, check_started=lambda: None)
    text = "Hello world"
    assert encode_prompt(tokenizer, text)[0] == tokenizer.bos_token_id
    prompt = without_special_tokens(engine, text)
    assert prompt == {"prompt": text, "prompt_token_ids": encode_prompt(tokenizer, text)[1:]}
    ids = {"prompt_token_ids": [5, 6]}
    assert without_special_tokens(engine, ids) == ids
