"""The model's Hugging Face config, from config.json or from GGUF metadata."""

from __future__ import annotations

import json
from typing import Any

from shardserve.errors import ModelLoadError
from shardserve.loader.source import ModelSource

# Sizes every served architecture's config holds; a zero or a string here otherwise surfaces as
# a ZeroDivisionError from transformers' own checks or a nonsense pipeline-parallel error.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim")


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.kind == "gguf":
        from shardserve.loader.gguf import gguf_config
        return gguf_config(source.path)
    file = source.path / "config.json"
    try:
        fields = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelLoadError(f"Cannot read {file}: {err}") from err
    if not isinstance(fields, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(fields).__name__}.")
    for name in _POSITIVE_SIZES:
        value = fields.get(name)
        positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if value is not None and not positive:
            raise ModelLoadError(f"{file}: {name} must be a positive integer, got {value!r}; the "
                                 "file is damaged or was edited by hand.")
    try:
        return AutoConfig.from_pretrained(str(source.path))
    except Exception as err:
        from shardserve.models.registry import served_architecture, unsupported_model_error
        if served_architecture(fields.get("architectures"), fields.get("model_type")) is None:
            # A model_type transformers does not know: not one of ours either, so say what is.
            raise unsupported_model_error(fields.get("architectures"),
                                          fields.get("model_type")) from err
        # transformers validates the fields as it builds the config, and raises whatever its
        # check hit, often huggingface_hub's StrictDataclass*Error wrapping the ValueError or
        # TypeError that says what is wrong (hidden_size not a multiple of the heads, a null
        # vocab_size). All are the file's fault: name the file and the problem on one line,
        # not a traceback.
        cause = err.__cause__ if err.__cause__ is not None else err
        detail = " ".join(str(cause).split()) or type(cause).__name__
        raise ModelLoadError(f"Cannot read {file}: {detail}") from err
