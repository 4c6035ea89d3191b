"""Qwen2-MoE and Qwen3-MoE against transformers' own Qwen2MoeForCausalLM / Qwen3MoeForCausalLM
on tiny random float32 checkpoints (tests/models/tiny_checkpoints.py; their whole-sequence
logits are checked with the dense models in test_llama_vs_hf.py): which layers are sparse, the
engine's greedy tokens and logprobs with prefix caching and chunked prefill, stacked-expert
checkpoints, and write_random_model's folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shardserve.errors import UnsupportedModelError
from shardserve.layers.moe import FusedMoE
from shardserve.models.llama import LlamaMLP
from shardserve.models.qwen_moe import QwenMoeBlock, is_qwen_moe_layer
from tests.models.deepseek_checkpoints import copy_tokenizer
from tests.models.engine_reference import assert_engine_matches_transformers
from tests.models.tiny_checkpoints import (VOCAB, assert_close_logits, hf_logits, load_ours,
                                           our_logits, save_tiny_checkpoint, tiny_config)


def _sparse_layers(hf) -> list[bool]:
    return [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]


@pytest.mark.parametrize("name,sparse", [
    ("qwen2_moe", [True, True, True]),
    ("qwen2_moe_step2", [False, True, False, True]),      # decoder_sparse_step=2
    ("qwen3_moe_dense_layers", [False, True, False]),    # mlp_only_layers=[0, 2]
])
def test_sparse_layers_are_transformers(name: str, sparse: list[bool], tmp_path: Path) -> None:
    hf = save_tiny_checkpoint(name, tmp_path)
    ours = load_ours(tmp_path)
    assert _sparse_layers(hf) == sparse
    assert [is_qwen_moe_layer(hf.config, i) for i in range(len(sparse))] == sparse
    for layer, is_sparse in zip(ours.model.layers, sparse):
        assert isinstance(layer.mlp, QwenMoeBlock if is_sparse else LlamaMLP)
    block = ours.model.layers[1].mlp
    assert isinstance(block.experts, FusedMoE) and block.experts.w13_weight.shape == (8, 64, 64)
    # Qwen2-MoE's gated shared expert; Qwen3-MoE has none.
    assert (block.shared_expert is not None) == name.startswith("qwen2")
    attn = ours.model.layers[0].self_attn
    assert (attn.qkv_proj.bias is not None) == (name == "qwen2_moe")  # step2 sets qkv_bias False
    assert attn.qk_norm == name.startswith("qwen3")


def test_stacked_expert_checkpoint(tmp_path: Path) -> None:
    """A checkpoint holding each layer's experts stacked (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I], as transformers keeps them in memory) loads the same."""
    hf = save_tiny_checkpoint("qwen2_moe", tmp_path / "per_expert")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    (stacked / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    tensors = {name: p.detach().contiguous() for name, p in hf.named_parameters()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, str(stacked / "model.safetensors"), metadata={"format": "pt"})
    input_ids = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(4))
    assert_close_logits(our_logits(load_ours(stacked), input_ids), hf_logits(hf, input_ids))


def test_sliding_window_is_refused(tmp_path: Path) -> None:
    """Qwen3-MoE windows every layer when use_sliding_window is set (it has no layer_types):
    refused, not served with full attention."""
    config = tiny_config("qwen3_moe")
    config.use_sliding_window, config.sliding_window = True, 16
    from shardserve.models.qwen_moe import QwenMoeForCausalLM

    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        QwenMoeForCausalLM(config)


@pytest.mark.parametrize("name", ["qwen2_moe_step2", "qwen3_moe_dense_layers"])
def test_engine_greedy_matches_transformers(name: str, tmp_path: Path) -> None:
    """Token-identical greedy output with prefix caching and chunked prefill, and the chosen
    tokens' logprobs (tests/models/engine_reference.py)."""
    hf = save_tiny_checkpoint(name, tmp_path)
    copy_tokenizer(tmp_path)
    assert_engine_matches_transformers(hf, tmp_path, seed=len(name), vocab=VOCAB)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_random_model_folders_load_in_both(arch: str, tmp_path: Path) -> None:
    """`shardserve random-model --arch qwen2_moe|qwen3_moe` folders hold exactly the tensors
    transformers expects (experts one tensor each), and we serve them with its logits."""
    from transformers import AutoModelForCausalLM

    from shardserve.testing import main

    folder = main(["--arch", arch, "--out", str(tmp_path), "--seed", "3",
                   "--set", "num_hidden_layers=3", "--set", "mlp_only_layers=[1]"])
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    output_loading_info=True)
    assert not any(info.values()), info
    assert _sparse_layers(hf) == [True, False, True]
    input_ids = torch.randint(0, 1000, (11,), generator=torch.Generator().manual_seed(6))
    assert_close_logits(our_logits(load_ours(folder), input_ids), hf_logits(hf.eval(), input_ids))
