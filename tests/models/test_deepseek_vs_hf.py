"""Our DeepSeek-V2/V3 against transformers' own DeepseekV2/V3ForCausalLM on the same tiny random
float32 checkpoints: whole-sequence logits, the paged latent cache step by step (chunked
prefill over a cached prefix, mixed prefill + decode, decode), FP8 block-quantized loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardserve.layers.attention import AttentionLayerBase, TorchAttentionBackend
from shardserve.layers.mla_attention import MLAAttention
from shardserve.models.deepseek_memory import deepseek_memory
from tests.models.deepseek_checkpoints import (TINY_DEEPSEEK, VOCAB, paged_references, paged_steps,
                                              save_tiny_deepseek)
from tests.models.tiny_checkpoints import (assert_close_logits, hf_logits, load_ours, our_logits,
                                          write_fp8_twins)

@pytest.mark.parametrize("name", sorted(TINY_DEEPSEEK))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf = save_tiny_deepseek(name, tmp_path)
    ours = load_ours(tmp_path)
    input_ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    assert_close_logits(our_logits(ours, input_ids), hf_logits(hf, input_ids))


@pytest.mark.parametrize("name", ["v2_lite", "v3"])
def test_paged_latent_cache_matches_transformers(name: str, tmp_path: Path) -> None:
    """Chunked prefill over a cached prefix (decompressed path), a mixed prefill + decode step
    and a decode-only step (absorbed path) over the paged latent cache; see paged_steps."""
    hf = save_tiny_deepseek(name, tmp_path)
    model = load_ours(tmp_path)
    layers = [m for m in model.modules() if isinstance(m, AttentionLayerBase)]
    assert layers and all(isinstance(m, MLAAttention) for m in layers)
    # One latent row of kv_lora_rank + rope dims per token: no per-head K/V.
    assert layers[0].kv_cache_shapes(12, 4) == [(12, 4, 32 + 8)]
    for got, want in zip(paged_steps(model, TorchAttentionBackend), paged_references(hf)):
        assert_close_logits(got, want)


def test_fp8_block_quantized_checkpoint_is_dequantized(tmp_path: Path) -> None:
    """An FP8 copy of the V3 checkpoint (blocks of 16 x 16, so edges are partial) loads to the
    same model as its dequantized float32 twin, under TP-style slicing too."""
    src, fp8_dir, deq_dir = tmp_path / "src", tmp_path / "fp8", tmp_path / "deq"
    save_tiny_deepseek("v3", src)
    write_fp8_twins(src, fp8_dir, deq_dir, (16, 16))
    input_ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(2))
    ours_fp8, ours_deq = load_ours(fp8_dir), load_ours(deq_dir)
    for (n1, p1), (n2, p2) in zip(ours_fp8.named_parameters(), ours_deq.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(our_logits(ours_fp8, input_ids), our_logits(ours_deq, input_ids))
    # An expert-parallel rank skips the other rank's experts, their scales with them (a scale
    # left without its weight would be an unpaired tensor).
    from tests.test_planner_vs_engine import _stand_in_tp_group
    with _stand_in_tp_group(2, 1, expert_parallel=True):
        ep_fp8, ep_deq = load_ours(fp8_dir), load_ours(deq_dir)
    moe = ep_fp8.model.layers[1].mlp.experts
    assert moe.expert_start == 4
    assert torch.equal(moe.w13_weight, ep_deq.model.layers[1].mlp.experts.w13_weight)
    assert torch.equal(moe.w13_weight, ours_deq.model.layers[1].mlp.experts.w13_weight[4:])


def test_memory_hook_counts_our_parameters(tmp_path: Path) -> None:
    """deepseek_memory's weight bytes are the bytes of the parameters we allocate (float32 here,
    the router float32 anyway), and its KV bytes what the MLA layers declare."""
    save_tiny_deepseek("v3", tmp_path)
    model = load_ours(tmp_path)
    mem = deepseek_memory(model.config, tp_size=1, dtype_bytes=4)
    assert mem.weight_bytes_per_rank == sum(p.numel() * p.element_size()
                                            for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    assert mem.kv_bytes_per_token == sum(s[-1] * 4 for m in layers for s in m.kv_cache_shapes(1, 1))
    # MHA would cache 4 heads x (16 + 8 + 12) = 144 values per layer against 40.
    assert mem.mha_kv_bytes_per_token * 40 == mem.kv_bytes_per_token * 144


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-deepseek-v3"])
def test_random_model_presets_load_in_both(preset: str, tmp_path: Path) -> None:
    """write_random_model's DeepSeek folders hold exactly the tensors transformers expects, and
    we serve them with its logits."""
    from transformers import AutoModelForCausalLM

    from shardserve.testing import write_random_model

    folder = write_random_model(tmp_path, preset=preset, seed=3)
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    output_loading_info=True)
    assert not any(info.values()), info
    input_ids = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(6))
    assert_close_logits(our_logits(load_ours(folder), input_ids), hf_logits(hf.eval(), input_ids))


def test_v2_lite_preset_shape() -> None:
    """The benchmark preset is DeepSeek-V2-Lite's shape: 15.7B parameters, 2.4B active."""
    from shardserve.testing import PRESETS

    mem = deepseek_memory(dict(PRESETS["deepseek-v2-lite"].config, model_type="deepseek_v2"))
    assert round(mem.total_params / 1e9, 1) == 15.7
    assert 2.3e9 < mem.active_params_per_token < 2.5e9  # 2.45B with lm_head
    # 27 layers x (512 + 64) x 2 bytes, against 27 x 16 x (192 + 128) x 2 for MHA.
    assert mem.kv_bytes_per_token == 31104 and mem.mha_kv_bytes_per_token == 276480


def test_moe_layer_placement() -> None:
    """DeepSeek's rule: dense before first_k_dense_replace, then MoE every moe_layer_freq-th
    layer (transformers' V2/V3 know no moe_layer_freq; every released config sets it to 1)."""
    from shardserve.models.deepseek_memory import is_moe_layer

    config = {"n_routed_experts": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert [is_moe_layer(config, i) for i in range(6)] == [False, False, True, False, True, False]
