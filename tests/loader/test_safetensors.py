"""Damaged safetensors checkpoints, and configs that do not describe their weights, fail with a
ModelLoadError naming the file or tensor (not the library's bare error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardserve.errors import ModelLoadError
from tests.models.tiny_checkpoints import load_ours, save_tiny_checkpoint


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors"])
def test_damaged_file_is_named(tmp_path: Path, damage: str) -> None:
    save_tiny_checkpoint("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x07" * 1000)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*download the checkpoint again"):
        load_ours(tmp_path)


def test_config_that_does_not_match_the_weights_names_the_tensor(tmp_path: Path) -> None:
    save_tiny_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight .*"
                                             r"Checkpoint shape .* does not match"):
        load_ours(tmp_path)


@pytest.mark.parametrize("name, edit, match", [
    ("llama", {"intermediate_size": 64}, r"mlp\.\w+_proj\.weight.*Checkpoint shape .* does not match"),
    ("qwen3", {"num_key_value_heads": 1}, r"self_attn\.[kv]_proj\.weight.*Checkpoint shape"),
    ("qwen3_moe", {"moe_intermediate_size": 16}, r"experts\.0\.\w+_proj\.weight.*Checkpoint shape"),
    ("llama", {"vocab_size": 600}, r"vocabulary 500 is smaller than the model's vocab_size 600"),
])
def test_config_narrower_than_the_weights_is_refused(name: str, edit: dict, match: str,
                                                     tmp_path: Path) -> None:
    """TP loaders read only their rank's rows or columns, so a config.json narrower than the
    checkpoint (or with a larger vocabulary) must still be caught: not loaded with the extra
    rows dropped, or the missing ones zero."""
    save_tiny_checkpoint(name, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ModelLoadError, match=match):
        load_ours(tmp_path)
