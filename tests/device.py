"""Where the engine under test runs: CPU by default; SHARDSERVE_TEST_DEVICE=cuda runs the same
end-to-end tests on a GPU (the transformers reference stays on the CPU in float32)."""

import os

TEST_DEVICE = os.environ.get("SHARDSERVE_TEST_DEVICE", "cpu")

# The KV cache of a test engine on a GPU. Tests keep several engines alive in one process, and
# pytest-xdist runs several processes on one GPU: an engine sizing its cache from
# gpu_memory_utilization (0.9 of the GPU) would starve the next one.
GPU_TEST_KV_CACHE_BYTES = 256 << 20


def skip_unless_enough_gpus(ranks_per_node: int) -> None:
    """A layout test on CUDA needs a GPU per rank; on a smaller machine it is skipped (its
    logic runs on CPU with gloo in the default run)."""
    import pytest
    import torch

    if torch.cuda.device_count() < ranks_per_node:
        pytest.skip(f"needs {ranks_per_node} GPUs, {torch.cuda.device_count()} visible")


def make_llm(*args, **kwargs):
    """LLM on the test device, with a small fixed KV cache there."""
    from shardserve import LLM

    kwargs.setdefault("device", TEST_DEVICE)
    if kwargs["device"] == "cuda":
        skip_unless_enough_gpus(kwargs.get("tensor_parallel_size", 1)
                                * kwargs.get("pipeline_parallel_size", 1))
        if "num_gpu_blocks_override" not in kwargs:
            kwargs.setdefault("kv_cache_memory_bytes", GPU_TEST_KV_CACHE_BYTES)
    return LLM(*args, **kwargs)


def cli_device_flags() -> list[str]:
    """The same choices for a `shardserve` command run by a test."""
    flags = ["--device", TEST_DEVICE]
    if TEST_DEVICE == "cuda":
        flags += ["--kv-cache-memory", f"{GPU_TEST_KV_CACHE_BYTES >> 20}MiB"]
    return flags
