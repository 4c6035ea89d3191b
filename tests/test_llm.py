"""The offline LLM as a vLLM script uses it: chat options, default sampling params from the
model's generation_config.json, vLLM's names (llm_engine, clone) and clear refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shardserve import SamplingParams
from shardserve.errors import InvalidRequestError
from tests.device import make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    # With arguments a ported vLLM script passes at their vLLM values (taken silently).
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64,
                   kv_cache_memory_bytes=1 << 20, swap_space=4, disable_log_stats=True,
                   download_dir=None, revision=None, tokenizer_mode="auto", enforce_eager=True,
                   trust_remote_code=True, tensor_parallel_size=1)
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


def test_chat_vllm_content_format_and_mm_kwargs(llm):
    """vLLM's chat_template_content_format: text parts render as the plain string does."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    plain = _chat_prompt(llm)
    assert all(_chat_prompt(llm, parts, chat_template_content_format=f) == plain
               for f in ("auto", "string", "openai"))
    with pytest.raises(InvalidRequestError, match="chat_template_content_format"):
        _chat_prompt(llm, chat_template_content_format="json")
    with pytest.raises(InvalidRequestError, match="mm_processor_kwargs"):
        _chat_prompt(llm, mm_processor_kwargs={"num_crops": 4})


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


@pytest.mark.parametrize("ids", [np.array([1, 2, 3]), torch.tensor([1, 2, 3])],
                         ids=["numpy", "torch"])
def test_array_prompt_token_ids(llm, ids):
    out = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 2, 3] and all(type(t) is int for t in out.prompt_token_ids)
    plain = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="must be integers"):
        llm.generate({"prompt_token_ids": ids.float() if isinstance(ids, torch.Tensor)
                      else ids.astype(float)}, GREEDY, use_tqdm=False)


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


# ---- allowed_token_ids and bad_words (vLLM's), through the whole engine -----------------------

PROMPTS = [{"prompt_token_ids": [5, 17, 300, 42]}, {"prompt_token_ids": [8, 9, 10]}]


def _ids(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_allowed_token_ids_greedy_and_random_in_a_mixed_batch(llm):
    allowed = [11, 220, 1500, 30000]
    plain_greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain_random = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    alone = _ids(llm, PROMPTS * 2, [plain_greedy, plain_greedy, plain_random, plain_random])
    params = [plain_greedy, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                           allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                             allowed_token_ids=allowed), plain_random]
    got = _ids(llm, PROMPTS * 2, params)
    assert set(got[1]) <= set(allowed) and set(got[2]) <= set(allowed)
    assert not set(alone[1]) <= set(allowed)  # the mask really changed something
    assert got[0] == alone[0] and got[3] == alone[3]  # the other rows are untouched


def _round_trip_pair(tokenizer, ids: list[int]) -> tuple[int, str]:
    """A position i and the text of ids[i:i + 2] whose bad-word tokenization is exactly that pair."""
    from shardserve.engine.bad_words import bad_words_token_ids
    for i in range(len(ids) - 1):
        text = tokenizer.decode(ids[i:i + 2])
        if ids[i:i + 2] in bad_words_token_ids(tokenizer, [text], len(tokenizer)):
            return i, text
    raise AssertionError(f"no pair of {ids} round-trips")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_bad_words_ban_the_word_not_its_parts(tiny_model_dirs, async_scheduling):
    """Greedy: a two-token bad word from the model's own output is cut at its second token
    (its first one still comes out), and a row without bad words in the same batch is
    unchanged. Async scheduling (the request then waits for its previous token) agrees."""
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64,
                   kv_cache_memory_bytes=1 << 20, async_scheduling=async_scheduling)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        base = _ids(llm, PROMPTS, greedy)
        i, word = _round_trip_pair(llm.get_tokenizer(), base[0])
        banned = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, bad_words=[word])
        got = _ids(llm, PROMPTS, [banned, greedy])
        assert got[0][:i + 1] == base[0][:i + 1] and got[0][i + 1] != base[0][i + 1]
        assert got[1] == base[1]
        # Under random sampling a one-token word never comes out.
        rand = SamplingParams(temperature=1.5, seed=4, max_tokens=12, ignore_eos=True)
        drawn = _ids(llm, PROMPTS[:1], rand)[0]
        token = next(t for t in drawn if llm.get_tokenizer().encode(
            llm.get_tokenizer().decode([t]).lstrip(), add_special_tokens=False) == [t])
        word = llm.get_tokenizer().decode([token]).lstrip()
        again = _ids(llm, PROMPTS[:1], SamplingParams(temperature=1.5, seed=4, max_tokens=12,
                                                      ignore_eos=True, bad_words=[word]))[0]
        assert token not in again
        assert llm.engine.core.scheduler.kv_cache.num_free_blocks == \
            llm.config.cache_config.num_blocks
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs, param, match", [
    ({"allowed_token_ids": [3, 49152]}, "allowed_token_ids", r"\[0, 49152\)"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "at least one"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids", "non-negative"),
    ({"allowed_token_ids": "12"}, "allowed_token_ids", "list of token ids"),
    ({"bad_words": "fox"}, "bad_words", "list of strings"),
    ({"bad_words": [""]}, "bad_words", "non-empty"),
    ({"bad_words": [" "]}, "bad_words", "no tokens"),
    ({"spaces_between_special_tokens": "no"}, "spaces_between_special_tokens", "True or False"),
])
def test_allowed_token_ids_and_bad_words_refusals(llm, kwargs, param, match):
    with pytest.raises(InvalidRequestError, match=match) as err:
        llm.generate(PROMPTS, [GREEDY, SamplingParams(max_tokens=2, **kwargs)], use_tqdm=False)
    assert err.value.param == param
    # Nothing was left behind: the engine still answers, with every block free.
    assert _ids(llm, PROMPTS[:1], GREEDY)
    assert llm.engine.core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks


