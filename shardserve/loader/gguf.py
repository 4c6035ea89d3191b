"""Serve llama, qwen2 and qwen3 GGUF files: a Hugging Face config from the metadata, and the
weights dequantized to float32 under Hugging Face names (the three share them; Qwen2 adds q/k/v
biases, Qwen3 q/k norms).

Two things llama.cpp's converter (convert_hf_to_gguf.py) does that we undo here:
- it lists dims innermost first, so a [out, in] weight reads as [in, out] (gguf_file.py reverses);
- for llama only (Qwen's converter keeps Hugging Face's layout), it permutes the rows of q_proj
  and k_proj within each head, from Hugging Face's rotary layout (first half / second half of
  the head) to GGML's interleaved pairs:

      HF rows of one head:   x0 x1 ... x(d/2-1) | y0 y1 ... y(d/2-1)
      GGUF rows of the head: x0 y0 x1 y1 ... x(d/2-1) y(d/2-1)

  `_unpermute_rows` puts them back, so our HF-layout rotary embedding works unchanged.

Quantized blocks run along a row (the input dim), so the row permutation commutes with
dequantization and we can un-permute after dequantizing.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.loader.gguf_file import GGUFFile, GGUFTensorInfo

# Every type a llama.cpp quantization mix may hold. The mixes fall back per tensor: rows not a
# multiple of 256 (SmolLM2's 576) cannot take K-quants, so a Q4_K_M file also carries Q5_0 and
# Q8_0, a Q5_K_M Q5_1, and Q2_K/Q3_K/IQ mixes IQ4_NL.
SUPPORTED_TENSOR_TYPES: tuple[GGMLQuantizationType, ...] = tuple(GGMLQuantizationType[t] for t in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S"))
_SUPPORTED_IDS = frozenset(int(t) for t in SUPPORTED_TENSOR_TYPES)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# The GGUF architectures we serve, as Hugging Face model types and architectures.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores Llama-3.1-style rope scaling as per-frequency factors, not metadata keys.
_ROPE_FREQS = "rope_freqs.weight"


def gguf_config(path: str | os.PathLike[str]) -> Any:
    """A transformers config (Llama, Qwen2 or Qwen3) built from a GGUF's metadata.

    Raises UnsupportedModelError for any other architecture, ModelLoadError when a required key
    is missing."""
    from transformers import AutoConfig

    gguf_file = GGUFFile(path)
    arch = _check_architecture(gguf_file)

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gguf_file.get(f"{arch}.{name}", default)
        if value is None and required:
            raise ModelLoadError(
                f"GGUF file {gguf_file.path} lacks the metadata key '{arch}.{name}'; the file is "
                "incomplete or was not written by llama.cpp's converter. Re-export it.")
        return value

    hidden_size = int(key("embedding_length", required=True))
    num_heads = int(key("attention.head_count", required=True))
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden_size // num_heads
    rope_theta = float(key("rope.freq_base", 10000.0))
    # Qwen2 always has q/k/v biases and no attention_bias field; the others say what they have.
    biases = {} if arch == "qwen2" else {"attention_bias": "blk.0.attn_q.bias" in gguf_file.tensors}
    if arch == "llama":
        biases["mlp_bias"] = "blk.0.ffn_gate.bias" in gguf_file.tensors
    config = AutoConfig.for_model(
        arch,
        vocab_size=_vocab_size(gguf_file, arch),
        hidden_size=hidden_size,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=int(key("block_count", required=True)),
        num_attention_heads=num_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(key("context_length", required=True)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=_rope_parameters(gguf_file, arch, rope_theta, int(head_dim)),
        bos_token_id=_token_id(gguf_file, "bos_token_id"),
        eos_token_id=_token_id(gguf_file, "eos_token_id"),
        pad_token_id=_token_id(gguf_file, "padding_token_id"),
        tie_word_embeddings="output.weight" not in gguf_file.tensors,
        architectures=[_ARCHITECTURES[arch]],
        **biases,
    )
    config.name_or_path = str(gguf_file.path)
    return config


def iter_gguf_weights(
    path: str | os.PathLike[str],
    include: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, float32 tensor in HF shape) for every weight in the file.

    `include`, given an HF name, says whether to yield it; the rest are never dequantized (a
    pipeline stage skips other stages' layers this way). lm_head.weight is absent when the
    embeddings are tied (no output.weight tensor)."""
    gguf_file = GGUFFile(path)
    arch = _check_architecture(gguf_file)
    num_heads = int(gguf_file.get(f"{arch}.attention.head_count"))
    num_kv_heads = int(gguf_file.get(f"{arch}.attention.head_count_kv", num_heads))
    permuted = arch == "llama"  # Qwen's converter keeps Hugging Face's Q/K row order
    for info in gguf_file.tensors.values():
        if info.name == _ROPE_FREQS:
            continue  # folded into gguf_config's rope_parameters
        name = hf_weight_name(info.name)
        if name is None:
            raise UnsupportedModelError(
                f"GGUF tensor {info.name!r} in {gguf_file.path} has no Hugging Face "
                f"counterpart; this {arch}-architecture file carries weights shardserve cannot "
                "place. Serve the model from its Hugging Face folder instead.")
        if include is not None and not include(name):
            continue
        tensor = _dequantize(gguf_file, info)
        if permuted and ".self_attn.q_proj." in name:
            tensor = _unpermute_rows(tensor, num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            tensor = _unpermute_rows(tensor, num_kv_heads)
        yield name, tensor


def hf_weight_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama/qwen2/qwen3 GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _check_architecture(gguf_file: GGUFFile) -> str:
    arch = gguf_file.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_file.path} is a GGUF of architecture {arch!r}; shardserve only serves "
            f"{', '.join(_ARCHITECTURES)} GGUFs (Llama, SmolLM, Mistral, Qwen2/2.5, Qwen3 and "
            "DeepSeek-R1-Distill files). Serve this model from its Hugging Face folder "
            "(config.json + *.safetensors) instead.")
    return arch


