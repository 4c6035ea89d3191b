"""On one GPU: steps with prompt tokens replayed as CUDA graphs (executor/cuda_graph.py, mixed
ladder) give the tokens of eager steps, in float32, through prompts of many lengths, chunked
prompts beside decodes (a small token budget), prefix-cache hits and preemption. Needs CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from shardserve.testing import write_random_model
    return str(write_random_model(tmp_path_factory.mktemp("mixed"), architecture="llama",
                                  preset="tiny", seed=4, num_hidden_layers=3))


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 15, 16, 17, 47, 100, 129, 200, 333, 511, 512, 513, 700]
    prompts = [torch.randint(5, 250, (n,), generator=gen).tolist() for n in lengths]
    prompts.append(prompts[8][:100] + [7, 8, 9])  # a prefix-cache hit on an earlier prompt
    return prompts


def _run(model_dir: str, one_at_a_time: bool = False, **kwargs) -> tuple[list[list[int]], dict]:
    """Greedy tokens of every prompt, and the graph replays by kind (none when eager)."""
    from shardserve import LLM, SamplingParams
    kwargs.setdefault("kv_cache_memory_bytes", 256 << 20)  # the suite shares the GPU (-n 6)
    llm = LLM(model_dir, device="cuda", dtype="float32", max_model_len=1024,
              enable_prefix_caching=True, **kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in _prompts()]
        if one_at_a_time:  # each prompt's step alone: up to 512 tokens, a mixed graph
            outs = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
        else:  # together: the token budget chunks prompts beside other requests' decodes
            outs = llm.generate(prompts, params, use_tqdm=False)
        graphs = llm.engine.core.executor.worker.runner.graph_runner
        replays = dict(graphs.replays) if graphs is not None else {"decode": 0, "mixed": 0}
        return [o.outputs[0].token_ids for o in outs], replays
    finally:
        llm.shutdown()


@pytest.mark.parametrize("budget", [None, 96])
def test_mixed_graphs_match_eager(model_dir, budget):
    # No budget: the default (thousands of tokens) would put every prompt in one eager step.
    extra = {"max_num_batched_tokens": budget} if budget else {"one_at_a_time": True}
    eager, _ = _run(model_dir, enforce_eager=True, **extra)
    decode_only, off = _run(model_dir, mixed_cuda_graphs=False, **extra)
    mixed, on = _run(model_dir, **extra)
    assert mixed == decode_only == eager
    assert off["mixed"] == 0 and off["decode"] > 0
    assert on["mixed"] > 0 and on["decode"] > 0


def test_mixed_graphs_under_preemption(model_dir):
    """A cache too small for every request at once: requests are preempted and recomputed,
    and the recomputed prompt steps replay graphs too."""
    eager, _ = _run(model_dir, enforce_eager=True, num_gpu_blocks_override=80)
    mixed, on = _run(model_dir, num_gpu_blocks_override=80)
    assert mixed == eager and on["mixed"] > 0
