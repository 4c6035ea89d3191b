"""Where the engine under test runs: CPU by default; SHARDSERVE_TEST_DEVICE=cuda runs the same
end-to-end tests on a GPU (the transformers reference stays on the CPU in float32)."""

import os

TEST_DEVICE = os.environ.get("SHARDSERVE_TEST_DEVICE", "cpu")


def make_llm(*args, **kwargs):
    """LLM on the test device. Tests keep several engines alive in one process; on a GPU each
    would otherwise size its KV cache from gpu_memory_utilization and starve the next one."""
    from shardserve import LLM

    kwargs.setdefault("device", TEST_DEVICE)
    if kwargs["device"] == "cuda" and "num_gpu_blocks_override" not in kwargs:
        kwargs.setdefault("kv_cache_memory_bytes", 256 << 20)
    return LLM(*args, **kwargs)
