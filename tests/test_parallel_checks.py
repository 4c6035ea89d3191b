"""parallel_checks.py: a layout that cannot run is refused by resolve(), before any worker
starts. (The TP and PP sizes against the model are checked through the engine arguments, in
tests/test_engine_args.py.)"""

from __future__ import annotations

import pytest

from shardserve.config import EngineConfig
from shardserve.errors import InvalidRequestError


def test_more_local_ranks_than_visible_gpus_is_refused_before_any_worker(tiny_model_dirs,
                                                                          monkeypatch):
    """TP 2 on one GPU: a clear error at resolve, not rank 1 dying on 'invalid device ordinal'.
    The GPU count is faked, so this runs on CPU-only machines too."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cuda",
                                      tensor_parallel_size=2)
    with pytest.raises(InvalidRequestError, match=r"tensor_parallel_size=2 x pipeline_parallel_"
                       r"size=1 puts 2 ranks on this node, one GPU each, but 1 GPU is visible "
                       r"\(CUDA_VISIBLE_DEVICES=3\)") as err:
        config.resolve()
    assert err.value.param == "tensor_parallel_size"
    # Over two nodes, each holds half the ranks: one GPU apiece is enough.
    two_nodes = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cuda",
                                         tensor_parallel_size=2, nnodes=2, master_port=29511)
    assert two_nodes.resolve().parallel_config.num_local_ranks == 1
