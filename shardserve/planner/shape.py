"""A model's shape as the planner needs it, read from config.json alone (no weights, no torch).

`ModelShape` holds the sizes that decide memory and compute: layer count, widths, heads, the
vocabulary, biases and norms (the Llama/Qwen2/Qwen3 flags that models/llama.py reads), and two
optional parts for the architectures another issue brings to the engine:

    attention  MHA/GQA (Llama, Qwen)   or  MLASpec (DeepSeek-V2/V3 multi-head latent attention)
    mlp        dense SwiGLU            or  MoESpec (Mixtral, Qwen2/3-MoE, DeepSeek experts)

A shape whose architecture the engine does not serve yet is still planned (the accounting
follows vLLM's layout for it); `served` says which, and the report says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardserve.errors import ModelLoadError

# What the engine serves today (models/registry.py); kept here so the planner needs no torch.
SERVED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                        "Qwen3ForCausalLM",
                        "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16", "float8": "fp8"}


@dataclass(frozen=True)
class MoESpec:
    """Routed (and shared) experts of a mixture-of-experts MLP.

    Which layers are MoE differs by family: DeepSeek keeps the first `first_k_dense` layers
    dense; Qwen-MoE makes every `sparse_step`-th layer MoE except `dense_layers`."""

    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    shared_intermediate_size: int = 0  # all shared experts together; 0: none
    shared_expert_gate: bool = False  # Qwen2-MoE: a [1, hidden] sigmoid gate on the shared expert
    first_k_dense: int = 0
    sparse_step: int = 1  # Qwen-MoE's decoder_sparse_step: layers with (layer + 1) % step == 0
    moe_layer_freq: int = 1  # DeepSeek's: layers with layer % freq == 0 (models/deepseek_memory.py)
    dense_layers: tuple[int, ...] = ()
    # DeepSeek keeps the router in float32 whatever the model dtype (models/deepseek.py), and
    # V3's noaux_tc routing adds one float32 e_score_correction_bias per expert.
    router_float32: bool = False
    router_bias: bool = False

    def is_moe_layer(self, layer: int) -> bool:
        if layer < self.first_k_dense or layer in self.dense_layers:
            return False
        return (layer + 1) % self.sparse_step == 0 and layer % self.moe_layer_freq == 0


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: the cache keeps one compressed latent per token
    (kv_lora_rank + the decoupled RoPE key), shared by all heads and not split across TP."""

    kv_lora_rank: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory and compute."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    checkpoint_dtype: str = "bfloat16"
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_positions: int = 0
    partial_rotary_factor: float = 1.0
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    # What `serve --model` names: the folder or the .gguf file (with its suffix), which `deploy
    # k8s --plan` looks for in the model cache; "" when planned from a config dict.
    model_file: str = ""

    @property
    def served(self) -> bool:
        return self.architecture in SERVED_ARCHITECTURES

    @property
    def rotary_dim(self) -> int:
        if self.mla is not None:  # MLA rotates only the decoupled RoPE part of q and k
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def default_max_model_len(self) -> int:
        """The engine's max_model_len when none is given (config_defaults.scaled_max_model_len)."""
        from shardserve.config_defaults import scaled_max_model_len
        scaling = (None if self.rope_type == "default" else
                   {"rope_type": self.rope_type, "factor": self.rope_factor,
                    "original_max_position_embeddings": self.rope_original_max_positions})
        return scaled_max_model_len(self.max_position_embeddings, scaling)

    def rope_table_positions(self, max_model_len: int) -> int:
        """Rows of the RoPE cos/sin table the engine builds (layers/rotary.py `_rope_freqs`):
        linear and dynamic scaling stretch it by their factor, yarn to the original length
        times the factor, and a longer max_model_len stretches it further."""
        mpe = self.max_position_embeddings
        if self.rope_type in ("linear", "dynamic"):
            rows = int(mpe * self.rope_factor)
        elif self.rope_type == "yarn":
            rows = max(mpe, int(self.rope_original_max_positions * (self.rope_factor or 1)))
        else:
            rows = mpe
        return max(rows, max_model_len)


