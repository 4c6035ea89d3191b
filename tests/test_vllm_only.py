"""vLLM-only engine arguments through EngineConfig.from_kwargs: accepted, ignored aloud or
refused saying why; compilation_config's CUDA-graph keys honoured."""

from __future__ import annotations

import pytest

from shardserve.config import EngineConfig
from shardserve.errors import InvalidRequestError


def test_vllm_only_engine_arguments(caplog):
    """What ported vLLM scripts pass to LLM(...): at vLLM's default it is accepted silently,
    a tuning knob shardserve lacks is ignored with a warning, and anything that would change
    the results is an InvalidRequestError saying why, not a TypeError."""
    with caplog.at_level("WARNING", logger="shardserve.vllm_only"):
        EngineConfig.from_kwargs(download_dir=None, revision=None, tokenizer_mode="auto",
                                 swap_space=4, disable_log_stats=True, enable_lora=False,
                                 distributed_executor_backend="mp")
        assert not caplog.records
        EngineConfig.from_kwargs(swap_space=16, download_dir="/models", compilation_config=3)
    warned = caplog.text
    assert "swap_space=16" in warned and "download_dir" in warned and "compilation_config" in warned
    for kwargs in ({"revision": "main"}, {"enable_lora": True}, {"tokenizer_mode": "mistral"},
                   {"speculative_config": {"method": "ngram"}}, {"cpu_offload_gb": 4}):
        name = next(iter(kwargs))
        with pytest.raises(InvalidRequestError, match=f"{name}=.*vLLM engine argument") as err:
            EngineConfig.from_kwargs(**kwargs)
        assert err.value.param == name
    # Still a TypeError for a name neither has, with the nearest one when it is a typo.
    with pytest.raises(TypeError, match=r"max_model_length \(did you mean max_model_len\?\)"):
        EngineConfig.from_kwargs(max_model_length=64)


@pytest.mark.parametrize("value,expected", [
    ({"cudagraph_mode": "FULL_DECODE_ONLY"}, {"mixed_cuda_graphs": False}),
    ({"cudagraph_mode": "none"}, {"enforce_eager": True}),
    ('{"cudagraph_mode": "FULL_AND_PIECEWISE", "max_cudagraph_capture_size": 256}',
     {"max_cuda_graph_batch_size": 256}),
    ({"cudagraph_capture_sizes": [1, 2, 4, 64], "level": 3}, {"max_cuda_graph_batch_size": 64}),
])
def test_compilation_configs_cuda_graph_keys_are_honoured(value, expected, caplog):
    """vLLM's compilation_config: its CUDA-graph keys become the settings that mean the same
    here (an explicit engine argument wins), the torch.compile ones are ignored aloud."""
    with caplog.at_level("WARNING", logger="shardserve.vllm_only"):
        config = EngineConfig.from_kwargs(compilation_config=value)
    mc = config.model_config
    got = {k: getattr(mc, k) for k in ("mixed_cuda_graphs", "enforce_eager",
                                       "max_cuda_graph_batch_size")}
    defaults = {"mixed_cuda_graphs": True, "enforce_eager": False,
                "max_cuda_graph_batch_size": 512}
    assert got == {**defaults, **expected}
    assert ("level" in caplog.text) == ("level" in str(value))
    explicit = EngineConfig.from_kwargs(compilation_config={"cudagraph_mode": "NONE"},
                                        enforce_eager=False)
    assert explicit.model_config.enforce_eager is False
    with pytest.raises(InvalidRequestError, match="cudagraph_mode='SOMETIMES': use one of"):
        EngineConfig.from_kwargs(compilation_config={"cudagraph_mode": "SOMETIMES"})
