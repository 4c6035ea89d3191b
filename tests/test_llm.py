"""The offline LLM as a vLLM script uses it: chat options, default sampling params from the
model's generation_config.json, vLLM's names (llm_engine, clone) and clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shardserve import SamplingParams
from shardserve.errors import InvalidRequestError
from tests.device import make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64,
                   kv_cache_memory_bytes=1 << 20)
    yield llm
    llm.shutdown()


def _chat_prompt(llm, messages=MESSAGES, **kwargs) -> str:
    return llm.chat(messages, GREEDY, use_tqdm=False, **kwargs)[0].prompt


def test_chat_template_string_and_its_kwargs(llm):
    """vLLM's chat_template is Jinja text used instead of the model's; chat_template_kwargs
    are variables it sees."""
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ suffix }}"
    assert _chat_prompt(llm, chat_template=template,
                        chat_template_kwargs={"suffix": "<go>"}) == "[user]hi<go>"
    with pytest.raises(InvalidRequestError, match="chat_template"):
        _chat_prompt(llm, chat_template=123)


def test_chat_continue_final_message(llm):
    messages = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
    prompt = _chat_prompt(llm, messages, add_generation_prompt=False, continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\nThe answer is")
    # vLLM's rule: one continues the last message, the other starts a new one.
    with pytest.raises(InvalidRequestError, match="add_generation_prompt"):
        _chat_prompt(llm, messages, continue_final_message=True)


def test_chat_tools_reach_the_template(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    template = "{% for t in tools %}<{{ t.function.name }}>{% endfor %}{{ messages[0].content }}"
    assert _chat_prompt(llm, chat_template=template, tools=tools) == "<get_weather>hi"
    with pytest.raises(InvalidRequestError, match="tools"):
        _chat_prompt(llm, tools={"name": "get_weather"})


def test_chat_template_errors_are_invalid_requests(llm):
    """A template that fails in plain Python (not a Jinja TemplateError) is still the caller's
    input, not a TypeError from deep inside jinja2."""
    with pytest.raises(InvalidRequestError, match="TypeError"):
        _chat_prompt(llm, chat_template="{{ 1 + 'a' }}")


def test_lora_request_is_refused(llm):
    with pytest.raises(InvalidRequestError, match="LoRA"):
        llm.generate("hi", GREEDY, use_tqdm=False, lora_request=object())
    with pytest.raises(InvalidRequestError, match="LoRA"):
        llm.chat(MESSAGES, GREEDY, use_tqdm=False, lora_request=object())


def test_numpy_prompt_token_ids(llm):
    ids = np.array([1, 2, 3])
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 2, 3] and all(type(t) is int for t in out.prompt_token_ids)
    plain = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids


def test_vllm_names(llm):
    assert llm.llm_engine is llm.engine
    assert llm.llm_engine.get_tokenizer() is llm.get_tokenizer()
    params = SamplingParams(stop=["a"], logit_bias={5: 1.0})
    copy = params.clone()
    copy.stop.append("b")
    copy.logit_bias[6] = 2.0
    assert params.stop == ["a"] and params.logit_bias == {5: 1.0}


@pytest.fixture(scope="module")
def recommended_model(tiny_model_dirs, tmp_path_factory):
    """The tiny model, with a creator's recommended sampling in generation_config.json."""
    folder = tmp_path_factory.mktemp("recommended") / "llama"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    file = folder / "generation_config.json"
    config = json.loads(file.read_text())
    config.update(temperature=0.0, top_k=20, max_new_tokens=5, do_sample=True)
    file.write_text(json.dumps(config))
    return str(folder)


def test_default_sampling_params_come_from_generation_config(recommended_model):
    """vLLM's generation_config='auto' (its default): with sampling_params=None, the model's
    generation_config.json sets temperature, top_k, ... and max_new_tokens (as max_tokens)."""
    llm = make_llm(recommended_model, dtype="float32", max_model_len=64,
                   kv_cache_memory_bytes=1 << 20)
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.0, 20, 5)
        assert defaults.top_p == 1.0  # not in the file: SamplingParams' own
        greedy = SamplingParams(temperature=0.0, max_tokens=5)
        expected = llm.generate("hi", greedy, use_tqdm=False)[0].outputs[0].token_ids
        for out in llm.generate(["hi", "hi"], use_tqdm=False):
            assert out.outputs[0].token_ids == expected
        chat = llm.chat(MESSAGES, use_tqdm=False)[0].outputs[0]
        assert len(chat.token_ids) == 5 or chat.finish_reason == "stop"
    finally:
        llm.shutdown()


def test_generation_config_vllm_ignores_the_file(recommended_model):
    llm = make_llm(recommended_model, dtype="float32", max_model_len=64,
                   kv_cache_memory_bytes=1 << 20, generation_config="vllm")
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (1.0, 0, 16)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("prompt, key", [
    ({"prompt": "hi", "multi_modal_data": {"image": "x.png"}}, "multi_modal_data"),
    ({"prompt_token_ids": [1, 2], "cache_salt": "user-1"}, "cache_salt"),
    ({"promt": "hi"}, "promt"),
])
def test_prompt_dict_keys_it_cannot_honour_are_refused(llm, prompt, key):
    """vLLM's prompt dicts may carry images or a cache salt; a text-only engine must say so,
    not answer the text alone. None values (unset) are fine."""
    with pytest.raises(InvalidRequestError, match=key):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    ok = llm.generate({"prompt": "hi", "multi_modal_data": None}, GREEDY, use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 2
