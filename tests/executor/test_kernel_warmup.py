"""The start-up warm-up of prompt-step kernels (executor/kernel_warmup.py): its made-up steps
run through every model family's forward (dense, MoE, latent attention) and leave the KV cache
as it was. On CPU nothing is compiled (the torch reference path runs), so this checks the
steps themselves; tests/gpu and BENCHMARKS.md cover the compiles."""

from __future__ import annotations

import pytest
import torch

from shardserve.config import EngineConfig
from shardserve.executor.kernel_warmup import warm_up_step_kernels
from shardserve.executor.model_runner import ModelRunner


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from shardserve.testing import write_random_model

    root = tmp_path_factory.mktemp("warmup_models")
    return {name: str(write_random_model(root / name, architecture=arch, preset=preset, seed=3))
            for name, arch, preset in (("llama", "llama", "tiny"), ("qwen3", "qwen3", "tiny"),
                                       ("deepseek", "deepseek_v2", "tiny-deepseek-v2"))}


@pytest.mark.parametrize("name", ["llama", "qwen3", "deepseek"])
def test_warm_up_steps_run_and_write_nothing(model_dirs, name):
    config = EngineConfig.from_kwargs(model=model_dirs[name], device="cpu", dtype="float32",
                                      max_model_len=256, kv_cache_memory_bytes=1 << 20).resolve()
    runner = ModelRunner(config, torch.device("cpu"))
    runner.load_model()
    runner.init_kv_cache(8)
    for caches in runner.kv_caches:
        for cache in caches:
            cache.fill_(0.25)  # a write would show: the steps' slots are all -1
    seconds = warm_up_step_kernels(runner.model, runner.device, runner.dtype,
                                   int(config.model_config.hf_config.hidden_size),
                                   runner.block_size, 256)
    assert seconds >= 0.0
    for caches in runner.kv_caches:
        for cache in caches:
            assert torch.all(cache == 0.25)
