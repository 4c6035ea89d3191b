"""The model's Hugging Face config, from config.json or from GGUF metadata."""

from __future__ import annotations

from typing import Any

from shardserve.errors import ModelLoadError
from shardserve.loader.source import ModelSource


def load_hf_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    if source.kind == "gguf":
        from shardserve.loader.gguf import gguf_config
        return gguf_config(source.path)
    try:
        return AutoConfig.from_pretrained(str(source.path))
    except (ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"Cannot read {source.path}/config.json: {err}") from err
