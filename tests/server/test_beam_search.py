"""vLLM's use_beam_search over HTTP: n is the beam width, the n best sequences come back as
the n choices, best first; not streamed; a client that goes away aborts the search."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BEAM = {"use_beam_search": True}


@pytest.fixture(scope="module")
def tiny(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key=API_KEY, timeout=120)


def test_width_one_is_greedy(tiny):
    prompt = "The capital of France is"
    greedy = tiny.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    beam = tiny.completions.create(model="tiny", prompt=prompt, max_tokens=6, n=1,
                                   extra_body={**BEAM, "ignore_eos": True})
    assert [c.text for c in beam.choices] == [greedy.choices[0].text]
    assert beam.usage.completion_tokens == 6 and beam.choices[0].finish_reason == "length"


def test_n_beams_per_prompt_deterministic(tiny):
    prompts = ["Once upon a time", "1, 2, 3,"]
    runs = [tiny.completions.create(model="tiny", prompt=prompts, max_tokens=5, n=3,
                                    extra_body={**BEAM, "ignore_eos": True}) for _ in range(2)]
    first = runs[0]
    assert [c.index for c in first.choices] == list(range(6))
    texts = [c.text for c in first.choices]
    assert len(set(texts[:3])) == 3 and len(set(texts[3:])) == 3  # three different beams each
    assert texts == [c.text for c in runs[1].choices]  # temperature 0 by default: deterministic
    assert first.usage.completion_tokens == 6 * 5


def test_chat_beams_end_at_eos_without_its_text(smollm2_server):
    client = openai.OpenAI(base_url=f"{smollm2_server.base_url}/v1", api_key=API_KEY, timeout=120)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", n=2, max_tokens=20, extra_body=BEAM,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert len(r.choices) == 2 and len({c.message.content for c in r.choices}) == 2
    for choice in r.choices:
        assert "Paris" in choice.message.content and "<|im_end|>" not in choice.message.content
        assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == 2


@pytest.mark.parametrize("extra,param", [({"stream": True}, "stream"), ({"top_p": 0.5}, "top_p"),
                                         ({"stop": ["x"]}, "stop"), ({"logprobs": 2}, "logprobs"),
                                         ({"n": 11}, "n"), ({"length_penalty": 1e308},
                                                                "length_penalty")])
def test_what_beam_search_cannot_honour_is_a_400(tiny_server, extra, param):
    r = httpx.post(f"{tiny_server.base_url}/v1/completions", headers=AUTH, timeout=30,
                   json={"prompt": "hi", "max_tokens": 3, "n": 2, **BEAM, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_disconnect_aborts_the_search(tiny_server):
    before = tiny_server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # 500 steps of 3 beams take far longer than this
        httpx.post(f"{tiny_server.base_url}/v1/completions", headers=AUTH,
                   timeout=httpx.Timeout(0.5, connect=10),
                   json={"prompt": "Tell a very long story.", "max_tokens": 500, "n": 3,
                         "ignore_eos": True, **BEAM})
    start = time.monotonic()
    after = tiny_server.wait_idle(timeout=30)
    assert after[("shardserve:kv_cache_usage_perc", ())] == 0.0
    assert time.monotonic() - start < 30
    generated = (after[("shardserve:generation_tokens_total", ())]
                 - before[("shardserve:generation_tokens_total", ())])
    assert generated < 3 * 500 / 2  # stopped, not run to the end