def dtype_bytes(dtype: str) -> int:
    name = normalize_dtype(dtype)
    if name not in DTYPE_BYTES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


def normalize_dtype(dtype: str) -> str:
    text = str(dtype).replace("torch.", "")
    return DTYPE_ALIASES.get(text, text)


def load_model_shape(model: str | os.PathLike[str] | dict[str, Any] | Any) -> ModelShape:
    """The shape of `model`: a config.json path, a Hugging Face folder, a .gguf file, a known
    model's name (see known_models), a config dict, or a transformers config object."""
    if isinstance(model, dict):
        return shape_from_config(model)
    if not isinstance(model, (str, os.PathLike)):
        return shape_from_config(model)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        name = path.resolve().name
        return replace(shape_from_config(_read_json(path / "config.json"), name=name),
                       model_file=name)
    if path.is_file() and path.suffix.lower() == ".json":
        parent = path.resolve().parent.name
        return replace(shape_from_config(_read_json(path), name=parent or path.stem),
                       model_file=parent)
    if path.suffix.lower() == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        from shardserve.loader.gguf import gguf_config  # needs the gguf package: imported late
        file = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        return replace(shape_from_config(gguf_config(file), name=file.stem),
                       model_file=path.resolve().name)
    from shardserve.planner.known_models import KNOWN_MODELS
    if not path.exists() and str(model).lower() in KNOWN_MODELS:
        name = str(model).lower()
        return replace(shape_from_config(KNOWN_MODELS[name], name=name), model_file=name)
    raise ModelLoadError(
        f"{str(model)!r} is neither a config.json, a Hugging Face folder with one, a .gguf file, "
        f"nor a known model name ({', '.join(sorted(KNOWN_MODELS))}).")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot read {path}: {err}") from err


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that the config (dict or object) sets to something not None."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def _architecture(config: Any) -> str:
    archs = list(_get(config, "architectures", default=[]) or [])
    if archs:
        return str(archs[0])
    model_type = _get(config, "model_type", default="")
    return _MODEL_TYPE_ARCHITECTURES.get(model_type, model_type or "unknown")


