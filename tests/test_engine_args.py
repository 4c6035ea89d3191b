"""Engine flags: --async-scheduling is a tri-state (unset: decided at start-up from the device
and the layout), and resolve() turns it on for CUDA without pipeline parallelism only."""

from __future__ import annotations

import argparse

import pytest

from shardserve.config import EngineConfig
from shardserve.engine_args import add_engine_args


@pytest.mark.parametrize("argv,expected", [
    ([], None), (["--async-scheduling"], True), (["--async-scheduling", "false"], False),
    (["--no-async-scheduling"], False),
])
def test_async_scheduling_flag(argv, expected):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(argv).async_scheduling is expected


@pytest.mark.parametrize("kwargs,expected", [
    ({}, False),  # CPU: lock-step unless asked
    ({"async_scheduling": True}, True),
    ({"async_scheduling": True, "pipeline_parallel_size": 2}, False),  # micro-batches instead
])
def test_async_scheduling_resolves(tiny_model_dirs, kwargs, expected):
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu", **kwargs)
    assert config.resolve().scheduler_config.async_scheduling is expected


def test_tensor_parallel_size_that_does_not_split_the_model_is_refused_at_once(tmp_path):
    """SmolLM2-135M has 9 heads over 3 KV heads: TP 2 is refused while resolving the config,
    before any worker process starts, naming the sizes that fit."""
    import time

    from shardserve import LLM
    from shardserve.errors import InvalidRequestError

    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"9 attention heads .*Sizes that fit: 1, 3\.") as err:
        LLM(None, tensor_parallel_size=2, device="cpu", dtype="float32")
    assert err.value.param == "tensor_parallel_size"
    assert time.monotonic() - start < 30


def test_layer_partition_without_pipeline_stages_is_refused():
    from shardserve import LLM
    from shardserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="pipeline_parallel_size is 1") as err:
        LLM(None, pp_layer_partition="10,20", device="cpu", dtype="float32")
    assert err.value.param == "pp_layer_partition"


def test_kv_cache_dtype_flag_takes_vllm_names():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).kv_cache_dtype == "auto"
    assert parser.parse_args(["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_fp8_kv_cache_is_refused_for_latent_attention(tmp_path):
    """DeepSeek's MLA caches one compressed latent per token, which the fp8 path does not cover:
    refused while resolving, naming the setting."""
    from shardserve.errors import InvalidRequestError
    from tests.models.deepseek_checkpoints import save_tiny_deepseek

    save_tiny_deepseek("v2_lite", tmp_path, with_tokenizer=True)
    config = EngineConfig.from_kwargs(model=str(tmp_path), device="cpu", kv_cache_dtype="fp8")
    with pytest.raises(InvalidRequestError, match="multi-head latent") as err:
        config.resolve()
    assert err.value.param == "kv_cache_dtype"
