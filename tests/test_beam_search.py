"""LLM.beam_search (vLLM's) against transformers' beam search on a tiny random model, float32.

Where the two coincide: no beam finishes early (ignore_eos here; transformers without an EOS
id), so both keep, each step, the beam_width best of every beam's extensions by cumulative
logprob, and return the same sequences in the same order with the same scores."""

from __future__ import annotations

import math

import pytest
import torch

from shardserve import BeamSearchParams
from shardserve.beam_search import get_beam_search_score
from shardserve.errors import InvalidRequestError
from tests.device import make_llm

PROMPTS = [[5, 17, 300, 42, 9], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def llm(request, tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64, block_size=4,
                   kv_cache_memory_bytes=1 << 20, tensor_parallel_size=1,
                   enable_prefix_caching=request.param)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dirs):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    model.generation_config.eos_token_id = None  # no beam finishes early
    model.generation_config.pad_token_id = 0
    return model.eval()


def _hf_beams(model, prompt: list[int], width: int, steps: int):
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                         do_sample=False, max_new_tokens=steps, early_stopping=True,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def _hf_cum_logprob(model, tokens: list[int], num_prompt: int) -> float:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
    return sum(logprobs[p - 1, tokens[p]].item() for p in range(num_prompt, len(tokens)))


def _no_block_leaked(llm) -> bool:
    return llm.engine.core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks


def test_width_one_is_greedy(llm):
    from shardserve import SamplingParams
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    for prompt, g, out in zip(PROMPTS, greedy, outs):
        (seq,) = out.sequences
        assert seq.tokens == prompt + g.outputs[0].token_ids  # vLLM's: prompt tokens first
        assert seq.finish_reason == "length" and len(seq.logprobs) == 6
        # Each step's logprobs carry the tokens' text, as generate()'s (and vLLM's) do.
        tokenizer = llm.get_tokenizer()
        assert all(lp.decoded_token == tokenizer.decode([t])
                   for step in seq.logprobs for t, lp in step.items())
    assert _no_block_leaked(llm)


def test_matches_transformers_beam_search(llm, hf_model):
    width, steps = 3, 5
    stats = llm.engine.core.scheduler.kv_cache.stats
    hits_before = stats.hits
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        hf_seqs, hf_scores = _hf_beams(hf_model, prompt, width, steps)
        assert [s.tokens[len(prompt):] for s in out.sequences] == hf_seqs
        cums = [s.cum_logprob for s in out.sequences]
        assert cums == sorted(cums, reverse=True)
        for seq, hf_score in zip(out.sequences, hf_scores):
            assert math.isclose(seq.cum_logprob, hf_score, rel_tol=1e-4, abs_tol=1e-4)
            # ... and is the sequence's own logprob, summed from a fresh forward pass.
            assert math.isclose(seq.cum_logprob, _hf_cum_logprob(hf_model, seq.tokens, len(prompt)),
                                rel_tol=1e-4, abs_tol=1e-4)
            assert math.isclose(sum(step[t].logprob for step, t in zip(
                seq.logprobs, seq.tokens[len(prompt):])), seq.cum_logprob, rel_tol=1e-6)
        assert out.sequences[0].text == llm.get_tokenizer().decode(out.sequences[0].tokens)
    # Each step's prompts are the last step's plus one token: with prefix caching all but the
    # last partial block comes from the cache (the long prompt alone spans 4 blocks of 4).
    hits = stats.hits - hits_before
    assert hits >= 4 * 4 * width * (steps - 1) if llm.config.cache_config.enable_prefix_caching \
        else hits == 0
    assert _no_block_leaked(llm)


def test_eos_finishes_a_beam_and_length_penalty_ranks(llm, monkeypatch):
    """A beam that picks an EOS id is set aside as finished ("stop"), the others go on; the
    finished and live ones are ranked by vLLM's length-penalised score."""
    from shardserve import SamplingParams
    prompt = PROMPTS[0]
    first = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0.0, max_tokens=1, logprobs=4), use_tqdm=False)[0].outputs[0].logprobs[0]
    eos = sorted(first, key=lambda t: first[t].rank)[1]  # the second most likely first token
    monkeypatch.setattr(llm.engine.input_processor, "eos_token_ids", frozenset({eos}))
    for penalty in (0.0, 1.0, 3.0):
        (out,) = llm.beam_search([{"prompt_token_ids": prompt}],
                                 BeamSearchParams(beam_width=2, max_tokens=4,
                                                  length_penalty=penalty))
        stopped = [s for s in out.sequences if s.finish_reason == "stop"]
        scores = [get_beam_search_score(s.tokens, s.cum_logprob, {eos}, penalty)
                  for s in out.sequences]
        assert scores == sorted(scores, reverse=True) and len(out.sequences) == 2
        for s in stopped:
            assert s.tokens[-1] == eos and s.stop_reason == eos
        if penalty == 0.0:  # plain logprob sums: the one-token beam beats every longer one
            assert out.sequences[0].tokens == prompt + [eos]
    assert _no_block_leaked(llm)


def test_score_counts_the_prompt_and_not_a_final_eos():
    # vLLM's get_beam_search_score: 3 prompt tokens + 2 generated, the EOS not counted.
    assert get_beam_search_score([1, 2, 3, 4, 0], -8.0, {0}, 1.0) == -2.0
    assert get_beam_search_score([1, 2, 3, 4, 5, 6, 7, 8], -8.0, {0}, 1.0) == -1.0
    assert get_beam_search_score([1, 2, 3, 4, 0], -8.0, {0}, 0.0) == -8.0


def test_context_limit_ends_beams(tiny_model_dirs):
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=8,
                   kv_cache_memory_bytes=1 << 20)
    try:
        (out,) = llm.beam_search([{"prompt_token_ids": PROMPTS[0]}],
                                 BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True))
        assert all(len(s.tokens) == 8 and s.finish_reason == "length" for s in out.sequences)
        assert _no_block_leaked(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs, param", [
    ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2.0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -1.0}, "temperature"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": 1000.0}, "length_penalty"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": -1e308}, "length_penalty"),
])
def test_params_are_validated(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        BeamSearchParams(**kwargs)
    assert err.value.param == param


def test_refusals(llm):
    with pytest.raises(InvalidRequestError, match="at most 10") as err:
        llm.beam_search(["hi"], BeamSearchParams(beam_width=11, max_tokens=2))
    assert err.value.param == "beam_width"
    with pytest.raises(InvalidRequestError, match="BeamSearchParams"):
        llm.beam_search(["hi"], {"beam_width": 2, "max_tokens": 2})
    with pytest.raises(InvalidRequestError, match="LoRA"):
        llm.beam_search(["hi"], BeamSearchParams(beam_width=2, max_tokens=2), lora_request=1)
    # A plain string prompt is tokenized like generate's.
    (out,) = llm.beam_search("hi", BeamSearchParams(beam_width=2, max_tokens=2))
    assert out.sequences[0].tokens[:-2] == llm.get_tokenizer().encode("hi")
