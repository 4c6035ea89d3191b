"""Pipeline stages of a model, in one process: what each stage builds and loads."""

import pytest
import torch

from shardserve.models.llama import LlamaForCausalLM
from shardserve.models.pipeline import StageLayout, tied_head_weight_name
from shardserve.planner.stages import describe_stages, engine_stage_layers


def _config(**overrides):
    from transformers import LlamaConfig
    return LlamaConfig(**{**dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, vocab_size=300),
                          **overrides})


def test_stage_builds_only_its_parts():
    config = _config()
    first = LlamaForCausalLM(config, torch.float32, stage=StageLayout(0, 2, True, False))
    last = LlamaForCausalLM(config, torch.float32, stage=StageLayout(2, 5, False, True))
    first_names = {n for n, _ in first.named_parameters()}
    last_names = {n for n, _ in last.named_parameters()}
    assert "model.embed_tokens.weight" in first_names and "lm_head.weight" not in first_names
    assert "model.norm.weight" not in first_names
    assert {int(n.split(".")[2]) for n in first_names if n.startswith("model.layers.")} == {0, 1}
    assert "model.embed_tokens.weight" not in last_names and "lm_head.weight" in last_names
    assert {int(n.split(".")[2]) for n in last_names if n.startswith("model.layers.")} == {2, 3, 4}
    whole = {n for n, _ in LlamaForCausalLM(config, torch.float32).named_parameters()}
    assert first_names | last_names == whole and not first_names & last_names


def test_weight_ownership_and_tied_heads():
    middle, last = StageLayout(1, 3, False, False), StageLayout(3, 5, False, True)
    assert middle.owns_weight("model.layers.2.mlp.up_proj.weight")
    assert not middle.owns_weight("model.layers.3.mlp.up_proj.weight")
    assert not middle.owns_weight("model.embed_tokens.weight", tied_embeddings=True)
    assert not last.owns_weight("model.embed_tokens.weight")
    assert last.owns_weight("model.embed_tokens.weight", tied_embeddings=True)
    # The last stage's own head is loaded from the embedding's tensor when they are tied.
    assert tied_head_weight_name("model.embed_tokens.weight", last, True) == "lm_head.weight"
    whole = StageLayout.whole(5)
    assert tied_head_weight_name("lm_head.weight", whole, True) is None
    assert tied_head_weight_name("model.embed_tokens.weight", whole, True) == "model.embed_tokens.weight"


def test_engine_partition_default_explicit_and_logged():
    config = _config(vocab_size=50000)  # a heavy LM head: the last stage gets fewer layers
    bounds = engine_stage_layers(config, 2)
    assert bounds[0][0] == 0 and bounds[-1][1] == 5
    assert bounds[1][1] - bounds[1][0] < bounds[0][1] - bounds[0][0]
    assert engine_stage_layers(config, 3, "1,2,2") == [(0, 1), (1, 3), (3, 5)]
    with pytest.raises(ValueError):
        engine_stage_layers(config, 2, "4,4")
    lines = describe_stages(config, bounds, 1, 4)
    assert lines[0].startswith("stage 0: embedding") and "LM head" in lines[1]
    assert all("est. cost" in line and "MiB" in line for line in lines)
