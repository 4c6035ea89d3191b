"""The planner's per-rank numbers against what the engine really allocates, exactly.

- Every TP rank's parameters: the model is built on the meta device under a stand-in TP group
  of each size and rank (construction does no communication), for Llama, Qwen2, Qwen3, tied
  embeddings, biases, and KV heads replicated when TP exceeds them; for DeepSeek-V2/V3 (MLA +
  MoE: float32 router, V3's routing bias, FusedMoE's expert_map) and Qwen2/Qwen3-MoE (router in
  the model dtype, Qwen2-MoE's gated shared expert, dense layers by decoder_sparse_step and
  mlp_only_layers) with and without expert parallelism.
- The real thing on CPU: the tiny models loaded by shardserve's loader through ModelRunner
  (TP 1), and by two gloo ranks (TP 2, DeepSeek also EP 2): parameter bytes, the RoPE table, KV
  bytes per block and the number of blocks.
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
from shardserve.planner.weights import kv_bytes_per_token_layer, tp_problems

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
def _stand_in_tp_group(world_size: int, rank: int,
                       expert_parallel: bool = False) -> Iterator[None]:
    """get_tp_group() (and under expert parallelism get_ep_group(), the same ranks) answers
    (world_size, rank) without torch.distributed: enough to build the sharded layers, which
    only read their rank and size."""
    group = ps.GroupCoordinator.single("tp")
    group.world_size, group.rank_in_group = world_size, rank
    saved = ps._TP, ps._EP
    ps._TP = group
    ps._EP = group if expert_parallel else None
    try:
        yield
    finally:
        ps._TP, ps._EP = saved


def _engine_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) as allocated: shared tensors (tied embeddings, the RoPE
    table every layer holds) counted once."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def _kv_bytes_per_block(model: torch.nn.Module, elem: int) -> int:
    from shardserve.executor.model_runner import ModelRunner
    from shardserve.layers.attention import AttentionLayerBase

    runner = ModelRunner.__new__(ModelRunner)  # only its KV sizing is used
    runner.block_size, runner.dtype = BLOCK_SIZE, {4: torch.float32, 2: torch.bfloat16}[elem]
    runner.kv_dtype = runner.dtype  # --kv-cache-dtype auto
    runner.attn_layers = [m for m in model.modules() if isinstance(m, AttentionLayerBase)]
    return runner.kv_bytes_per_block()


def _planner_stage(config_dict: dict, tp: int, elem: int, expert_parallel: bool = False,
                   fp8: bool = False):
    shape = load_model_shape(config_dict)
    limits = ServingLimits(max_model_len=MAX_MODEL_LEN, dtype_bytes=elem, block_size=BLOCK_SIZE,
                           expert_parallel=expert_parallel, fp8_weights=fp8)
    return shape, stage_memory(shape, tp, 1, 0, 0, shape.num_layers, limits, 80 << 30)


@pytest.mark.parametrize("variant", ["llama_bias_tied", "llama_kv1_rope_linear", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_fp8_rank_matches_the_planner(variant: str, tp: int) -> None:
    """--quantization fp8 under TP: each rank's FP8 rows and columns (replicated KV heads
    included) and their scale groups as the planner counts them."""
    from shardserve.layers.quantization import quantization_context
    from shardserve.models.llama import LlamaForCausalLM

    hf_config = _hf_config(variant)
    shape, stage = _planner_stage(hf_config.to_dict(), tp, 2, fp8=True)
    for rank in range(tp):
        with _stand_in_tp_group(tp, rank), torch.device("meta"), quantization_context("fp8"):
            model = LlamaForCausalLM(hf_config, dtype=torch.bfloat16, max_model_len=MAX_MODEL_LEN)
        params, buffers = _engine_bytes(model)
        assert params + buffers == stage.weights_bytes, (variant, tp, rank)


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


# DeepSeek (shardserve/testing_deepseek.py's tiny shapes): attention biases and MoE on every
# other layer; an expert width (30) TP 4 cannot slice but EP 4 places whole.
DEEPSEEK_VARIANTS = {
    "v2": ("deepseek_v2", {}),
    "v3": ("deepseek_v3", {}),
    "v2_bias_moe_freq2": ("deepseek_v2", {"attention_bias": True, "num_hidden_layers": 4,
                                          "moe_layer_freq": 2}),
    "v3_width30": ("deepseek_v3", {"moe_intermediate_size": 30, "n_shared_experts": 2}),
    # Under EP 2 and 4 the first ranks hold one expert more: the plan sizes every GPU for them.
    "v2_7experts": ("deepseek_v2", {"n_routed_experts": 7, "n_group": 1,
                                    "topk_method": "greedy"}),
}


def _deepseek_hf_config(variant: str):
    from transformers import AutoConfig

    from shardserve.testing_deepseek import (DEEPSEEK_ARCHITECTURES, TINY_DEEPSEEK_V2,
                                             TINY_DEEPSEEK_V3)

    model_type, overrides = DEEPSEEK_VARIANTS[variant]
    base = TINY_DEEPSEEK_V3 if model_type == "deepseek_v3" else TINY_DEEPSEEK_V2
    return AutoConfig.for_model(model_type, architectures=[DEEPSEEK_ARCHITECTURES[model_type]],
                                vocab_size=500, **{**base, **overrides})


def _check_moe_ranks(cls: type, hf_config, tp: int, expert_parallel: bool,
                     dtype: torch.dtype) -> list[str]:
    """Every TP rank of an MoE model built on the meta device allocates exactly the planner's
    weight and KV bytes; a TP size the planner refuses, the layers refuse too. Returns the
    planner's problems with the size."""
    elem = torch.tensor([], dtype=dtype).element_size()
    shape, stage = _planner_stage(hf_config.to_dict(), tp, elem, expert_parallel)
    refused = tp_problems(shape, tp, expert_parallel)
    for rank in range(tp):
        with _stand_in_tp_group(tp, rank, expert_parallel), torch.device("meta"):
            if refused:
                with pytest.raises(ValueError, match="not divisible by tensor parallel size"):
                    cls(hf_config, dtype=dtype, max_model_len=MAX_MODEL_LEN)
                continue
            model = cls(hf_config, dtype=dtype, max_model_len=MAX_MODEL_LEN)
        params, buffers = _engine_bytes(model)
        # Experts that do not divide over EP ranks: the later ranks hold one fewer each.
        fewer = expert_parallel and rank >= shape.moe.num_experts % tp > 0
        one_expert = 3 * shape.hidden_size * shape.moe.expert_intermediate_size * elem
        moe_layers = sum(map(shape.moe.is_moe_layer, range(shape.num_layers)))
        assert params + buffers == stage.weights_bytes - fewer * one_expert * moe_layers, (
            tp, expert_parallel, rank)
        assert _kv_bytes_per_block(model, elem) == stage.kv_bytes_per_block
    return refused