def _dequantize(gguf_file: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    if info.ggml_type not in _SUPPORTED_IDS:
        supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
        raise UnsupportedModelError(
            f"GGUF tensor {info.name!r} in {gguf_file.path} has type {info.type_name}, which "
            f"shardserve cannot dequantize; supported types: {supported}. Re-quantize the model "
            "with llama.cpp's llama-quantize to one of those (e.g. Q8_0 or Q4_K_M).")
    values = dequantize(gguf_file.raw(info), GGMLQuantizationType(info.ggml_type))
    # F32 comes back as a read-only view of the file map; every type gets its own float32 copy.
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(info.shape))


def _unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's `permute`: reshape(heads, 2, d/2).swapaxes(1, 2)."""
    rest = weight.shape[1:]
    half = weight.shape[0] // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *rest).transpose(1, 2)
            .reshape(weight.shape).contiguous())


def _vocab_size(gguf_file: GGUFFile, arch: str) -> int:
    if f"{arch}.vocab_size" in gguf_file.metadata:
        return int(gguf_file.get(f"{arch}.vocab_size"))
    tokens = gguf_file.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    if "token_embd.weight" in gguf_file.tensors:
        return gguf_file.tensors["token_embd.weight"].shape[0]
    raise ModelLoadError(
        f"GGUF file {gguf_file.path} states no vocabulary size: it has no '{arch}.vocab_size' key, "
        "no tokenizer.ggml.tokens and no token_embd.weight tensor. Re-export it with llama.cpp.")


def _token_id(gguf_file: GGUFFile, name: str) -> int | None:
    value = gguf_file.get(f"tokenizer.ggml.{name}")
    return None if value is None else int(value)


def _rope_parameters(gguf_file: GGUFFile, arch: str, rope_theta: float,
                     head_dim: int) -> dict[str, Any]:
    """HF rope_parameters from the rope.scaling.* keys, or from a rope_freqs tensor (llama3)."""
    scaling_type = gguf_file.get(f"{arch}.rope.scaling.type")
    factor = gguf_file.get(f"{arch}.rope.scaling.factor") or gguf_file.get(f"{arch}.rope.scale_linear")
    original = gguf_file.get(f"{arch}.rope.scaling.original_context_length")
    if scaling_type is None and factor is not None:
        scaling_type = "linear"  # older files carry only rope.scale_linear
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if scaling_type in (None, "none") or (scaling_type == "linear" and float(factor or 1.0) == 1.0):
        if _ROPE_FREQS in gguf_file.tensors:
            params.update(_llama3_from_rope_freqs(gguf_file, rope_theta, head_dim))
        return params
    if scaling_type == "linear":
        params.update(rope_type="linear", factor=float(factor))
    elif scaling_type == "yarn":
        params.update(rope_type="yarn", factor=float(factor))
        if original is not None:
            params["original_max_position_embeddings"] = int(original)
        for gguf_key, hf_key in (("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                 ("yarn_beta_slow", "beta_slow")):
            value = gguf_file.get(f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                params[hf_key] = float(value)
    else:
        raise UnsupportedModelError(
            f"{gguf_file.path} uses rope scaling {scaling_type!r}; shardserve reads linear and "
            "yarn scaling from GGUF metadata. Serve the model from its Hugging Face folder.")
    return params


def _llama3_from_rope_freqs(gguf_file: GGUFFile, rope_theta: float,
                            head_dim: int) -> dict[str, Any]:
    """Recover Llama-3.1 rope scaling from the per-frequency factors llama.cpp stores.

    convert_hf_to_gguf writes factor 1 for short wavelengths, `factor` for long ones and
    1 / ((1 - s) / factor + s) between, with s = (L / wavelen - low) / (high - low). s is linear
    in 1 / wavelen, so two in-between points give L / (high - low) and low / (high - low): only
    those ratios matter, so we fix L = original_max_position_embeddings = 8192 (Llama 3.1's)."""
    info = gguf_file.tensors[_ROPE_FREQS]
    ramp = dequantize(gguf_file.raw(info), GGMLQuantizationType(info.ggml_type)).astype(np.float64)
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    factor = float(ramp.max())
    original = 8192
    between = np.flatnonzero((ramp > 1.0 + 1e-4) & (ramp < factor - 1e-4))
    if factor <= 1.0 or len(between) < 2:
        low, high = 1.0, 4.0  # Llama 3.1's values, used when the ramp is too short to fit
    else:
        smooth = (1.0 / ramp[between] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_wavelen[between], smooth, 1)
        span = original / slope  # high - low
        low = -intercept * span
        high = low + span
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": round(float(low), 4),
              "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": original}
    if not np.allclose(_llama3_ramp(params, inv_wavelen), ramp, rtol=1e-3):
        raise UnsupportedModelError(
            f"{gguf_file.path} has a {_ROPE_FREQS} tensor that does not match Llama-3 rope "
            "scaling; shardserve cannot reproduce its rotary embedding. Serve the model from its "
            "Hugging Face folder instead.")
    return params


def _llama3_ramp(params: dict[str, Any], inv_wavelen: np.ndarray) -> np.ndarray:
    original, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = np.clip((original * inv_wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)