# ---- truncate_prompt_tokens (vLLM's): keep the prompt's last k tokens ------------------------

def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    """Text and token-id prompts alike (and chat's rendered ones) are cut from the left; the
    output is the one the kept tokens alone give, and the cut is per request."""
    ids = list(range(300, 380))  # longer than max_model_len (64)
    cut = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, truncate_prompt_tokens=5)
    short = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids[-5:]}],
                         [cut, GREEDY], use_tqdm=False)
    assert short[0].prompt_token_ids == ids[-5:]
    assert short[0].outputs[0].token_ids[:2] == short[1].outputs[0].token_ids
    text = llm.generate("one two three four five six seven", cut, use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert text.prompt_token_ids == tokenizer("one two three four five six seven")["input_ids"][-5:]
    assert text.prompt == "one two three four five six seven"  # as sent, like vLLM
    chat = llm.chat(MESSAGES, cut, use_tqdm=False)[0]
    assert len(chat.prompt_token_ids) == 5
    # -1 is max_model_len: a prompt filling the context gets its one token, as in vLLM.
    whole = llm.generate({"prompt_token_ids": ids},
                         SamplingParams(max_tokens=4, truncate_prompt_tokens=-1), use_tqdm=False)
    assert whole[0].prompt_token_ids == ids[-64:]
    assert len(whole[0].outputs[0].token_ids) == 1
    assert whole[0].outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="max_model_len") as err:
        llm.generate({"prompt_token_ids": [1, 2]},
                     SamplingParams(max_tokens=1, truncate_prompt_tokens=65), use_tqdm=False)
    assert err.value.param == "truncate_prompt_tokens"
    engine = llm.engine
    request_id = engine.add_request({"prompt_token_ids": ids}, cut)  # LLMEngine's own path
    while engine.has_unfinished_requests():
        done = [o for o in engine.step() if o.finished]
    assert done[0].request_id == request_id and done[0].prompt_token_ids == ids[-5:]
    assert engine.core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks


# ---- a vLLM script's names and arguments ---------------------------------------------------

def test_vllm_top_level_names():
    """`from vllm import LLM, SamplingParams, RequestOutput, ...` ports by renaming the package."""
    import shardserve
    from shardserve import (LLM, BeamSearchParams, CompletionOutput, PromptType,  # noqa: F401
                            RequestOutput, TextPrompt, TokensPrompt)

    assert set(shardserve.__all__) >= {"LLM", "SamplingParams", "RequestOutput",
                                       "CompletionOutput", "TextPrompt", "TokensPrompt"}
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}


def test_llm_refuses_vllm_arguments_it_cannot_honour(tiny_model_dirs):
    with pytest.raises(InvalidRequestError, match="revision") as err:
        make_llm(tiny_model_dirs["llama"], revision="main")
    assert err.value.param == "revision"


def test_generate_use_tqdm_callable_priority_and_finished(llm):
    """vLLM's use_tqdm may be the tqdm class to draw with; priority is accepted while all 0
    (vLLM's rule without its priority scheduler); CompletionOutput.finished() is a method."""
    from tqdm import tqdm

    made = []

    def bar(*args, **kwargs):
        made.append(kwargs["total"])
        return tqdm(*args, disable=True, **kwargs)

    outs = llm.generate(["hi", "yo"], GREEDY, use_tqdm=bar, priority=[0, 0])
    assert made == [2] and all(o.finished and o.outputs[0].finished() for o in outs)
    with pytest.raises(InvalidRequestError, match="priority") as err:
        llm.generate("hi", GREEDY, use_tqdm=False, priority=[1])
    assert err.value.param == "priority"


def test_reset_prefix_cache(llm):
    prompt = {"prompt_token_ids": list(range(100, 140))}  # several 16-token blocks
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_spaces_between_special_tokens(tiny_model_dirs, tmp_path):
    """vLLM's spaces_between_special_tokens with skip_special_tokens=False, through
    LLM.generate: the tokenizer here has no decoder, so its tokens are joined by spaces (as
    tokenizers does then); False drops the space before an added token that follows another.
    (SmolLM2's byte-level decoder never adds such spaces: there, as in vLLM, both read alike.)"""
    folder = tmp_path / "no_decoder"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    config = json.loads((folder / "tokenizer.json").read_text())
    config["decoder"] = None
    (folder / "tokenizer.json").write_text(json.dumps(config))
    llm = make_llm(str(folder), dtype="float32", max_model_len=64, kv_cache_memory_bytes=1 << 20)
    try:
        added = [1, 2, 3]  # <|im_start|> <|im_end|> <repo_name>: the output is only these
        texts = {}
        for spaces in (True, False):
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                    allowed_token_ids=added, skip_special_tokens=False,
                                    spaces_between_special_tokens=spaces)
            out = llm.generate("hello", params, use_tqdm=False)[0].outputs[0]
            names = llm.get_tokenizer().convert_ids_to_tokens(out.token_ids)
            texts[spaces] = out.text
            # The streaming path (LLMEngine's, as the server's): decoded token by token.
            llm.engine.add_request("hello", params)
            while llm.engine.has_unfinished_requests():
                done = [o for o in llm.engine.step() if o.finished]
            assert done[0].outputs[0].text == out.text
        assert texts[True] == "".join(" " + name for name in names)
        assert texts[False] == " " + "".join(names)
    finally:
        llm.shutdown()
