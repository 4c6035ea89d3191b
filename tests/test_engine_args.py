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
