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
    archs = getattr(hf_config, "architectures", None)
    model_type = getattr(hf_config, "model_type", None)
    arch = served_architecture(archs, model_type)
    if arch is None:
        raise unsupported_model_error(archs, model_type)
    check_config_features(hf_config, arch)
    return arch


def served_architecture(architectures: Any, model_type: Any) -> str | None:
    """The architecture a config naming these (config.json's fields) is served as, or None."""
    archs = list(architectures or []) if isinstance(architectures, (list, tuple)) else []
    if not archs:
        return _MODEL_TYPE_ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    return next((arch for arch in archs if arch in SUPPORTED_ARCHITECTURES), None)


def unsupported_model_error(architectures: Any, model_type: Any) -> UnsupportedModelError:
    archs = list(architectures or []) if isinstance(architectures, (list, tuple)) else []
    names = [str(a) for a in archs] or [f"model_type={model_type!r}"]
    return UnsupportedModelError(
        f"Model architecture {', '.join(names)} is not supported; supported architectures: "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}.")


def check_config_features(hf_config: Any, architecture: str | None = None) -> None:
    """Refuse, when the config is read (before any worker starts), what the models would
    otherwise refuse only while being built: a quantization, RoPE setting or (DeepSeek) MoE
    gate we do not serve."""
    from shardserve.layers.moe_routing import RoutingConfig
    from shardserve.layers.rotary import check_rope_config
    from shardserve.loader.fp8 import fp8_block_size

    fp8_block_size(hf_config)
    check_rope_config(hf_config)
    if (architecture in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
            and getattr(hf_config, "n_routed_experts", None)):
        RoutingConfig.from_deepseek_config(hf_config, architecture == "DeepseekV3ForCausalLM")


def get_model_class(name: str) -> type[nn.Module]:
    try:
        return SUPPORTED_ARCHITECTURES[name]
    except KeyError:
        raise unsupported_model_error([name], None) from None