def _rope(config: Any) -> tuple[str, float, int, float]:
    """(rope_type, factor, original_max_position_embeddings, partial_rotary_factor) from a
    transformers 5 `rope_parameters` or an older `rope_scaling` (as layers/rotary.py reads them)."""
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    params = dict(params) if isinstance(params, dict) else {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    original = int(params.get("original_max_position_embeddings")
                   or _get(config, "original_max_position_embeddings",
                           "max_position_embeddings", default=0))
    partial = float(params.get("partial_rotary_factor")
                    or _get(config, "partial_rotary_factor", default=1.0))
    return rope_type, float(params.get("factor") or 1.0), original, partial


def _moe(config: Any) -> MoESpec | None:
    num_experts = _get(config, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    if not num_experts:
        return None
    model_type = _get(config, "model_type", default="")
    top_k = int(_get(config, "num_experts_per_tok", "moe_top_k", default=2))
    # Mixtral's experts use intermediate_size; the others name their experts' width.
    expert_inter = int(_get(config, "moe_intermediate_size", "intermediate_size"))
    shared = 0
    if _get(config, "n_shared_experts"):
        shared = int(_get(config, "n_shared_experts")) * expert_inter
    elif _get(config, "shared_expert_intermediate_size"):
        shared = int(_get(config, "shared_expert_intermediate_size"))
    arch = _architecture(config)
    deepseek = model_type in ("deepseek_v2", "deepseek_v3") or arch in (
        "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    v3 = model_type == "deepseek_v3" or arch == "DeepseekV3ForCausalLM"
    return MoESpec(
        num_experts=int(num_experts), num_experts_per_tok=top_k,
        expert_intermediate_size=expert_inter, shared_intermediate_size=shared,
        # models/qwen_moe.py gates a shared expert by sigmoid(shared_expert_gate(x)).
        shared_expert_gate=(model_type in ("qwen2_moe", "qwen3_moe") or arch in (
            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")) and shared > 0,
        first_k_dense=int(_get(config, "first_k_dense_replace", default=0)),
        sparse_step=1 if deepseek else int(_get(config, "decoder_sparse_step", default=1)),
        moe_layer_freq=int(_get(config, "moe_layer_freq", default=1)) if deepseek else 1,
        dense_layers=tuple(int(i) for i in (_get(config, "mlp_only_layers", default=[]) or [])),
        # layers/moe_routing.py from_deepseek_config: V3 always routes by noaux_tc.
        router_float32=deepseek,
        router_bias=deepseek and (v3 or _get(config, "topk_method", default="") == "noaux_tc"))


def _mla(config: Any) -> MLASpec | None:
    kv_lora_rank = _get(config, "kv_lora_rank")
    if not kv_lora_rank:
        return None
    q_lora = _get(config, "q_lora_rank")
    return MLASpec(kv_lora_rank=int(kv_lora_rank), q_lora_rank=int(q_lora) if q_lora else None,
                   qk_nope_head_dim=int(_get(config, "qk_nope_head_dim")),
                   qk_rope_head_dim=int(_get(config, "qk_rope_head_dim")),
                   v_head_dim=int(_get(config, "v_head_dim")))


def shape_from_config(config: Any, name: str | None = None) -> ModelShape:
    """Read a Hugging Face config (dict or object). Missing required sizes raise
    ModelLoadError naming the field."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [f for f in required if _get(config, f) is None]
    if missing:
        raise ModelLoadError(f"The model config lacks {', '.join(missing)}; the planner needs "
                             "a decoder-only transformer's config.json.")
    arch = _architecture(config)
    model_type = _get(config, "model_type", default="")
    hidden, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    num_layers = int(_get(config, "num_hidden_layers"))
    # The same flags as models/llama.py LlamaFamilyFlags: Qwen2 hard-codes q/k/v biases,
    # Qwen2-MoE reads them from qkv_bias.
    is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM") or model_type in ("qwen2", "qwen2_moe")
    is_qwen2_moe = arch == "Qwen2MoeForCausalLM" or model_type == "qwen2_moe"
    is_qwen3 = arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") or model_type in ("qwen3", "qwen3_moe")
    attention_bias = bool(_get(config, "attention_bias", default=False))
    rope_type, factor, original, partial = _rope(config)
    ckpt_dtype = normalize_dtype(str(_get(config, "dtype", "torch_dtype", default="bfloat16")))
    return ModelShape(
        name=name or str(_get(config, "_name_or_path", "name_or_path", default="") or arch),
        architecture=arch,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
        head_dim=int(_get(config, "head_dim", default=0) or hidden // heads),
        intermediate_size=int(_get(config, "intermediate_size", default=4 * hidden)),
        vocab_size=int(_get(config, "vocab_size")),
        max_position_embeddings=int(_get(config, "max_position_embeddings", default=2048)),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", default=False)),
        qkv_bias=(bool(_get(config, "qkv_bias", default=True)) if is_qwen2_moe
                  else True if is_qwen2 else attention_bias),
        o_proj_bias=False if is_qwen2 else attention_bias,
        mlp_bias=False if is_qwen2 else bool(_get(config, "mlp_bias", default=False)),
        qk_norm=is_qwen3,
        checkpoint_dtype=ckpt_dtype if ckpt_dtype in DTYPE_BYTES else "bfloat16",
        rope_type=rope_type, rope_factor=factor, rope_original_max_positions=original,
        partial_rotary_factor=partial,
        moe=_moe(config),
        mla=_mla(config),
    )
