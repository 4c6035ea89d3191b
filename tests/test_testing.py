"""Model folders from shardserve.testing load in transformers as they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardserve.loader.gguf import iter_gguf_weights
from shardserve.testing import export_gguf_to_hf, main, write_random_model


def load_checked(folder: str | Path):
    """The folder's model in transformers, failing on any missing or unexpected weight."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_load_and_run_in_transformers(tiny_model_dirs, arch):
    from transformers import AutoTokenizer

    folder = Path(tiny_model_dirs[arch])
    model = load_checked(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = model.config
    assert type(model).__name__ == config.architectures[0] == {
        "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size,
            config.max_position_embeddings) == (64, 2, 4, 2, 128, 2048)
    assert config.vocab_size >= len(tokenizer) and model.dtype == torch.float32
    assert tokenizer.chat_template and config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_dict=False)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", ["llama-3-8b", "qwen3-8b"])
def test_big_presets_shrunk_write_sharded_bf16(tmp_path, preset):
    # The full-size path, made small: the big preset's structure with few, narrow layers.
    folder = write_random_model(tmp_path / preset, preset=preset, num_hidden_layers=2,
                                hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=49152,
                                max_shard_bytes=4 * 10**6)
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    if preset == "llama-3-8b":
        assert config["rope_parameters"]["rope_type"] == "llama3"
        assert config["max_position_embeddings"] == 131072
    else:
        assert config["head_dim"] == 128 and config["model_type"] == "qwen3"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as f:
            assert all(f.get_slice(name).get_dtype() == "BF16" for name in f.keys())
    assert load_checked(folder).dtype == torch.bfloat16


def test_same_seed_same_weights_and_cli(tmp_path):
    def weights(folder: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}

    small = ["--set", "vocab_size=49152", "--set", "num_hidden_layers=1"]
    first = main(["--arch", "qwen2", "--out", str(tmp_path / "a"), *small])
    second = main(["--arch", "qwen2", "--out", str(tmp_path / "b"), *small])
    other = main(["--arch", "qwen2", "--out", str(tmp_path / "c"), "--seed", "1", *small])
    a, b, c = weights(first), weights(second), weights(other)
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 1
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="qwen3 shape"):
        write_random_model(tmp_path / "d", architecture="llama", preset="qwen3-8b")


def test_export_gguf_matches_transformers_gguf_load(tmp_path, smollm2_gguf, smollm2_hf_reference):
    folder = export_gguf_to_hf(smollm2_gguf, tmp_path / "smollm2")
    exported = load_checked(folder)
    reference, tokenizer = smollm2_hf_reference
    assert exported.config.tie_word_embeddings and exported.dtype == torch.float32
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        name, tensor = next(iter_gguf_weights(smollm2_gguf))
        assert torch.equal(f.get_tensor(name), tensor)
