"""shardserve/loader/hf_config.py: a damaged or hand-edited config.json is one clear error
naming the file and the field, never transformers' or huggingface_hub's traceback."""

import json

import pytest

from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.loader.hf_config import load_hf_config
from shardserve.loader.source import ModelSource

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 500,
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _load(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config) if not isinstance(config, str)
                                          else config)
    return load_hf_config(ModelSource("hf", tmp_path, tmp_path.name))


def test_a_valid_config_loads(tmp_path):
    assert _load(tmp_path, _LLAMA).num_key_value_heads == 2


@pytest.mark.parametrize("edit, match", [
    # Each escaped before as huggingface_hub's StrictDataclass*Error or a ZeroDivisionError
    # from transformers' checks (a traceback from the CLI), or blamed --pipeline-parallel-size.
    ({"num_attention_heads": 3}, r"hidden size \(64\) is not a multiple of the number of "
                                 r"attention heads \(3\)"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"vocab_size": None}, "vocab_size.*expected int, got NoneType"),
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
])
def test_bad_fields_are_named(tmp_path, edit, match):
    with pytest.raises(ModelLoadError, match=match) as err:
        _load(tmp_path, {**_LLAMA, **edit})
    assert str(tmp_path / "config.json") in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, match", [("{not json", "Cannot read"),
                                         ("[1, 2]", "must hold a JSON object, got list")])
def test_unreadable_json(tmp_path, text, match):
    with pytest.raises(ModelLoadError, match=match):
        _load(tmp_path, text)


def test_a_model_type_transformers_does_not_know_lists_what_is_served(tmp_path):
    # transformers' own message suggested upgrading transformers, which would not help.
    with pytest.raises(UnsupportedModelError, match="model_type='foobar' is not supported; "
                                                    "supported architectures: .*LlamaForCausalLM"):
        _load(tmp_path, {"model_type": "foobar", "hidden_size": 64})
