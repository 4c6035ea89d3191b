"""A tiny checkpoint through the whole engine (LLM.generate, float32) against transformers:
greedy tokens identical to transformers' own greedy decoding, with prefix caching and chunked
prefill, and the logprobs of the chosen tokens equal to its log-softmax to 1e-4 relative.

SHARDSERVE_TEST_DEVICE=cuda runs the engine on the GPU instead, against the same CPU float32
reference."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from shardserve import LLM, SamplingParams
from tests.device import TEST_DEVICE
from tests.e2e.hf_reference import hf_greedy, hf_logits

NEW_TOKENS = 8
# Blocks of 8 tokens and a 16-token step budget: prompts are chunked, decodes ride along with
# prefill chunks (mixed steps), and the second pass hits the prefix cache.
ENGINE_KWARGS = dict(device=TEST_DEVICE, dtype="float32", max_model_len=128, block_size=8,
                     max_num_batched_tokens=16, enable_prefix_caching=True)


def prompts(seed: int, vocab: int) -> list[list[int]]:
    """Prompts of 1, 9 and 30 tokens, and two sharing a 20-token prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(20)]
    out = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 9, 30)]
    return out + [shared + [rng.randrange(vocab) for _ in range(4)],
                  shared + [rng.randrange(vocab) for _ in range(13)]]


def assert_engine_matches_transformers(hf: Any, folder: Path, seed: int, vocab: int,
                                       **llm_kwargs: Any) -> None:
    """`folder` (hf's checkpoint and a tokenizer, or a GGUF file of it and llm_kwargs' tokenizer)
    served by the engine: twice the same greedy tokens as hf (the second pass finds every full
    prompt block cached) and hf's logprobs."""
    batch = prompts(seed, vocab)
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in batch]
    llm = LLM(str(folder), **ENGINE_KWARGS, **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for attempt in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, attempt
    assert llm.engine.core.scheduler.kv_cache.stats.hits > 0
    for prompt, out in zip(batch, outs):
        comp = out.outputs[0]
        ref = torch.log_softmax(hf_logits(hf, prompt + comp.token_ids[:-1]), dim=-1)
        got = torch.tensor([entry[tok].logprob for tok, entry in zip(comp.token_ids, comp.logprobs)])
        want = ref[len(prompt) - 1:, :].gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        assert ((got - want).abs().max() / ref.abs().max()).item() < 1e-4
