"""Bad input gets a typed error naming what to change; the same LLM then serves the next
request, and no KV block stays allocated."""

from __future__ import annotations

from tests.device import make_llm
import pytest

from shardserve import SamplingParams
from shardserve.errors import (CacheTooSmallError, ContextLengthError, InvalidRequestError,
                               ModelLoadError, UnsupportedModelError)


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64)


def assert_clean_and_serving(llm):
    sched = llm.engine.core.scheduler
    assert sched.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
    assert not sched.has_unfinished_requests()
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -3}, "top_k"),
    ({"n": 0}, "n"),
    # Wrong types pass the range checks; each must fail here, not inside a step.
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "3"}, "max_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"logprobs": True}, "logprobs"),
    ({"prompt_logprobs": 0.5}, "prompt_logprobs"),
    ({"min_tokens": None}, "min_tokens"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 5]}, "stop"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"stop": ["x"], "detokenize": False}, "stop"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 2**63 - 1, "n": 2}, "seed"),  # the second sample's seed would overflow
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncate_prompt_tokens": 2.0}, "truncate_prompt_tokens"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_integer_like_sampling_params_are_plain_ints():
    np = pytest.importorskip("numpy")
    params = SamplingParams(n=np.int64(2), max_tokens=np.int32(5), seed=np.int64(3), top_k=None,
                            stop_token_ids=[np.int64(7)])
    assert (params.n, params.max_tokens, params.seed, params.top_k) == (2, 5, 3, 0)
    assert all(type(v) is int for v in (params.n, params.max_tokens, params.seed,
                                        *params.stop_token_ids))


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ContextLengthError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": list(range(100))}],
                     SamplingParams(max_tokens=4), use_tqdm=False)
    assert_clean_and_serving(llm)


def test_bad_token_ids_and_empty_prompt(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        llm.generate(12345, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [True, 3]}, use_tqdm=False)
    assert_clean_and_serving(llm)


def test_sampling_params_of_the_wrong_type(llm):
    prompt = {"prompt_token_ids": [1, 2, 3]}
    for bad in ({"max_tokens": 3}, "greedy", 0.5, [SamplingParams(), {"max_tokens": 2}]):
        prompts = [prompt] * (len(bad) if isinstance(bad, list) else 1)
        with pytest.raises(InvalidRequestError, match="SamplingParams") as err:
            llm.generate(prompts, bad, use_tqdm=False)
        assert err.value.param == "sampling_params"
    with pytest.raises(InvalidRequestError, match="3 sampling params for 2 prompts"):
        llm.generate([prompt] * 2, [SamplingParams()] * 3, use_tqdm=False)


def test_error_mid_generation_frees_blocks(llm, monkeypatch):
    runner = llm.engine.core.executor.worker.runner
    calls = {"n": 0}
    real = runner._execute  # under both execute_model and (CUDA, async scheduling) _async

    def flaky(out, defer):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(out, defer)

    monkeypatch.setattr(runner, "_execute", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([{"prompt_token_ids": [4, 5, 6]}] * 3, SamplingParams(max_tokens=8), use_tqdm=False)
    monkeypatch.setattr(runner, "_execute", real)
    assert_clean_and_serving(llm)


def test_chat_role_that_openai_refuses(llm):
    good = {"role": "user", "content": "hi"}
    with pytest.raises(InvalidRequestError, match="'wizard'.*system, developer, user") as err:
        llm.chat([[good], [good, {"role": "wizard", "content": "abracadabra"}]],
                 SamplingParams(max_tokens=2), use_tqdm=False)
    assert err.value.param == "messages[1].role"
    assert_clean_and_serving(llm)


def test_missing_path_and_no_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        make_llm(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="holds no model"):
        make_llm(str(tmp_path))


def test_unsupported_architecture(tmp_path, tiny_model_dirs):
    import json
    import shutil
    path = tmp_path / "gpt"
    shutil.copytree(tiny_model_dirs["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        make_llm(str(path))


def test_cache_too_small_says_how_much_is_needed(tiny_model_dirs):
    with pytest.raises(CacheTooSmallError, match="MiB"):
        make_llm(tiny_model_dirs["llama"], max_model_len=2048, kv_cache_memory_bytes=1 << 16)


def test_non_finite_and_out_of_range_fields(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=2**64)
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3, 4]}],
                     [SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, stop_token_ids=[10**9])],
                     use_tqdm=False)
    assert_clean_and_serving(llm)