@pytest.mark.parametrize("variant", sorted(DEEPSEEK_VARIANTS))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_deepseek_rank_matches_the_planner(variant: str, tp: int, expert_parallel: bool,
                                                 dtype: torch.dtype) -> None:
    """Exact bytes, the float32 router (and V3's bias) in a bfloat16 model and the int64
    expert_map included; a TP size the planner refuses, the layers refuse too."""
    from shardserve.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    hf_config = _deepseek_hf_config(variant)
    cls = DeepseekV3ForCausalLM if hf_config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    refused = _check_moe_ranks(cls, hf_config, tp, expert_parallel, dtype)
    assert bool(refused) == (variant == "v3_width30" and tp == 4 and not expert_parallel)
    # MLA: one latent + RoPE key per token and layer, whole on every rank.
    elem = torch.tensor([], dtype=dtype).element_size()
    _, stage = _planner_stage(hf_config.to_dict(), tp, elem, expert_parallel)
    assert stage.kv_bytes_per_block == (BLOCK_SIZE * hf_config.num_hidden_layers
                                        * (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim)
                                        * elem)


# Qwen MoE (models/qwen_moe.py) on _BASE: 8 experts of width 32, two per token. An expert width
# (30) TP 4 cannot slice but EP 4 places whole; nor can it slice a shared expert of width 30,
# EP or not; a dense width (90) no layer builds does not matter.
_QWEN_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
QWEN_MOE_VARIANTS = {
    "qwen2_moe": ("qwen2_moe", {"shared_expert_intermediate_size": 64}),
    "qwen2_moe_step2_no_bias": ("qwen2_moe", {"decoder_sparse_step": 2, "qkv_bias": False,
                                              "shared_expert_intermediate_size": 64}),
    "qwen3_moe_dense_layer_tied": ("qwen3_moe", {"mlp_only_layers": [1],
                                                 "tie_word_embeddings": True}),
    "qwen2_moe_shared30": ("qwen2_moe", {"shared_expert_intermediate_size": 30}),
    "qwen3_moe_width30": ("qwen3_moe", {"moe_intermediate_size": 30, "intermediate_size": 90}),
}


@pytest.mark.parametrize("variant", sorted(QWEN_MOE_VARIANTS))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_qwen_moe_rank_matches_the_planner(variant: str, tp: int, expert_parallel: bool,
                                                 dtype: torch.dtype) -> None:
    """The router in the model dtype, Qwen2-MoE's shared expert and its gate, dense layers."""
    from transformers import AutoConfig

    from shardserve.models.qwen_moe import QwenMoeForCausalLM
    from shardserve.testing import QWEN_MOE_ARCHITECTURES

    model_type, overrides = QWEN_MOE_VARIANTS[variant]
    hf_config = AutoConfig.for_model(model_type, architectures=[QWEN_MOE_ARCHITECTURES[model_type]],
                                     **{**_BASE, **_QWEN_MOE, **overrides})
    refused = _check_moe_ranks(QwenMoeForCausalLM, hf_config, tp, expert_parallel, dtype)
    assert bool(refused) == (tp == 4 and (variant == "qwen2_moe_shared30" or (
        variant == "qwen3_moe_width30" and not expert_parallel)))


