"""DeepSeek-V2/V3 through the whole engine (LLM.generate, float32, CPU): greedy tokens identical
to transformers' own greedy decoding, with prefix caching and chunked prefill, and the logprobs
of the chosen tokens equal to transformers' log-softmax to 1e-4 relative.

SHARDSERVE_TEST_DEVICE=cuda runs the engine on the GPU instead (Triton MLA decode and fused MoE,
CUDA graphs for decode), against the same CPU float32 reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shardserve import LLM, SamplingParams
from tests.device import TEST_DEVICE
from tests.e2e.hf_reference import hf_greedy, hf_logits
from tests.models.deepseek_checkpoints import VOCAB, save_tiny_deepseek

NEW_TOKENS = 8
# Blocks of 8 tokens and a 16-token step budget: prompts are chunked, decodes ride along with
# prefill chunks (mixed steps), and the second pass hits the prefix cache.
ENGINE_KWARGS = dict(device=TEST_DEVICE, dtype="float32", max_model_len=128, block_size=8,
                     max_num_batched_tokens=16, enable_prefix_caching=True)


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(20)]
    out = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 30)]
    return out + [shared + [rng.randrange(VOCAB) for _ in range(4)],
                  shared + [rng.randrange(VOCAB) for _ in range(13)]]


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_engine_greedy_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = save_tiny_deepseek(name, tmp_path, with_tokenizer=True)
    batch = prompts(len(name))
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in batch]
    llm = LLM(str(tmp_path), **ENGINE_KWARGS)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for attempt in range(2):  # the second pass finds every full prompt block cached
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, attempt
    assert llm.engine.core.scheduler.kv_cache.stats.hits > 0
    for prompt, out in zip(batch, outs):
        comp = out.outputs[0]
        ref = torch.log_softmax(hf_logits(hf, prompt + comp.token_ids[:-1]), dim=-1)
        got = torch.tensor([entry[tok].logprob for tok, entry in zip(comp.token_ids, comp.logprobs)])
        want = ref[len(prompt) - 1:, :].gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        assert ((got - want).abs().max() / ref.abs().max()).item() < 1e-4
