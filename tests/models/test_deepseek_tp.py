"""DeepSeek under tensor parallelism (experts sliced by TP) and expert parallelism (whole
experts per rank, 4 + 3 of seven) on two gloo ranks: the single-process logits, and through the
engine's multi-process executor the single-process greedy tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shardserve.distributed import parallel_state as ps
from shardserve.distributed.local_launch import run_local_ranks
from tests.models.deepseek_checkpoints import VOCAB, save_tiny_deepseek
from tests.models.tiny_checkpoints import assert_close_logits, load_ours, our_logits

pytestmark = pytest.mark.multiproc

MODELS = ["v2_group", "v3", "v2_lite_7experts"]
MODES = ["tp", "ep"]


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(4))


def _worker(rank: int, root: str) -> None:
    for mode in MODES:
        ps.initialize_model_parallel(2, 1, enable_expert_parallel=mode == "ep")
        for name in MODELS:
            model = load_ours(Path(root) / name)
            experts = model.model.layers[1].mlp.experts
            num = experts.num_experts
            if mode == "ep":  # 8 experts, 4 whole ones per rank; 7: 4 on rank 0, 3 on rank 1
                assert experts.w13_weight.shape == ((4, 3)[rank] if num == 7 else 4, 32, 64)
                assert experts.expert_start == 4 * rank
            else:  # all experts, half of the 16 intermediate rows each
                assert experts.w13_weight.shape == (num, 16, 64)
            assert model.model.layers[0].self_attn.num_heads == 2
            torch.save(our_logits(model, _input_ids()), Path(root) / f"{name}.{mode}{rank}.pt")
        ps.destroy_model_parallel()


def test_tp2_and_ep2_match_one_process(tmp_path: Path) -> None:
    for name in MODELS:
        save_tiny_deepseek(name, tmp_path / name)
    run_local_ranks(_worker, 2, args=(str(tmp_path),), timeout_s=240)
    for name in MODELS:
        reference = our_logits(load_ours(tmp_path / name), _input_ids())
        for mode in MODES:
            for rank in (0, 1):
                assert_close_logits(torch.load(tmp_path / f"{name}.{mode}{rank}.pt"), reference)


ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=96, block_size=8,
                     max_num_batched_tokens=16, enable_prefix_caching=True)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_engine_tp2_greedy_matches_one_process(expert_parallel: bool, tmp_path: Path) -> None:
    from shardserve import LLM, SamplingParams

    save_tiny_deepseek("v3", tmp_path, with_tokenizer=True)
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 21, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def generate(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    expected = generate(LLM(str(tmp_path), **ENGINE_KWARGS))
    llm = LLM(str(tmp_path), tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              **ENGINE_KWARGS)
    try:
        assert generate(llm) == expected
    finally:
        llm.shutdown()