def _engine_config(model_dir: str, dtype: str = "float32", expert_parallel: bool = False,
                   quantization: str | None = None):
    from shardserve.config import EngineConfig

    return EngineConfig.from_kwargs(model=model_dir, device="cpu", dtype=dtype,
                                    max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                                    kv_cache_memory_bytes=4 << 20,
                                    enable_expert_parallel=expert_parallel,
                                    quantization=quantization).resolve()


def _measure(model_dir: str, dtype: str = "float32", expert_parallel: bool = False,
             quantization: str | None = None) -> dict[str, int]:
    """Load through the engine's own runner on CPU and report what it allocated."""
    from shardserve.executor.model_runner import ModelRunner
    from shardserve.layers.moe import FusedMoE

    runner = ModelRunner(_engine_config(model_dir, dtype, expert_parallel, quantization),
                         torch.device("cpu"))
    runner.load_model()
    params, buffers = _engine_bytes(runner.model)
    ep_sizes = {m.ep_size for m in runner.model.modules() if isinstance(m, FusedMoE)}
    return {"params": params, "buffers": buffers, "kv_per_block": runner.kv_bytes_per_block(),
            "num_blocks": runner.determine_num_blocks(), "ep_size": max(ep_sizes, default=1)}


@pytest.fixture(scope="module")
def tiny_moe_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random DeepSeek (their presets) and Qwen MoE (the tiny preset) folders."""
    from shardserve.testing import write_random_model

    root = tmp_path_factory.mktemp("tiny_moe")
    dirs = {arch: str(write_random_model(root / arch, preset=f"tiny-{arch}", seed=1))
            for arch in ("deepseek-v2", "deepseek-v3")}
    dirs.update({arch: str(write_random_model(root / arch, architecture=arch, seed=1))
                 for arch in ("qwen2_moe", "qwen3_moe")})
    return dirs


def _model_dir(arch: str, tiny_model_dirs: dict, tiny_moe_dirs: dict) -> str:
    return (tiny_model_dirs if arch in tiny_model_dirs else tiny_moe_dirs)[arch]


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"),
                                        ("qwen3", "float32"), ("deepseek-v2", "bfloat16"),
                                        ("deepseek-v3", "float32"), ("deepseek-v3", "bfloat16"),
                                        ("qwen2_moe", "bfloat16"), ("qwen3_moe", "float32")])
def test_loaded_model_matches_the_planner(tiny_model_dirs, tiny_moe_dirs, arch: str,
                                          dtype: str) -> None:
    model_dir = _model_dir(arch, tiny_model_dirs, tiny_moe_dirs)
    measured = _measure(model_dir, dtype)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shape, stage = _planner_stage(config, 1, 4 if dtype == "float32" else 2)
    assert measured["params"] + measured["buffers"] == stage.weights_bytes
    assert measured["kv_per_block"] == stage.kv_bytes_per_block
    assert measured["num_blocks"] == (4 << 20) // stage.kv_bytes_per_block


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2_moe", "bfloat16"),
                                        ("deepseek-v3", "bfloat16")])
def test_fp8_model_matches_the_planner(tiny_model_dirs, tiny_moe_dirs, arch: str,
                                       dtype: str) -> None:
    """--quantization fp8: the FP8 weights (one byte) and their float32 scales (buffers) of the
    Llama-family projections, dense and shared-expert MLPs; DeepSeek's latent attention and
    routed experts left in the model dtype."""
    model_dir = _model_dir(arch, tiny_model_dirs, tiny_moe_dirs)
    measured = _measure(model_dir, dtype, quantization="fp8")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    elem = 4 if dtype == "float32" else 2
    _, plain = _planner_stage(config, 1, elem)
    _, stage = _planner_stage(config, 1, elem, fp8=True)
    assert stage.weights_bytes < plain.weights_bytes
    assert measured["params"] + measured["buffers"] == stage.weights_bytes


def _tp2_rank(rank: int, model_dir: str, out_dir: str, expert_parallel: bool) -> None:
    ps.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=1,
                                 enable_expert_parallel=expert_parallel)
    try:
        measured = _measure(model_dir, expert_parallel=expert_parallel)
        measured.pop("num_blocks")
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(measured))
    finally:
        ps.destroy_model_parallel()


@pytest.mark.multiproc
@pytest.mark.parametrize("arch,expert_parallel", [("qwen3", False), ("deepseek-v2", False),
                                                  ("deepseek-v3", True)])
def test_tp2_ranks_match_the_planner(tiny_model_dirs, tiny_moe_dirs, tmp_path: Path,
                                     arch: str, expert_parallel: bool) -> None:
    from shardserve.distributed.local_launch import run_local_ranks

    model_dir = _model_dir(arch, tiny_model_dirs, tiny_moe_dirs)
    run_local_ranks(_tp2_rank, 2, args=(model_dir, str(tmp_path), expert_parallel),
                    timeout_s=120)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    _, stage = _planner_stage(config, 2, 4, expert_parallel)
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["params"] + measured["buffers"] == stage.weights_bytes
        assert measured["kv_per_block"] == stage.kv_bytes_per_block
        assert measured["ep_size"] == (2 if expert_parallel else 1)
