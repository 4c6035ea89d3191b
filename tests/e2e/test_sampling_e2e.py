"""Sampling through the whole engine: seeds, stops, n > 1, penalties, min_tokens."""

from __future__ import annotations

from tests.device import make_llm
import pytest
import torch

from shardserve import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=256)


PROMPT = {"prompt_token_ids": [5, 17, 300, 42, 9, 1200, 77]}


def test_seeded_sampling_is_the_same_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [i + 3, i + 40, 7]} for i in range(5)]
    mixed = llm.generate(others[:2] + [PROMPT] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 2
                         + [params]
                         + [SamplingParams(temperature=0.7, max_tokens=9, seed=9, ignore_eos=True)] * 3,
                         use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    different = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                    seed=4321, ignore_eos=True), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone


def test_unseeded_sampling_depends_on_the_engine_seed_alone(tiny_model_dirs):
    """Rows without a seed draw from the engine's own generator, seeded with LLM(seed=...): an
    in-process engine shares the process with its caller (and with other engines), whose
    draws from torch's default generator must not change what it samples."""
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    engines = [make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64, seed=seed)
               for seed in (5, 5, 6)]
    first = engines[0].generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    torch.rand(1000)
    again = engines[1].generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == first
    assert engines[2].generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids != first


def test_n_gives_n_distinct_samples(llm):
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7,
                                              ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_token_ids_and_stop_strings(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    base = llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                              stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # A stop string taken from the middle of the greedy text is cut from the output.
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                  stop=[stop]), use_tqdm=False)[0].outputs[0]
        assert out.text == text[:text.index(stop)]
        assert out.finish_reason == "stop" and out.stop_reason == stop
    assert llm.engine.core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks


def test_stop_token_adds_no_text_unless_included(llm):
    """As in vLLM: the EOS or stop_token_ids token that ends a request stays in token_ids,
    but its text is in the output only with include_stop_str_in_output."""
    tok = llm.get_tokenizer()
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[3]
    cut = base.token_ids[:base.token_ids.index(stop_id) + 1]
    eos = next(iter(llm.engine.input_processor.eos_token_ids))
    for stop, bias in ((stop_id, None), (eos, {eos: 100.0})):  # a stop token; a forced EOS
        for include in (False, True):
            out = llm.generate(PROMPT, SamplingParams(
                temperature=0.0, max_tokens=8, stop_token_ids=[stop], logit_bias=bias,
                skip_special_tokens=False, include_stop_str_in_output=include),
                use_tqdm=False)[0].outputs[0]
            ids = cut if stop == stop_id else [eos]
            assert out.token_ids == ids and out.finish_reason == "stop"
            assert out.text == tok.decode(ids if include else ids[:-1], skip_special_tokens=False)


def test_detokenize_false_gives_ids_only(llm):
    params = dict(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    text = llm.generate(PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    ids = llm.generate(PROMPT, SamplingParams(**params, detokenize=False), use_tqdm=False)[0]
    assert text.outputs[0].text and ids.outputs[0].text == ""
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    assert all(lp.decoded_token is None for entry in ids.outputs[0].logprobs + ids.prompt_logprobs[1:]
               for lp in entry.values())


def test_stop_string_not_matched_within_min_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    base = llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0]
    stop = base.text[:4]  # in the first tokens' text: min_tokens must skip it
    assert stop.strip()
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                              stop=[stop], min_tokens=6), use_tqdm=False)[0].outputs[0]
    later = base.text.find(stop, len(llm.get_tokenizer().decode(base.token_ids[:6])) - len(stop) + 1)
    assert len(out.token_ids) >= 6
    assert out.text == (base.text if later == -1 else base.text[:later])


def test_min_tokens_suppresses_eos_and_max_tokens_bounds(llm):
    eos = next(iter(llm.engine.input_processor.eos_token_ids))
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10,
                                              stop_token_ids=[eos]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and eos not in out.token_ids
    assert out.finish_reason == "length"


def test_penalties_change_greedy_output(llm):
    plain = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    penal = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                frequency_penalty=2.0, repetition_penalty=1.5),
                         use_tqdm=False)[0].outputs[0].token_ids
    if len(set(plain)) < len(plain):  # repeats in plain greedy: penalties must reduce them
        assert len(set(penal)) > len(set(plain))
    assert penal != plain or len(set(plain)) == len(plain)


def test_logit_bias_bans_forces_and_is_per_request(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = llm.generate(PROMPT, greedy, use_tqdm=False)[0].outputs[0].token_ids
    banned_params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                   logit_bias={plain[0]: -100.0})
    forced_params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=5,
                                   logit_bias={123: 100.0})
    # In one batch with an unbiased request: each row gets only its own bias.
    outs = llm.generate([PROMPT] * 3, [banned_params, forced_params, greedy], use_tqdm=False)
    banned, forced, again = (o.outputs[0].token_ids for o in outs)
    assert banned[0] != plain[0] and plain[0] not in banned
    assert forced == [123] * 6
    assert again == plain
    with pytest.raises(Exception, match="logit_bias"):
        llm.generate(PROMPT, SamplingParams(logit_bias={10**7: 1.0}), use_tqdm=False)


def test_prompt_logprobs_once_with_n_samples(llm):
    """n > 1 samples share one prompt: one prompt logprob per prompt token, not one per sample."""
    tokens = PROMPT["prompt_token_ids"]
    one = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1),
                       use_tqdm=False)[0].prompt_logprobs
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=2,
                                              prompt_logprobs=1), use_tqdm=False)[0]
    assert len(one) == len(out.prompt_logprobs) == len(tokens)
    assert out.prompt_logprobs[0] is None
    for entry, alone, token in zip(out.prompt_logprobs[1:], one[1:], tokens[1:]):
        assert token in entry
        assert entry[token].logprob == pytest.approx(alone[token].logprob, abs=1e-4)
