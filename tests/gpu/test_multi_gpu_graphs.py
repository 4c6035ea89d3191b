"""On two GPUs: CUDA graphs under NCCL (tensor parallelism) and per pipeline stage give the
tokens eager mode gives, and both match one GPU; async scheduling included (the default on
CUDA for TP, lock-step for PP). Needs two CUDA GPUs; skipped otherwise."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

PROMPTS = [[5, 17, 300, 42, 9, 1200, 77], [8, 9], list(range(100, 160)), [3] * 20]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from shardserve.testing import write_random_model
    # float32 weights, 4 layers: every layout gives the same greedy tokens.
    return str(write_random_model(tmp_path_factory.mktemp("mgpu"), architecture="llama",
                                  preset="tiny", seed=2, num_hidden_layers=4))


def _tokens(model_dir: str, **kwargs) -> tuple[list[list[int]], dict]:
    from shardserve import LLM, SamplingParams
    llm = LLM(model_dir, device="cuda", dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=64 << 20, **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
        core = llm.engine.core
        info = {"async": core.async_scheduling, "overlapped": core.num_overlapped_steps}
        return [o.outputs[0].token_ids for o in outs], info
    finally:
        llm.shutdown()


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2},
                                    {"pipeline_parallel_size": 2}])
def test_graphs_match_eager_and_one_gpu(model_dir, layout):
    one_gpu, _ = _tokens(model_dir)
    eager, _ = _tokens(model_dir, enforce_eager=True, **layout)
    graphs, info = _tokens(model_dir, **layout)
    print(f"\n{layout}: {info}")
    assert graphs == eager == one_gpu


@pytest.fixture(scope="module")
def uneven_vocab_dir(tmp_path_factory):
    from shardserve.testing import write_random_model
    # 4100 tokens pad to 4224 at TP 2: shards of 2112 columns, 2112 and 1988 of them real, so
    # the ranks' sampling keys must still have one shape (kernels/sampling.py).
    return str(write_random_model(tmp_path_factory.mktemp("uneven"), architecture="llama",
                                  preset="tiny", seed=5, num_hidden_layers=2, vocab_size=4100))


def test_tp2_samples_from_unevenly_padded_vocabulary_shards(uneven_vocab_dir):
    """Greedy and plain temperature batches under TP 2 are sampled from the vocabulary shards
    (layers/sampler.py) with the shards' last columns padding: greedy tokens are one GPU's,
    temperature draws stay inside the vocabulary, and both ranks took the same path."""
    from shardserve import LLM, SamplingParams
    one_gpu, _ = _tokens(uneven_vocab_dir)
    llm = LLM(uneven_vocab_dir, device="cuda", dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2)
    try:
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                                      ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in greedy] == one_gpu
        drawn = llm.generate(prompts, SamplingParams(temperature=0.9, max_tokens=24,
                                                     ignore_eos=True), use_tqdm=False)
        assert all(0 <= t < 4100 for o in drawn for t in o.outputs[0].token_ids)
        counts = llm.engine.core.executor.collective_rpc("sampling_counts")
        assert counts[0] == counts[1] and counts[0]["from_shards"] > 0, counts
    finally:
        llm.shutdown()
