"""vLLM's /tokenize counts a chat exactly as /v1/chat/completions renders it: tools, template
variables and the other template options included."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from starlette.requests import Request

from shardserve.loader.source import ModelSource
from shardserve.server.protocol import ChatCompletionRequest
from shardserve.server.serving_chat import prompt_token_ids
from shardserve.server.serving_tokenize import tokenize
from shardserve.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_capital", "parameters": {"type": "object", "properties": {}}}}]
# A template that shows the tools and a template variable, as tool-aware models' templates do.
TEMPLATE = ("{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
            "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}{% if not (loop.last and continue_final_message) %}<|im_end|>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if think %}<think>{% endif %}{% endif %}")


def _state(tokenizer) -> SimpleNamespace:
    engine = SimpleNamespace(tokenizer=tokenizer, check_started=lambda: None)
    return SimpleNamespace(args=SimpleNamespace(max_request_body_bytes=1 << 20),
                           check_model=lambda name: None, engine=engine,
                           config=SimpleNamespace(model_config=SimpleNamespace(max_model_len=512)))


def _post(state, body: dict) -> dict:
    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/tokenize",
                       "headers": [(b"content-length", str(len(raw)).encode())]}, receive)
    return asyncio.run(tokenize(request, state)).model_dump()


def test_tokenize_chat_renders_tools_and_options_as_chat_does(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelSource("hf", Path(tiny_llama_dir), "tiny"))
    tokenizer.chat_template = TEMPLATE
    state = _state(tokenizer)
    with_tools = _post(state, {"messages": CHAT, "tools": TOOLS, "return_token_strs": True})
    chat = prompt_token_ids(tokenizer, ChatCompletionRequest(messages=CHAT, tools=TOOLS,
                                                             tool_choice="none"))
    assert with_tools["tokens"] == chat and with_tools["count"] == len(chat)
    assert "Tools: get_capital" in tokenizer.decode(with_tools["tokens"])
    assert len(with_tools["token_strs"]) == len(chat)
    plain = _post(state, {"messages": CHAT})["tokens"]
    assert "get_capital" not in tokenizer.decode(plain) and plain != chat
    # The other chat options reach the template the same way.
    options = {"chat_template_kwargs": {"think": True}, "add_special_tokens": True}
    thinking = _post(state, {"messages": CHAT, **options})["tokens"]
    assert thinking == prompt_token_ids(tokenizer, ChatCompletionRequest(messages=CHAT, **options))
    assert tokenizer.decode(thinking).endswith("<think>")
    open_turn = [*CHAT, {"role": "assistant", "content": "It is"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    cont = _post(state, {"messages": open_turn, **options})["tokens"]
    assert tokenizer.decode(cont).endswith("assistant\nIt is")
    assert cont == prompt_token_ids(tokenizer, ChatCompletionRequest(messages=open_turn, **options))
