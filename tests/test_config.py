"""EngineConfig.from_kwargs: engine arguments of the wrong type are named up front."""

from __future__ import annotations

import pytest

from shardserve.config import EngineConfig
from shardserve.errors import InvalidRequestError


@pytest.mark.parametrize("kwargs,param", [
    ({"max_model_len": 2.5}, "max_model_len"),
    ({"block_size": "16"}, "block_size"),
    ({"max_num_seqs": True}, "max_num_seqs"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching"),
    ({"gpu_memory_utilization": "0.5"}, "gpu_memory_utilization"),
    ({"tensor_parallel_size": "two"}, "tensor_parallel_size"),
])
def test_wrong_types_are_named(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as err:
        EngineConfig.from_kwargs(**kwargs)
    assert err.value.param == param


def test_right_types_pass():
    config = EngineConfig.from_kwargs(max_model_len=None, block_size=8, gpu_memory_utilization=1,
                                      enable_prefix_caching=False, tensor_parallel_size="auto",
                                      async_scheduling=None)
    assert config.cache_config.block_size == 8 and config.cache_config.gpu_memory_utilization == 1
    assert config.parallel_config.tensor_parallel_size == "auto"
