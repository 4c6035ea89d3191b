"""Qwen2-MoE through the engine's multi-process executor on two gloo ranks, under tensor
parallelism (experts and the shared expert sliced) and expert parallelism (four whole experts
per rank, the shared expert still sliced): transformers' greedy tokens, as on one process
(test_qwen_moe.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.e2e.hf_reference import hf_greedy
from tests.models.deepseek_checkpoints import copy_tokenizer
from tests.models.tiny_checkpoints import VOCAB, save_tiny_checkpoint

pytestmark = pytest.mark.multiproc

ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=96, block_size=8,
                     max_num_batched_tokens=16, enable_prefix_caching=True)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_engine_tp2_greedy_matches_transformers(expert_parallel: bool, tmp_path: Path) -> None:
    from shardserve import LLM, SamplingParams

    hf = save_tiny_checkpoint("qwen2_moe", tmp_path)
    copy_tokenizer(tmp_path)
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 21, 12)]
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              **ENGINE_KWARGS)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()
