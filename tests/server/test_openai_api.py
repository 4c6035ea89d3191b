"""The official `openai` client against the server: chat and completions, streamed and not."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, TINY_SERVER_NAMES

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key=API_KEY, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_and_version(smollm2_server, client, model):
    assert model == "SmolLM2-135M-Instruct"
    assert client.models.retrieve(model) == client.models.list().data[0]
    version = httpx.get(f"{smollm2_server.base_url}/version").json()["version"]
    assert version


def test_several_served_model_names(tiny_server):
    """vLLM's `--served-model-name a b`: both listed and retrievable (a name with a slash
    too), both accepted, the first reported in responses and in the metrics' model_name."""
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key=API_KEY, timeout=60)
    listed = client.models.list().data
    assert [m.id for m in listed] == list(TINY_SERVER_NAMES)
    for card in listed:
        assert client.models.retrieve(card.id) == card
    for name in TINY_SERVER_NAMES:
        r = client.completions.create(model=name, prompt="Hello", max_tokens=1)
        assert r.model == TINY_SERVER_NAMES[0]
        chat = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=1)
        assert chat.model == TINY_SERVER_NAMES[0]
    for unknown in ("org/other", "tiny-llama", "org"):
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(unknown)
        assert err.value.body["code"] == "model_not_found" and unknown in err.value.body["message"]
        assert err.value.body["param"] == "model"
    metrics = httpx.get(f"{tiny_server.base_url}/metrics", timeout=10).text
    assert f'model_name="{TINY_SERVER_NAMES[0]}"' in metrics
    assert f'model_name="{TINY_SERVER_NAMES[1]}"' not in metrics


