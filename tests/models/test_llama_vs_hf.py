"""Our Llama/Qwen2/Qwen3 against transformers on the same tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.models.tiny_checkpoints import (TINY_CONFIGS, VOCAB, assert_close_logits, hf_logits, load_ours,
                              our_logits, save_tiny_checkpoint, tiny_config, write_fp8_twins)

from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.models.registry import SUPPORTED_ARCHITECTURES, check_architecture, get_model_class


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf = save_tiny_checkpoint(name, tmp_path)
    ours = load_ours(tmp_path)
    input_ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    assert_close_logits(our_logits(ours, input_ids), hf_logits(hf, input_ids))


def test_architecture_flags_shape_the_model(tmp_path: Path) -> None:
    qwen2 = load_ours(_saved("qwen2", tmp_path / "q2"))
    attn = qwen2.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight  # tied
    qwen3 = load_ours(_saved("qwen3", tmp_path / "q3"))
    attn3 = qwen3.model.layers[0].self_attn
    assert attn3.head_dim == 32 and attn3.qk_norm and attn3.qkv_proj.bias is None
    assert qwen3.lm_head.weight is not qwen3.model.embed_tokens.weight


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = save_tiny_checkpoint("llama", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    input_ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(2))
    assert_close_logits(our_logits(load_ours(tmp_path), input_ids), hf_logits(hf, input_ids))


def test_missing_weight_is_named(tmp_path: Path) -> None:
    save_tiny_checkpoint("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        load_ours(tmp_path)


def test_unsupported_architecture_lists_supported() -> None:
    config = tiny_config("llama")
    config.architectures = ["MixtralForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM.*LlamaForCausalLM"):
        check_architecture(config)
    with pytest.raises(UnsupportedModelError):
        get_model_class("GPT2LMHeadModel")
    config.architectures = ["Qwen3ForCausalLM"]
    assert check_architecture(config) == "Qwen3ForCausalLM"
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                            "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
                                            "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
                                            "DeepseekV3ForCausalLM"}


def test_half_precision_close_to_transformers(tmp_path: Path) -> None:
    hf = save_tiny_checkpoint("qwen3", tmp_path).to(torch.bfloat16)
    ours = load_ours(tmp_path, dtype="bfloat16")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    input_ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, input_ids)
    # Same ops in the same dtype; only attention kernels may differ, so a loose bound.
    assert ((our_logits(ours, input_ids) - ref).abs().max() / ref.abs().max()).item() < 2e-2


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_fp8_block_quantized_checkpoint_is_dequantized(name: str, tmp_path: Path) -> None:
    """Qwen3-*-FP8's format (FP8 weights with block scales, quant_method 'fp8'): loaded as the
    dequantized float32 twin, not as FP8 values without their scales."""
    src, fp8_dir, deq_dir = tmp_path / "src", tmp_path / "fp8", tmp_path / "deq"
    save_tiny_checkpoint(name, src)
    write_fp8_twins(src, fp8_dir, deq_dir, (16, 16))
    ours_fp8, ours_deq = load_ours(fp8_dir), load_ours(deq_dir)
    for (n1, p1), (n2, p2) in zip(ours_fp8.named_parameters(), ours_deq.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("config_json, match", [
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}},
     r"quantization_config.*'awq'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "desc_act": False}},
     r"quantization_config.*'gptq'"),
    ({"quantization_config": {"quant_method": "compressed-tensors"}},
     r"quantization_config.*'compressed-tensors'"),
    ({"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8,
                       "original_max_position_embeddings": 64}}, r"'longrope'.*rope_scaling"),
    # transformers' Llama rotates whole heads whatever partial_rotary_factor says.
    ({"rope_theta": 10000.0, "partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5"),
])
def test_unsupported_config_refused_when_resolved(config_json: dict, match: str,
                                                  tmp_path: Path) -> None:
    """Quantized checkpoints we have no kernels for and RoPE scalings we do not implement are
    refused when the config is read, naming the field (never loaded as plain weights)."""
    from shardserve.config import EngineConfig

    save_tiny_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **config_json}))
    with pytest.raises(UnsupportedModelError, match=match):
        EngineConfig.from_kwargs(model=str(tmp_path), dtype="float32", device="cpu").resolve()


def test_mistral_window_shorter_than_max_model_len_is_refused(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Past its sliding_window Mistral's attention is not full attention: refused, saying which
    max_model_len serves it (at most the window)."""
    from shardserve.config import EngineConfig
    from shardserve.loader.model_loader import load_model

    # The window is max_position_embeddings wide: going past it needs the long-context opt-in.
    monkeypatch.setenv("SHARDSERVE_ALLOW_LONG_MAX_MODEL_LEN", "1")
    save_tiny_checkpoint("mistral_window", tmp_path)
    config = EngineConfig.from_kwargs(model=str(tmp_path), dtype="float32", device="cpu",
                                      max_model_len=129).resolve()
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=128.*max_model_len.*128"):
        load_model(config.model_config, "cpu")


def test_sliding_window_layers_are_served_within_the_window(tmp_path: Path) -> None:
    """Qwen2 with use_sliding_window windows the layers past max_window_layers: up to
    max_model_len = sliding_window that is full attention, served with transformers' logits;
    past it refused, saying which max_model_len serves it."""
    from transformers import AutoModelForCausalLM

    from shardserve.config import EngineConfig
    from shardserve.loader.model_loader import load_model

    save_tiny_checkpoint("qwen2", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()

    def ours(max_model_len: int) -> torch.nn.Module:
        resolved = EngineConfig.from_kwargs(model=str(tmp_path), dtype="float32", device="cpu",
                                            max_model_len=max_model_len).resolve()
        return load_model(resolved.model_config, "cpu")

    input_ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(4))
    assert_close_logits(our_logits(ours(16), input_ids), hf_logits(hf, input_ids))
    with pytest.raises(UnsupportedModelError,
                       match=r"sliding_window=16, from layer_types.*max_model_len.*at most 16"):
        ours(17)


@pytest.mark.parametrize("rope_scaling", [
    {"type": "yarn", "factor": 4.0},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_top_level_original_max_position_embeddings_wins(rope_scaling: dict,
                                                         tmp_path: Path) -> None:
    """A config.json with original_max_position_embeddings beside rope_scaling (Phi-3 style):
    transformers' YaRN takes the top-level value, over rope_scaling's own or, where that is
    missing, the max_position_embeddings its loaded config fills in."""
    from transformers import AutoModelForCausalLM

    save_tiny_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, original_max_position_embeddings=8,
                  rope_scaling=rope_scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    input_ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(5))
    assert_close_logits(our_logits(load_ours(tmp_path), input_ids), hf_logits(hf, input_ids))


def test_dynamic_rope_past_max_position_warns(tmp_path: Path, caplog) -> None:
    """Dynamic NTK prompts longer than max_position_embeddings are rotated per position, unlike
    transformers (one base for the whole prompt): served, but not silently."""
    from shardserve.config import EngineConfig

    save_tiny_checkpoint("llama_rope_dynamic", tmp_path)
    for max_model_len, warned in ((128, False), (256, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="shardserve.config"):
            EngineConfig.from_kwargs(model=str(tmp_path), dtype="float32", device="cpu",
                                     max_model_len=max_model_len).resolve()
        assert any("Dynamic NTK" in r.getMessage() for r in caplog.records) == warned


def _saved(name: str, folder: Path) -> Path:
    folder.mkdir()
    save_tiny_checkpoint(name, folder)
    json.loads((folder / "config.json").read_text())  # a readable config was written
    return folder
