"""Our Llama/Qwen2/Qwen3 against transformers on the same tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.models.tiny_checkpoints import (TINY_CONFIGS, VOCAB, assert_close_logits, hf_logits, load_ours,
                              our_logits, save_tiny_checkpoint, tiny_config)

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
    config.architectures = ["MistralForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*LlamaForCausalLM"):
        check_architecture(config)
    with pytest.raises(UnsupportedModelError):
        get_model_class("GPT2LMHeadModel")
    config.architectures = ["Qwen3ForCausalLM"]
    assert check_architecture(config) == "Qwen3ForCausalLM"
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "Qwen2ForCausalLM",
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


def _saved(name: str, folder: Path) -> Path:
    folder.mkdir()
    save_tiny_checkpoint(name, folder)
    json.loads((folder / "config.json").read_text())  # a readable config was written
    return folder
