"""The planner's per-rank numbers against what the engine really allocates, exactly.

- Every TP rank's parameters: the model is built on the meta device under a stand-in TP group
  of each size and rank (construction does no communication), for Llama, Qwen2, Qwen3, tied
  embeddings, biases, and KV heads replicated when TP exceeds them.
- The real thing on CPU: the tiny models loaded by shardserve's loader through ModelRunner
  (TP 1), and by two gloo ranks (TP 2): parameter bytes, the RoPE table and KV bytes per block.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from shardserve.distributed import parallel_state as ps
from shardserve.planner.memory import ServingLimits, rope_table_bytes, stage_memory
from shardserve.planner.shape import load_model_shape
from shardserve.planner.weights import kv_bytes_per_token_layer

MAX_MODEL_LEN = 256
BLOCK_SIZE = 16

_BASE = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5)
VARIANTS = {
    "llama": ("llama", {}),
    "llama_bias_tied": ("llama", {"attention_bias": True, "mlp_bias": True,
                                  "tie_word_embeddings": True}),
    "llama_kv1_rope_linear": ("llama", {"num_key_value_heads": 1,
                                        "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3_vocab_odd": ("qwen3", {"head_dim": 16, "vocab_size": 1001}),
}


def _hf_config(variant: str):
    from transformers import AutoConfig

    arch, overrides = VARIANTS[variant]
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    return AutoConfig.for_model(arch, architectures=[names[arch]], **{**_BASE, **overrides})


@contextmanager
def _stand_in_tp_group(world_size: int, rank: int) -> Iterator[None]:
    """get_tp_group() answers (world_size, rank) without torch.distributed: enough to build
    the sharded layers, which only read their rank and size."""
    group = ps.GroupCoordinator.single("tp")
    group.world_size, group.rank_in_group = world_size, rank
    saved = ps._TP
    ps._TP = group
    try:
        yield
    finally:
        ps._TP = saved


def _engine_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) as allocated: shared tensors (tied embeddings, the RoPE
    table every layer holds) counted once."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def _kv_bytes_per_block(model: torch.nn.Module, elem: int) -> int:
    from shardserve.executor.model_runner import ModelRunner
    from shardserve.layers.attention import Attention

    runner = ModelRunner.__new__(ModelRunner)  # only its KV sizing is used
    runner.block_size, runner.dtype = BLOCK_SIZE, {4: torch.float32, 2: torch.bfloat16}[elem]
    runner.kv_dtype = runner.dtype  # --kv-cache-dtype auto
    runner.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    return runner.kv_bytes_per_block()


def _planner_stage(config_dict: dict, tp: int, elem: int):
    shape = load_model_shape(config_dict)
    limits = ServingLimits(max_model_len=MAX_MODEL_LEN, dtype_bytes=elem, block_size=BLOCK_SIZE)
    return shape, stage_memory(shape, tp, 1, 0, 0, shape.num_layers, limits, 80 << 30)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rank_matches_the_planner(variant: str, tp: int, dtype: torch.dtype) -> None:
    from shardserve.models.llama import LlamaForCausalLM

    hf_config = _hf_config(variant)
    elem = torch.tensor([], dtype=dtype).element_size()
    shape, stage = _planner_stage(hf_config.to_dict(), tp, elem)
    for rank in range(tp):
        with _stand_in_tp_group(tp, rank), torch.device("meta"):
            model = LlamaForCausalLM(hf_config, dtype=dtype, max_model_len=MAX_MODEL_LEN)
        params, buffers = _engine_bytes(model)
        assert buffers == rope_table_bytes(shape, MAX_MODEL_LEN)
        assert params + buffers == stage.weights_bytes, (variant, tp, rank)
        assert _kv_bytes_per_block(model, elem) == stage.kv_bytes_per_block
        assert stage.kv_bytes_per_block == BLOCK_SIZE * shape.num_layers * kv_bytes_per_token_layer(
            shape, tp, elem)


def _engine_config(model_dir: str):
    from shardserve.config import EngineConfig

    return EngineConfig.from_kwargs(model=model_dir, device="cpu", dtype="float32",
                                    max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                                    kv_cache_memory_bytes=4 << 20).resolve()


def _measure(model_dir: str) -> dict[str, int]:
    """Load through the engine's own runner on CPU and report what it allocated."""
    from shardserve.executor.model_runner import ModelRunner

    runner = ModelRunner(_engine_config(model_dir), torch.device("cpu"))
    runner.load_model()
    params, buffers = _engine_bytes(runner.model)
    return {"params": params, "buffers": buffers, "kv_per_block": runner.kv_bytes_per_block(),
            "num_blocks": runner.determine_num_blocks()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_loaded_model_matches_the_planner(tiny_model_dirs, arch: str) -> None:
    measured = _measure(tiny_model_dirs[arch])
    config = json.loads((Path(tiny_model_dirs[arch]) / "config.json").read_text())
    shape, stage = _planner_stage(config, 1, 4)
    assert measured["params"] + measured["buffers"] == stage.weights_bytes
    assert measured["kv_per_block"] == stage.kv_bytes_per_block
    assert measured["num_blocks"] == (4 << 20) // stage.kv_bytes_per_block


def _tp2_rank(rank: int, model_dir: str, out_dir: str) -> None:
    ps.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=1)
    try:
        measured = _measure(model_dir)
        measured.pop("num_blocks")
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(measured))
    finally:
        ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_ranks_match_the_planner(tiny_model_dirs, tmp_path: Path) -> None:
    from shardserve.distributed.local_launch import run_local_ranks

    model_dir = tiny_model_dirs["qwen3"]
    run_local_ranks(_tp2_rank, 2, args=(model_dir, str(tmp_path)), timeout_s=120)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    _, stage = _planner_stage(config, 2, 4)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["params"] + measured["buffers"] == stage.weights_bytes
        assert measured["kv_per_block"] == stage.kv_bytes_per_block
