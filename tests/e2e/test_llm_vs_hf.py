"""Greedy output token-identical to transformers (float32, CPU) for a batch of mixed-length
prompts served together, under prefix caching on/off, chunked prefill and forced preemption."""

from __future__ import annotations

from tests.device import make_llm
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardserve import SamplingParams
from tests.e2e.hf_reference import hf_greedy, hf_logits

NEW_TOKENS = 12


def make_prompts(seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 17, 40, 9, 33, 1, 64]
    shared = [rng.randrange(vocab) for _ in range(20)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    # Two prompts sharing a 20-token prefix exercise prefix-cache hits within one batch.
    prompts += [shared + [rng.randrange(vocab) for _ in range(5)],
                shared + [rng.randrange(vocab) for _ in range(11)]]
    return prompts


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    refs = {}
    for arch, path in tiny_model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = make_prompts(hash(arch) % 1000, 2000)
        refs[arch] = (model, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
    return refs


ENGINE_VARIANTS = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_small_budget": {"max_num_batched_tokens": 16},
    # 20 blocks of 8 tokens: room for max_model_len once, so the batch must preempt.
    "preemption": {"num_gpu_blocks_override": 20, "block_size": 8, "max_num_batched_tokens": 32},
    # Two steps in flight, each step's tokens fed to the next on the device (on by default on
    # a GPU; forced here so CPU runs cover it), alone and with preemption and small chunks.
    "async": {"async_scheduling": True},
    "async_preemption_chunked": {"async_scheduling": True, "num_gpu_blocks_override": 20,
                                 "block_size": 8, "max_num_batched_tokens": 32},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(tiny_model_dirs, references, arch, variant):
    model, prompts, expected = references[arch]
    llm = make_llm(tiny_model_dirs[arch], dtype="float32", max_model_len=128,
              **ENGINE_VARIANTS[variant])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    if "preemption" in variant:
        assert llm.engine.core.scheduler.num_preemptions > 0
    if "async" in variant:  # the steps really overlapped: tokens came from the device
        assert llm.engine.core.executor.worker.runner.num_placeholder_tokens > 0
    scheduler = llm.engine.core.scheduler
    assert scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks


def test_logprobs_and_prompt_logprobs_match_log_softmax(tiny_model_dirs, references):
    model, prompts, expected = references["llama"]
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=128)
    prompt = prompts[2]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    comp = out.outputs[0]
    full = prompt + comp.token_ids
    ref = torch.log_softmax(hf_logits(model, full), dim=-1)
    # Generated tokens: position len(prompt)-1+i predicts token i.
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[tok].rank == 1
        assert entry[tok].logprob == pytest.approx(row[tok].item(), rel=1e-4, abs=1e-5)
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(entry)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        assert entry[tok].logprob == pytest.approx(ref[pos - 1, tok].item(), rel=1e-4, abs=1e-5)
        # Random tiny models have near-uniform logits: float noise may reorder near-ties.
        assert abs(entry[tok].rank - (int((ref[pos - 1] > ref[pos - 1, tok]).sum()) + 1)) <= 3


@pytest.mark.parametrize("variant", ["preemption", "async_preemption_chunked"])
def test_prompt_logprobs_once_per_position_under_preemption(tiny_model_dirs, references, variant):
    """A preempted request recomputes its prompt; its prompt logprobs must not repeat."""
    model, prompts, expected = references["llama"]
    llm = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=128,
                   **ENGINE_VARIANTS[variant])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for out, prompt, tokens in zip(outs, prompts, expected):
        assert out.outputs[0].token_ids == tokens
        assert len(out.prompt_logprobs) == len(prompt)
        ref = torch.log_softmax(hf_logits(model, prompt), dim=-1)
        for pos in range(1, len(prompt)):
            entry = out.prompt_logprobs[pos][prompt[pos]]
            assert entry.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), rel=1e-4,
                                                  abs=1e-5)


def test_prompt_logits_within_1e4(tiny_model_dirs, references):
    """The engine's logits for every prompt position agree with transformers to 1e-4."""
    from shardserve.forward_context import set_forward_context
    model, prompts, _ = references["qwen3"]
    llm = make_llm(tiny_model_dirs["qwen3"], dtype="float32", max_model_len=128)
    ours = llm.engine.core.executor.worker.runner.model
    prompt = prompts[4]
    with torch.inference_mode(), set_forward_context(None):
        dev = next(ours.parameters()).device
        hidden = ours(torch.tensor(prompt, device=dev), torch.arange(len(prompt), device=dev))
        logits = ours.compute_logits(hidden).cpu()
    ref = hf_logits(model, prompt)
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4


@pytest.mark.parametrize("variant", ["default", "chunked_small_budget", "async"])
def test_prompt_filling_the_context(tmp_path_factory, variant):
    """vLLM's offline rule: a prompt of exactly max_model_len tokens is taken and gets one
    token, finish_reason "length" (transformers' greedy one); a longer one is refused. The
    model's max_position_embeddings is max_model_len here, so the RoPE table ends at the last
    prompt position. Its blocks are exactly max_model_len / block_size (none past the context),
    on a first run and on a prefix-cache hit, and all come back."""
    from shardserve.errors import ContextLengthError
    from shardserve.testing import write_random_model

    folder = str(write_random_model(tmp_path_factory.mktemp("ctx64") / "m", preset="tiny",
                                    seed=3, max_position_embeddings=64))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = random.Random(5)
    full = [rng.randrange(2000) for _ in range(64)]
    prompts = [full, full, full[:63] + [7]]  # the second hits the cache; the third shares 56
    llm = make_llm(folder, dtype="float32", block_size=8, **ENGINE_VARIANTS[variant])
    try:
        assert llm.config.model_config.max_model_len == 64
        kv_cache = llm.engine.core.scheduler.kv_cache
        most_blocks = []
        allocate = kv_cache.allocate_slots

        def counting_allocate(request, *args, **kwargs):
            new = allocate(request, *args, **kwargs)
            most_blocks.append(len(kv_cache.req_to_blocks.get(request.request_id, [])))
            return new

        kv_cache.allocate_slots = counting_allocate
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        for prompt in prompts:  # one at a time, so that the second finds the first's blocks
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            assert out.outputs[0].token_ids == hf_greedy(model, prompt, 1)
            assert out.outputs[0].finish_reason == "length"
        assert max(most_blocks) == 8
        assert kv_cache.stats.hits >= 56
        assert kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
        with pytest.raises(ContextLengthError, match="65 input tokens"):
            llm.generate({"prompt_token_ids": full + [1]}, params, use_tqdm=False)
        assert kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
    finally:
        llm.shutdown()