def test_an_empty_model_name_means_the_served_model(smollm2_server, client, model):
    """vLLM's rule: model "" (what clients with a blank model setting send) is the default
    model, as no model is; only /v1/models/{id} needs a real name."""
    r = client.completions.create(model="", prompt="Hello", max_tokens=1)
    assert r.model == model and r.usage.completion_tokens == 1
    chat = client.chat.completions.create(model="", messages=QUESTION, max_tokens=1)
    assert chat.model == model
    tokens = httpx.post(f"{smollm2_server.base_url}/tokenize", headers=smollm2_server.headers,
                        json={"model": "", "prompt": "Hello"}, timeout=30)
    assert tokens.status_code == 200, tokens.text
    missing = httpx.get(f"{smollm2_server.base_url}/v1/models/", headers=smollm2_server.headers,
                        timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_paris(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_deltas_leave_out_what_they_do_not_carry(smollm2_server, model):
    """As OpenAI's stream: the first delta has the role, later ones only content, the last
    one {} beside finish_reason; no "role": null."""
    body = {"model": model, "messages": QUESTION, "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{smollm2_server.base_url}/v1/chat/completions", json=body,
                      headers=smollm2_server.headers, timeout=60) as r:
        chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert all("role" not in d for d in deltas[1:]) and all(None not in d.values() for d in deltas)
    assert deltas[-1] == {} or set(deltas[-1]) == {"content"}


def test_chat_stream_joins_to_the_same_text(client, model):
    kwargs = dict(model=model, messages=QUESTION, max_completion_tokens=8, temperature=0.8, seed=11)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    parts, roles, finish, usage = [], [], None, None
    for chunk in client.chat.completions.create(**kwargs, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full
    assert roles[0] == "assistant" and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completion_stream_joins_to_the_same_text(client, model):
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0.9,
                  seed=5)
    full = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == full.choices[0].text and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8


def test_completion_prompt_shapes_n_and_logprobs(client, model):
    tokenizer_free_ids = client.completions.create(model=model, prompt=[504, 3575, 282], max_tokens=2,
                                                   temperature=0)
    assert tokenizer_free_ids.usage.prompt_tokens == 3
    r = client.completions.create(model=model, prompt=["Hello", "One, two,"], n=2, max_tokens=3,
                                  temperature=1.0, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)


def test_logit_bias_forces_a_token(client, model):
    """OpenAI's logit_bias: +100 on one token makes every sampled token that one, on both
    endpoints (banning is tested through the Python API, which returns token ids)."""
    forced = client.completions.create(model=model, prompt="The capital of France is",
                                       max_tokens=4, temperature=0.9, seed=3, logprobs=0,
                                       logit_bias={"504": 100})
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1, tokens
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=3,
                                          temperature=0, logprobs=True, logit_bias={"504": 100})
    assert [t.token for t in chat.choices[0].logprobs.content] == tokens[:1] * 3


def test_allowed_token_ids_and_bad_words(client, model):
    """vLLM's extra fields, on both endpoints: only allowed ids come out; a bad word does not,
    in either of its tokenizations ("Paris" and " Paris")."""
    prompt = "The capital of France is"
    kwargs = dict(model=model, prompt=prompt, max_tokens=4, temperature=0.9, seed=3, logprobs=0)
    allowed = client.completions.create(**kwargs, extra_body={"allowed_token_ids": [504]})
    forced = client.completions.create(**kwargs, logit_bias={"504": 100})
    tokens = allowed.choices[0].logprobs.tokens
    assert len(set(tokens)) == 1 and tokens == forced.choices[0].logprobs.tokens
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert "Paris" in plain.choices[0].text
    banned = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                       extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in banned.choices[0].text
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                          temperature=0, extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in chat.choices[0].message.content


def test_echo_puts_the_prompt_first_streamed_or_not(client, model):
    prompt = "The capital of France is"
    kwargs = dict(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    plain = client.completions.create(**kwargs)
    echoed = client.completions.create(echo=True, **kwargs)
    text = echoed.choices[0].text
    assert text == prompt + plain.choices[0].text
    lp = echoed.choices[0].logprobs
    num_prompt = echoed.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 4 and echoed.usage.completion_tokens == 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == text and lp.text_offset[num_prompt] == len(prompt)
    assert lp.tokens[num_prompt:] == plain.choices[0].logprobs.tokens
    streamed = client.completions.create(echo=True, stream=True, **kwargs)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_echo_with_max_tokens_0_scores_the_prompt(client, model):
    """What lm-evaluation-harness sends for log-likelihoods: the prompt's own logprobs."""
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=0, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == r.usage.prompt_tokens == r.usage.total_tokens
    # The same numbers as the prompt logprobs of a normal request (vLLM's prompt_logprobs).
    again = client.completions.create(model=model, prompt=prompt, max_tokens=2, echo=True,
                                      logprobs=0, temperature=0)
    n = r.usage.prompt_tokens
    assert again.choices[0].logprobs.token_logprobs[:n] == c.logprobs.token_logprobs


def test_chat_logprobs_and_vllm_extras(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Say hi."}],
        max_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
        stop=["\n\n"], logprobs=True, top_logprobs=2,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4,
                    "ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 4
    assert len(c.logprobs.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_chat_logprob_bytes_rebuild_the_answer_streamed_or_not(client, model):
    """OpenAI's logprobs bytes: an emoji spans tokens that each decode to U+FFFD, but their
    bytes are their own, so the answer's tokens' bytes join to its UTF-8 (the top_logprobs'
    too: the chosen token is the first of them here)."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Reply with an emoji of a "
                                                                     "cat 🐱"}],
                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    answer = r.choices[0].message.content
    assert "🐱" in answer and any(t.token == "\ufffd" for t in content)
    assert bytes(b for t in content for b in t.bytes) == answer.encode()
    assert all(t.top_logprobs[0].bytes == t.bytes for t in content)
    streamed = [t for chunk in client.chat.completions.create(**kwargs, stream=True)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert [t.bytes for t in streamed] == [t.bytes for t in content]


def test_stop_string_ends_the_answer_streamed_or_not(smollm2_server, client, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=20, temperature=0, stop=["Paris"])
    full = client.chat.completions.create(**kwargs).choices[0]
    assert full.message.content == "The capital of France is "
    assert full.finish_reason == "stop" and full.model_extra["stop_reason"] == "Paris"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert smollm2_server.wait_idle()[("shardserve:kv_cache_usage_perc", ())] == 0.0


def test_chat_template_kwargs_reach_the_template(client, model):
    # vLLM's chat_template_kwargs are template variables (Qwen3's enable_thinking) and may
    # override add_generation_prompt: SmolLM2's prompt then lacks "<|im_start|>assistant\n"
    # (4 tokens).
    kwargs = dict(model=model, messages=QUESTION, max_tokens=1, temperature=0)
    full = client.chat.completions.create(**kwargs).usage.prompt_tokens
    bare = client.chat.completions.create(
        **kwargs, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert bare.usage.prompt_tokens == full - 4


def test_echo_with_n_gives_each_choice_the_prompt_once(client, model):
    """n samples share one prompt: each echoed choice holds its logprobs once, not n times."""
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=3, temperature=0,
                  logprobs=1, echo=True)
    one = client.completions.create(**kwargs).choices[0].logprobs
    two = client.completions.create(**kwargs, n=2)
    assert len(two.choices) == 2
    for choice in two.choices:
        assert choice.logprobs.tokens == one.tokens
        assert choice.logprobs.text_offset == one.text_offset
        assert "".join(choice.logprobs.tokens) == choice.text


def test_streamed_logprobs_match_the_whole_response_with_a_stop_string(client, model):
    """Text held back while it may start a stop string must not shift the streamed text_offset
    away from the non-streamed one."""
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
                  logprobs=1)
    tokens = client.completions.create(**kwargs).choices[0].logprobs.tokens
    assert len(tokens[0]) > 2
    stop = tokens[0][2:] + tokens[1]  # starts inside the first token, ends in the second
    full = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert full.finish_reason == "stop" and full.text == tokens[0][:2]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stop=[stop], stream=True)
              if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, field)] == \
            getattr(full.logprobs, field), field


def test_continue_final_message_and_echo(smollm2_server, client, model):
    """vLLM's continue_final_message: the assistant's last message is continued, not closed;
    echo puts it before the answer, streamed or not."""
    started = "The capital of France is"
    messages = [*QUESTION, {"role": "assistant", "content": started}]
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    kwargs = dict(model=model, messages=messages, max_tokens=4, temperature=0)
    r = client.chat.completions.create(**kwargs, extra_body=extra)
    assert "Paris" in r.choices[0].message.content
    counted = httpx.post(f"{smollm2_server.base_url}/tokenize", headers=smollm2_server.headers,
                         json={"messages": messages, **extra}, timeout=30).json()
    assert r.usage.prompt_tokens == counted["count"]
    assert client.completions.create(model=model, prompt=counted["tokens"], max_tokens=4,
                                     temperature=0).choices[0].text == r.choices[0].message.content
    echoed = client.chat.completions.create(**kwargs, extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == started + r.choices[0].message.content
    streamed = client.chat.completions.create(**kwargs, stream=True,
                                              extra_body={**extra, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        echoed.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs, extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_put_usage_in_every_chunk(client, model, endpoint):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    if endpoint == "chat":
        stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                                stream=True, stream_options=options)
    else:
        stream = client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                           stream=True, stream_options=options)
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    prompt = chunks[-1].usage.prompt_tokens
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4 == chunks[-1].usage.completion_tokens
    assert not chunks[-1].choices
    assert all(c.usage.prompt_tokens == prompt and
               c.usage.total_tokens == prompt + c.usage.completion_tokens for c in chunks)


def test_tokenize_and_detokenize(smollm2_server, client, model):
    """vLLM's /tokenize and /detokenize count what the generation endpoints count."""
    with httpx.Client(base_url=smollm2_server.base_url, headers=smollm2_server.headers,
                      timeout=30) as http:
        prompt = http.post("/tokenize", json={"prompt": "The capital of France is",
                                              "return_token_strs": True}).json()
        r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1)
        assert prompt["count"] == len(prompt["tokens"]) == r.usage.prompt_tokens
        assert prompt["max_model_len"] == 512 and len(prompt["token_strs"]) == prompt["count"]
        text = http.post("/detokenize", json={"tokens": prompt["tokens"]}).json()["prompt"]
        assert text == "The capital of France is"
        chat = http.post("/tokenize", json={"messages": QUESTION, "model": model}).json()
        r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
        assert chat["count"] == r.usage.prompt_tokens
        rendered = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert rendered.endswith("<|im_start|>assistant\n") and QUESTION[0]["content"] in rendered


def test_prompt_logprobs_are_returned(client, model):
    """vLLM's prompt_logprobs=k: per prompt token (null for the first) the token's own logprob
    and the top k, on the choice (completions) or the response (chat); the same numbers as
    echo's."""
    prompt = "The capital of France is"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                  echo=True, logprobs=0, extra_body={"prompt_logprobs": 2})
    choice = r.choices[0]
    entries = choice.model_extra["prompt_logprobs"]
    assert len(entries) == r.usage.prompt_tokens and entries[0] is None
    for entry, logprob in zip(entries[1:], choice.logprobs.token_logprobs[1:]):
        assert 1 <= len(entry) <= 3 and {e["rank"] for e in entry.values()} >= {1, 2}
        assert next(iter(entry.values()))["logprob"] == pytest.approx(logprob, abs=1e-5)
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    assert all(len(e) == 1 for e in entries[1:])


def test_tools_with_tool_choice_none_get_a_text_answer(client, model):
    """vLLM's rule: tools with tool_choice "none" reach the chat template and the answer is
    text (SmolLM2's template ignores tools, so the prompt and answer are the plain ones);
    any other tool_choice with tools is a 400 (no tool-call parsing here)."""
    tools = [{"type": "function", "function": {
        "name": "get_capital", "parameters": {"type": "object", "properties": {}}}}]
    plain = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                           temperature=0)
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12,
                                       temperature=0, tools=tools, tool_choice="none")
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert "Paris" in r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    # A history replayed from a tool-using client: the tool-call turn has content null.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_capital", "arguments": "{}"}}
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Paris"}]
    replayed = client.chat.completions.create(model=model, messages=history, max_tokens=1,
                                              tools=tools, tool_choice="none")
    assert replayed.usage.prompt_tokens > plain.usage.prompt_tokens
    for choice in (None, "auto"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1,
                                           tools=tools, **({"tool_choice": choice} if choice else {}))
        assert err.value.body["param"] == "tools" and "tool_choice" in err.value.body["message"]


