"""The layout the dashboard draws: which rank, node and device holds which layers."""

from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.dashboard.layout import parallel_layout


def _config(model: str, **kwargs) -> EngineConfig:
    config = EngineConfig.from_kwargs(model=model, device="cpu", **kwargs).resolve()
    config.device_config.device = "cuda"  # only the labels change; nothing touches a GPU
    return config


def test_tp2_pp2_on_one_node(tiny_model_dirs):
    config = _config(tiny_model_dirs["llama"], tensor_parallel_size=2, pipeline_parallel_size=2)
    layout = parallel_layout(config, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert (layout["tp"], layout["pp"], layout["dp"], layout["world_size"]) == (2, 2, 1, 4)
    first, last = layout["stages"]
    assert first["embedding"] and not first["lm_head"] and last["lm_head"]
    assert first["layers"][0] == 0 and first["layers"][1] == last["layers"][0]
    assert last["layers"][1] == layout["num_layers"]
    ranks = [r for s in layout["stages"] for r in s["ranks"]]
    assert [(r["rank"], r["tp_rank"], r["device"], r["host_gpu"]) for r in ranks] == [
        (0, 0, "cuda:0", "4"), (1, 1, "cuda:1", "5"), (2, 0, "cuda:2", "6"), (3, 1, "cuda:3", "7")]
    assert [r["rank"] for r in ranks if r["driver"]] == [2]  # TP rank 0 of the last stage


def test_two_nodes_and_an_explicit_partition(tiny_model_dirs):
    config = _config(tiny_model_dirs["llama"], tensor_parallel_size=2, pipeline_parallel_size=2,
                     nnodes=2, node_rank=0, pp_layer_partition="1,1")
    layout = parallel_layout(config, {})
    assert layout["nnodes"] == 2
    assert [s["layers"] for s in layout["stages"]] == [[0, 1], [1, 2]]
    nodes = [(r["rank"], r["node"], r["device"]) for s in layout["stages"] for r in s["ranks"]]
    assert nodes == [(0, 0, "cuda:0"), (1, 0, "cuda:1"), (2, 1, "cuda:0"), (3, 1, "cuda:1")]
