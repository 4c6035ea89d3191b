"""Request fields left unset take the model's generation_config.json defaults (vLLM's
--generation-config auto); fields the request sets win."""

from __future__ import annotations

from types import SimpleNamespace

from shardserve.server.protocol import ChatCompletionRequest
from shardserve.server.serving_common import build_sampling_params


def _state(defaults):
    model_config = SimpleNamespace(hf_config=SimpleNamespace(vocab_size=1000),
                                   generation_defaults=defaults)
    return SimpleNamespace(config=SimpleNamespace(model_config=model_config),
                           args=SimpleNamespace(max_n=16))


def _params(defaults, max_tokens=None, **fields):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    return build_sampling_params(req, _state(defaults), max_tokens, None)


def test_unset_fields_take_the_generation_config_defaults():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                "repetition_penalty": 1.1, "max_tokens": 7}
    p = _params(defaults)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (
        0.6, 0.95, 20, 0.05, 1.1, 7)
    p = _params(defaults, max_tokens=3, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                repetition_penalty=1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (
        0.0, 1.0, 0, 0.0, 1.0, 3)


def test_no_defaults_keeps_sampling_params_own():
    p = _params({})
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (
        1.0, 1.0, 0, 0.0, 1.0, None)