# The fields OpenAI's schema marks "or null": null means the default, as leaving them out.
NULLABLE = ["n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
            "logit_bias", "stream", "stream_options", "user", "logprobs"]


@pytest.mark.parametrize("endpoint,body,extra", [
    ("completions", {"prompt": "Hello", "max_tokens": 2},
     ["echo", "best_of", "suffix", "response_format", "guided_json", "guided_choice"]),
    ("chat/completions", {"messages": QUESTION, "max_completion_tokens": 2},
     ["max_tokens", "top_logprobs", "tools", "tool_choice", "response_format", "guided_json",
      "structured_outputs", "chat_template", "documents", "return_tokens_as_token_ids"]),
])
def test_null_fields_mean_their_defaults(smollm2_server, endpoint, body, extra):
    r = httpx.post(f"{smollm2_server.base_url}/v1/{endpoint}", timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={**body, **{name: None for name in NULLABLE + extra}})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_truncate_prompt_tokens(smollm2_server, model, endpoint):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens are what the model sees (usage
    counts k); 0 or more than max_model_len is a 400 naming it."""
    body = {"model": model, "max_tokens": 1, "temperature": 0}
    body.update({"prompt": "one two three four five six seven eight nine ten"}
                if endpoint == "completions" else {"messages": QUESTION})
    url = f"{smollm2_server.base_url}/v1/{endpoint}"
    post = lambda extra: httpx.post(url, json={**body, **extra},  # noqa: E731
                                    headers=smollm2_server.headers, timeout=60)
    whole = post({}).json()["usage"]["prompt_tokens"]
    assert whole > 5
    assert post({"truncate_prompt_tokens": 5}).json()["usage"]["prompt_tokens"] == 5
    assert post({"truncate_prompt_tokens": -1}).json()["usage"]["prompt_tokens"] == whole
    for bad in (0, 10 ** 6):
        r = post({"truncate_prompt_tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
