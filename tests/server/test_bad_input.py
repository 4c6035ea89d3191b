"""Bad input gets OpenAI error JSON with the right status and a message naming the field; the
API key is required and checked; nothing a client sends causes a 500 or stops the server."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import API_KEY

CHAT = [{"role": "user", "content": "hi"}]

# (endpoint, body, status, param the error must name (None: any), words the message must hold)
CASES = [
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "top_k"),
    ("completions", {"prompt": "hi", "min_p": 2}, 400, "min_p", "min_p"),
    ("completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", "presence_penalty"),
    ("completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty", "frequency_penalty"),
    ("completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n", "n"),
    ("completions", {"prompt": "hi", "n": 10**6}, 400, "n", "n"),
    ("completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs", "logprobs"),
    ("completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens", "min_tokens"),
    ("completions", {"prompt": "hi", "seed": 2**80}, 400, "seed", "seed"),
    # Without max_tokens the context's room bounds min_tokens (a count past 64 bits was a 500).
    ("completions", {"prompt": "hi", "max_tokens": None, "min_tokens": 2**80}, 400, "min_tokens",
     "min_tokens"),
    ("chat/completions", {"messages": CHAT, "min_tokens": 600}, 400, "min_tokens", "left"),
    ("completions", {"prompt": "hi", "top_k": 2**80}, 400, "top_k", "top_k"),
    ("completions", {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids", "stop_token_ids"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "stop"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "hi", "stream": "yes please"}, 400, "stream", "stream"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": "x"}}, 400,
     "stream_options", "stream_options.include_usage"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream=true"),
    ("chat/completions", {"messages": CHAT, "stream": False,
                          "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream=true"),
    ("completions", {"prompt": 42}, 400, "prompt", "prompt"),
    ("completions", {"prompt": []}, 400, "prompt", "prompt"),
    ("completions", {"prompt": [[]]}, 400, "prompt", "prompt"),
    ("completions", {"prompt": [10**9]}, 400, "prompt", "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 600}, 400, "max_tokens", "context length"),
    ("completions", {"prompt": "hi " * 600}, 400, "prompt", "max_model_len"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "echo"),
    ("completions", {"prompt": "hi", "logit_bias": {"five": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {"prompt": "hi", "logit_bias": {"10000000": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ("chat/completions", {"messages": CHAT, "logit_bias": {"-1": 5}}, 400, "logit_bias", "token ids"),
    ("completions", {"prompt": "hi", "allowed_token_ids": [5, 10000000]}, 400,
     "allowed_token_ids", "allowed_token_ids"),
    ("chat/completions", {"messages": CHAT, "allowed_token_ids": []}, 400, "allowed_token_ids",
     "at least one"),
    ("completions", {"prompt": "hi", "bad_words": "Paris"}, 400, "bad_words", "bad_words"),
    ("chat/completions", {"messages": CHAT, "bad_words": [""]}, 400, "bad_words", "non-empty"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "messages"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", "content"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", "role"),
    ("chat/completions", {"messages": [*CHAT, {"role": "wizard", "content": "hi"}]}, 400,
     "messages[1].role", "system, developer, user, assistant, tool, function"),
    ("chat/completions", {"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "messages", "content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "text"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 1000}, 400,
     "max_completion_tokens", "context length"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs", "logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs", "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools", "Tool"),
    ("chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice",
     "tools must be set"),
    ("chat/completions", {"messages": CHAT, "tool_choice": "auto"}, 400, "tool_choice",
     "tools must be set"),
    ("chat/completions", {"messages": CHAT, "tool_choice": {"type": "function",
                                                           "function": {"name": "f"}}}, 400,
     "tool_choice", "tools must be set"),
    ("chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions",
     "Function calling"),
    ("chat/completions", {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}, 400,
     "chat_template_kwargs", "tokenize"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "response_format"),
    # vLLM's structured output and other features this server lacks: a 400 naming the field,
    # not an answer made without them (unconstrained text where JSON was asked for).
    ("completions", {"prompt": "hi", "response_format": {"type": "json_object"}}, 400,
     "response_format", "structured output"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"},
                          "stream": True}, 400, "response_format", "structured output"),
    ("completions", {"prompt": "hi", "guided_choice": ["yes", "no"]}, 400, "guided_choice",
     "not be constrained"),
    ("chat/completions", {"messages": CHAT, "guided_json": {"type": "object"}}, 400,
     "guided_json", "structured output"),
    ("chat/completions", {"messages": CHAT, "guided_regex": "[a-z]+"}, 400, "guided_regex",
     "structured output"),
    ("completions", {"prompt": "hi", "structured_outputs": {"choice": ["a", "b"]}}, 400,
     "structured_outputs", "structured output"),
    ("completions", {"prompt": "hi", "return_tokens_as_token_ids": True, "logprobs": 1}, 400,
     "return_tokens_as_token_ids", "return_tokens_as_token_ids"),
    ("chat/completions", {"messages": CHAT, "logits_processors": ["my.Processor"]}, 400,
     "logits_processors", "logits_processors"),
    ("chat/completions", {"messages": CHAT, "chat_template": "{{ messages[0].content }}"}, 400,
     "chat_template", "--chat-template"),
    ("chat/completions", {"messages": CHAT, "documents": [{"title": "a", "text": "b"}]}, 400,
     "documents", "documents"),
    ("/tokenize", {"messages": CHAT, "chat_template": "{{ messages[0].content }}"}, 400,
     "chat_template", "--chat-template"),
    ("chat/completions", {"messages": CHAT, "continue_final_message": True}, 400,
     "continue_final_message", "add_generation_prompt"),
    ("chat/completions", {"messages": CHAT, "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs", "stream"),
    ("/tokenize", {}, 400, "prompt", "messages"),
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 400, "prompt", "either"),
    ("/tokenize", {"messages": []}, 400, "messages", "messages"),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens", "tokens"),
    ("/detokenize", {"tokens": "hi"}, 400, "tokens", "tokens"),
    ("chat/completions", {"messages": CHAT, "model": "nope", "stream": True}, 404, "model", "nope"),
    ("chat/completions", {"messages": CHAT, "temperature": -2, "stream": True}, 400, "temperature",
     "temperature"),
]


@pytest.fixture(scope="module")
def http(smollm2_server):
    with httpx.Client(base_url=smollm2_server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("endpoint,body,status,param,words", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_field(http, endpoint, body, status, param, words):
    path = endpoint if endpoint.startswith("/") else f"/v1/{endpoint}"  # vLLM's /tokenize
    error = assert_openai_error(http.post(path, json=body), status)
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    assert "input_value" not in error["message"] and "pydantic" not in error["message"].lower()


@pytest.mark.parametrize("endpoint,body,param", [
    ("completions", {"prompt": "hi " * 600}, "prompt"),
    ("completions", {"prompt": ["hi", "hi " * 600], "stream": True}, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}, "prompt"),
    ("chat/completions", {"messages": CHAT, "max_tokens": 600}, "max_tokens"),
    # vLLM's server rule for a prompt filling the context (512): refused without max_tokens
    # (no room left) and with any max_tokens; the engine itself would give it one token.
    ("completions", {"prompt": [5] * 512, "max_tokens": None}, "prompt"),
    ("completions", {"prompt": [5] * 512, "max_tokens": 1}, "max_tokens"),
])
def test_context_overflow_has_openai_code_and_words(http, endpoint, body, param):
    """OpenAI's code and opening words, which client libraries (LangChain, LiteLLM) match to
    tell a context overflow from other 400s and trim the conversation."""
    error = assert_openai_error(http.post(f"/v1/{endpoint}", json=body), 400)
    assert error["code"] == "context_length_exceeded", error
    assert error["message"].startswith("This model's maximum context length is 512 tokens"), error
    assert error["param"] == param


def test_prompt_at_the_context_limit(http):
    """What vLLM's server takes at the limit: a prompt one short of max_model_len without
    max_tokens gets one token; a prompt filling it can still be scored (echo, max_tokens 0)."""
    body = http.post("/v1/completions", json={"prompt": [5] * 511, "max_tokens": None,
                                              "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 1, body
    assert body["choices"][0]["finish_reason"] == "length"
    body = http.post("/v1/completions", json={"prompt": [5] * 512, "max_tokens": 0,
                                              "echo": True, "logprobs": 0}).json()
    assert body["usage"]["prompt_tokens"] == 512, body
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 512


@pytest.mark.parametrize("content,words", [
    (b'{"prompt": "hi",', "json"),
    (b"[1, 2, 3]", "object"),
    (b'"just a string"', "object"),
    (b'{"prompt": "hi", "temperature": NaN}', "nan"),
    (b'{"prompt": "hi", "temperature": 1e999}', "range"),
    (b"\xff\xfe not utf-8", "json"),
    (b"", "json"),
    # Lone surrogates (escaped, or as raw bytes) cannot be tokenized or sent to the engine.
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"prompt": "hi", "stop": ["\\udfff"], "stream": true}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (b'{"prompt": "\xed\xa0\x80"}', "json"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeply"),
])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_malformed_body(http, endpoint, content, words):
    r = http.post(f"/v1/{endpoint}", content=content, headers={"Content-Type": "application/json"})
    error = assert_openai_error(r, 400)
    assert words in error["message"].lower()


def test_escaped_surrogate_pairs_and_a_bom_are_fine(http):
    body = b'\xef\xbb\xbf{"prompt": "\\ud83d\\ude00 \xf0\x9f\x98\x80", "max_tokens": 1}'
    r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 0


def test_body_over_the_size_limit(http):
    r = http.post("/v1/completions", json={"prompt": "a" * (5 << 20)})
    error = assert_openai_error(r, 413)
    assert error["code"] == "request_too_large"


def test_unknown_route_and_method(http):
    """Routing errors say what to change: an OpenAI endpoint this server lacks is named as such
    (the openai client's embeddings.create, responses.create), a path without /v1 (a base_url
    without it) points to the right one, a wrong method names the right one."""
    assert "/v1/completions" in assert_openai_error(http.get("/v1/nothing-here"), 404)["message"]
    for path, words in [("/v1/embeddings", "embeddings"), ("/v1/responses", "Responses API"),
                        ("/v1/audio/speech", "audio"), ("/v1/images/generations", "images")]:
        error = assert_openai_error(http.post(path, json={}), 404)
        assert error["code"] == "not_found" and words in error["message"], error
    error = assert_openai_error(http.post("/chat/completions", json={}), 404)
    assert "/v1/chat/completions" in error["message"] and "base_url" in error["message"]
    assert "/v1/models/x" in assert_openai_error(http.get("/models/x"), 404)["message"]
    assert "use POST" in assert_openai_error(http.get("/v1/completions"), 405)["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"},
                                     {"Authorization": API_KEY}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
@pytest.mark.parametrize("method,path", [("GET", "/v1/models"),
                                         ("GET", "/v1/models/SmolLM2-135M-Instruct"),
                                         ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"),
                                         ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_api_key_required_and_checked(smollm2_server, headers, method, path):
    r = httpx.request(method, f"{smollm2_server.base_url}{path}", headers=headers,
                      json={"prompt": "hi", "messages": CHAT, "max_tokens": 1}, timeout=30)
    error = assert_openai_error(r, 401)
    assert error["code"] == "invalid_api_key"
    assert r.headers.get("www-authenticate") == "Bearer"


def test_open_endpoints_need_no_key(smollm2_server):
    for path in ("/health", "/ping", "/live", "/version", "/metrics"):
        assert httpx.get(f"{smollm2_server.base_url}{path}", timeout=10).status_code == 200, path
    assert httpx.post(f"{smollm2_server.base_url}/ping", timeout=10).status_code == 200


def test_the_right_key_works_and_the_server_survived(http, smollm2_server):
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert smollm2_server.proc.poll() is None
    m = smollm2_server.wait_idle()
    assert m[("shardserve:kv_cache_usage_perc", ())] == 0.0
