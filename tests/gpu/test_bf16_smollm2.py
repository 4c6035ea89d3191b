"""On the GPU in bf16: SmolLM2 through shardserve and through transformers (same weights, same
GPU) give the same greedy 32-token continuations for at least 90% of 64 prompts.

Served one request at a time with prefix caching off, so that every matrix product has the
shape transformers' one-prompt loop gives it and what is compared is the arithmetic (the Triton
kernels round where transformers rounds; tests/kernels/test_bf16_rounding.py). The same prompts
served as one batch are measured too and printed beside transformers' own batched generate():
batching changes the rounding of the matrix products in both (tests/e2e/bf16_agreement.py).
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.bf16_agreement import (chat_prompts, first_divergence, hf_batched_greedy,
                                      hf_bf16_smollm2)

pytestmark = pytest.mark.gpu

NUM_PROMPTS, NEW_TOKENS = 64, 32


@pytest.fixture(scope="module")
def bf16_llm(smollm2_gguf):
    from shardserve import LLM
    return LLM(smollm2_gguf, device="cuda", dtype="bfloat16", max_model_len=1024,
               gpu_memory_utilization=0.1, enable_prefix_caching=False)


def test_bf16_smoke_sensible_answers(bf16_llm):
    from shardserve import SamplingParams
    outs = bf16_llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                          [{"role": "user", "content": "Name three colors."}]],
                         SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    print("bf16 answers:", texts)
    assert "Paris" in texts[0]
    assert sum(c in texts[1].lower() for c in ("red", "blue", "green", "yellow")) >= 2


@pytest.mark.xfail(strict=False, reason=(
    "issue 3's open target: 34/64 measured on an H200 (2026-11-28), 28/64 at e3aa137 (2026-11-30, "
    "BENCHMARKS.md), 64/64 in float32 (the test below); cuBLAS "
    "picks other GEMM kernels for fused than for separate projections, and SmolLM2's top "
    "bf16 logits often tie; transformers' own batched generate() agrees with its "
    "one-at-a-time loop on 23/64"))
def test_bf16_greedy_agrees_with_transformers(smollm2_gguf, bf16_llm):
    from shardserve import SamplingParams
    from tests.e2e.hf_reference import hf_greedy

    llm = bf16_llm
    prompts = chat_prompts(llm.get_tokenizer(), NUM_PROMPTS)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    one_at_a_time = [
        llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
        for p in prompts]
    batched = [o.outputs[0].token_ids for o in
               llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    ref_model = hf_bf16_smollm2(smollm2_gguf, "cuda")
    refs = [hf_greedy(ref_model, p, NEW_TOKENS) for p in prompts]
    hf_batched = hf_batched_greedy(ref_model, prompts, NEW_TOKENS)

    def agree(outs):
        return sum(o == r for o, r in zip(outs, refs))

    same = agree(one_at_a_time)
    print(f"bf16 greedy agreement, one request at a time: {same}/{len(prompts)}; first "
          f"divergences {[first_divergence(o, r) for o, r in zip(one_at_a_time, refs)]}")
    print(f"batched: shardserve {agree(batched)}/{len(prompts)}, transformers' own batched "
          f"generate() {agree(hf_batched)}/{len(prompts)} (against its one-at-a-time loop)")
    assert same >= 0.9 * len(prompts)


def test_float32_greedy_agrees_with_transformers_on_the_gpu(smollm2_gguf):
    """The same 64 prompts in float32, both on the GPU (Triton kernels, CUDA graphs, batched):
    without bf16's ties, every continuation must match transformers'. This is what the bf16
    check above would show if rounding did not decide ties."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardserve import LLM, SamplingParams
    from tests.e2e.hf_reference import hf_greedy

    llm = LLM(smollm2_gguf, device="cuda", dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=256 << 20, enable_prefix_caching=False)
    try:
        prompts = chat_prompts(llm.get_tokenizer(), NUM_PROMPTS)
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = [o.outputs[0].token_ids for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    finally:
        llm.shutdown()
    folder, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = model.to("cuda").eval()
    refs = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    same = sum(o == r for o, r in zip(outs, refs))
    print(f"float32 greedy agreement on the GPU, batched: {same}/{len(prompts)}; first "
          f"divergences {[first_divergence(o, r) for o, r in zip(outs, refs)]}")
    assert same >= 0.9 * len(prompts)
