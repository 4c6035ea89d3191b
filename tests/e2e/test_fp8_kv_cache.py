"""--kv-cache-dtype fp8 end to end on the CPU (the torch attention path; the Triton kernels'
fp8 reads and writes are tested in tests/kernels): one byte per cached element, so the same
memory holds four times the float32 blocks, and SmolLM2 still answers and scores its prompt
nearly as it does with a float32 cache. fp8 is unscaled (vLLM's default scale of 1.0), so it
is not token-identical to transformers, and no test claims it is."""

from __future__ import annotations

import pytest

from shardserve import LLM, SamplingParams
from shardserve.errors import InvalidRequestError

TEXT = ("The history of the city goes back more than two thousand years. It began as a small "
        "fishing village on the banks of a wide river, grew into a market town in the middle "
        "ages, and became one of the great ports of the world when ships began to cross the "
        "ocean. Today it is known for its museums, its parks and its food, and millions of "
        "visitors come every year to walk along the old harbour and the narrow streets.")


@pytest.fixture(scope="module")
def fp8_llm(smollm2_gguf):
    # A quarter of the float32 session engine's (smollm2_llm) 256 MiB: the same block count.
    return LLM(smollm2_gguf, dtype="float32", max_model_len=1024,
               kv_cache_memory_bytes=64 << 20, kv_cache_dtype="fp8")


def test_fp8_cache_holds_four_times_the_float32_blocks(fp8_llm, smollm2_llm):
    import torch
    assert fp8_llm.config.cache_config.num_blocks == smollm2_llm.config.cache_config.num_blocks
    runner = fp8_llm.engine.core.executor.worker.runner
    assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn


def test_fp8_cache_still_answers(fp8_llm):
    out = fp8_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def _prompt_scores(llm):
    out = llm.generate(TEXT, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    actual, top1 = [], []
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        actual.append(entry[ids[pos]].logprob)
        top1.append(next(t for t, lp in entry.items() if lp.rank == 1))
    return actual, top1


def test_fp8_cache_scores_the_prompt_close_to_float32(fp8_llm, smollm2_llm):
    """Per prompt position: the most likely next token mostly agrees, and the log-probability
    of the text's own next token moves little on average (e4m3 keeps 3 mantissa bits of K and
    V; e5m2, with 2, measured 94% and 0.14 here, and goes through the same code)."""
    ref_lp, ref_top = _prompt_scores(smollm2_llm)
    lp, top = _prompt_scores(fp8_llm)
    agree = sum(a == b for a, b in zip(ref_top, top)) / len(top)
    mean_shift = sum(abs(a - b) for a, b in zip(ref_lp, lp)) / len(lp)
    print(f"fp8: top-1 agreement {agree:.0%}, mean "
          f"|logprob shift| {mean_shift:.3f} over {len(lp)} positions")
    assert agree >= 0.85
    assert mean_shift < 0.25
    assert lp != ref_lp  # the cache really is rounded


def test_bad_kv_cache_dtype_is_refused(smollm2_gguf):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of"):
        LLM(smollm2_gguf, dtype="float32", kv_cache_dtype="int4")


def test_tp2_fp8_cache_matches_one_process(tiny_model_dirs):
    """Under tensor parallelism each rank keeps its own KV heads in fp8 (so twice the blocks
    per rank in the same memory), and greedy outputs equal one process's with the same cache
    dtype."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(100 + i, 130 + 5 * i))} for i in range(3)]
    outs, blocks = {}, {}
    for tp in (1, 2):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", tensor_parallel_size=tp,
                  kv_cache_dtype="fp8", kv_cache_memory_bytes=8 << 20)
        outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        blocks[tp] = llm.config.cache_config.num_blocks
        llm.shutdown()
    assert outs[2] == outs[1]
    assert blocks[2] == 2 * blocks[1]
