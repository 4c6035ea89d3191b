"""Which Hugging Face architectures we serve, and the class that serves each."""

from __future__ import annotations

from typing import Any

from torch import nn

from shardserve.errors import UnsupportedModelError
from shardserve.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from shardserve.models.llama import LlamaForCausalLM
from shardserve.models.qwen_moe import QwenMoeForCausalLM

# One implementation covers the Llama family (its Qwen MoE models swap in an MoE MLP);
# the flags come from each config.
SUPPORTED_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Llama's decoder; its sliding window is refused unless it covers max_model_len.
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": QwenMoeForCausalLM,
    "Qwen3MoeForCausalLM": QwenMoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}

# Configs without `architectures` (some GGUF-built ones) still name their model type.
_MODEL_TYPE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM",
                             "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                             "qwen3_moe": "Qwen3MoeForCausalLM",
                             "deepseek_v2": "DeepseekV2ForCausalLM",
                             "deepseek_v3": "DeepseekV3ForCausalLM"}


def check_architecture(hf_config: Any) -> str:
    """The architecture name we will serve `hf_config` with, or UnsupportedModelError."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        model_type = getattr(hf_config, "model_type", None)
        if model_type in _MODEL_TYPE_ARCHITECTURES:
            check_config_features(hf_config)
            return _MODEL_TYPE_ARCHITECTURES[model_type]
        archs = [f"model_type={model_type!r}"]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            check_config_features(hf_config)
            return arch
    raise UnsupportedModelError(
        f"Model architecture {', '.join(archs)} is not supported; supported architectures: "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}.")


def check_config_features(hf_config: Any) -> None:
    """Refuse, when the config is read (before any worker starts), what the models would
    otherwise refuse only while being built: a quantization or RoPE scaling we do not serve."""
    from shardserve.layers.rotary import check_rope_type, get_rope_config
    from shardserve.loader.fp8 import fp8_block_size

    fp8_block_size(hf_config)
    _, rope_scaling = get_rope_config(hf_config)
    check_rope_type((rope_scaling or {}).get("rope_type", "default"))


def get_model_class(name: str) -> type[nn.Module]:
    try:
        return SUPPORTED_ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"Model architecture {name} is not supported; supported architectures: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}.") from None
