"""Serve llama, qwen2, qwen3, qwen2moe, qwen3moe and deepseek2 GGUF files: a Hugging Face config
from the metadata, and the weights dequantized to float32 under Hugging Face names (they share
most of them; Qwen2 adds q/k/v biases, Qwen3 q/k norms, the MoE archs their experts, deepseek2
its latent attention: loader/gguf_deepseek.py).

The MoE archs store each layer's experts stacked, ffn_{gate,up,down}_exps [E, I, H] / [E, H, I];
we yield them one expert at a time under transformers' per-expert names
(mlp.experts.{e}.gate_proj.weight, ...), which FusedMoE's weight loader already takes, TP-sliced
or EP-split; each expert is dequantized on its own, and only when `include` asks for it (an
expert-parallel rank never dequantizes another rank's experts). Metadata that GGUF does not
carry comes from llama.cpp's own rules: a layer is sparse when it has a router (ffn_gate_inp),
and qwen3moe renormalises its top-k while qwen2moe does not (llama.cpp's qwen3moe.cpp /
qwen2moe.cpp), unless expert_weights_norm says otherwise.

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
from shardserve.loader import gguf_deepseek
from shardserve.loader.gguf_file import GGUFFile, GGUFTensorInfo

# Every type a llama.cpp quantization mix may hold. The mixes fall back per tensor: rows not a
# multiple of 256 (SmolLM2's 576) cannot take K-quants, so a Q4_K_M file also carries Q5_0 and
# Q8_0, a Q5_K_M Q5_1, and Q2_K/Q3_K/IQ mixes IQ4_NL. IQ1_M is the bulk of IQ1_M files (unsloth's
# and bartowski's smallest), MXFP4 the experts of MXFP4_MOE files (Qwen3-MoE among them).
SUPPORTED_TENSOR_TYPES: tuple[GGMLQuantizationType, ...] = tuple(GGMLQuantizationType[t] for t in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
    "MXFP4"))
_SUPPORTED_IDS = frozenset(int(t) for t in SUPPORTED_TENSOR_TYPES)
_SUPPORTED_HINT = (f"Supported types: {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}. Use a "
                   "file of another quantization (e.g. Q8_0 or Q4_K_M), or re-quantize this one "
                   "with llama.cpp's llama-quantize.")

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
# The MoE archs' routers and shared experts (deepseek2's: gguf_deepseek.LAYER_NAMES).
_MOE_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Stacked experts [E, ...] -> the per-expert projection each slice is.
_EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj",
                  "ffn_down_exps": "down_proj"}
# The GGUF architectures we serve: (Hugging Face model type, architecture).
_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                  "qwen3": ("qwen3", "Qwen3ForCausalLM"),
                  "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
                  "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
                  "deepseek2": ("deepseek_v2", "DeepseekV2ForCausalLM")}
_DEEPSEEK_V3 = ("deepseek_v3", "DeepseekV3ForCausalLM")
_MOE_ARCHITECTURES = ("qwen2moe", "qwen3moe")  # deepseek2 is MoE too, with its own config
_EXPERT_ARCHITECTURES = (*_MOE_ARCHITECTURES, "deepseek2")
# llama.cpp renormalises the chosen experts' weights for qwen3moe only.
_NORM_TOPK_DEFAULT = {"qwen2moe": False, "qwen3moe": True}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores Llama-3.1-style rope scaling as per-frequency factors, not metadata keys.
_ROPE_FREQS = "rope_freqs.weight"


def gguf_config(path: str | os.PathLike[str]) -> Any:
    """A transformers config (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 or V3) built
    from a GGUF's metadata.

    Raises UnsupportedModelError for any other architecture, ModelLoadError when a required key
    is missing."""
    from transformers import AutoConfig

    gguf_file = GGUFFile(path)
    arch = _check_architecture(gguf_file)
    _check_tensor_types(gguf_file)

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
    rope_parameters = _rope_parameters(gguf_file, arch, rope_theta, int(head_dim))
    num_layers = int(key("block_count", required=True))
    has_q_bias = "blk.0.attn_q.bias" in gguf_file.tensors
    # Qwen2 always has q/k/v biases and no attention_bias field; Qwen2-MoE's follow qkv_bias;
    # the others say what they have.
    if arch == "qwen2":
        extra: dict[str, Any] = {}
    elif arch == "qwen2moe":
        extra = {"qkv_bias": has_q_bias}
    else:
        extra = {"attention_bias": has_q_bias}
    if arch == "llama":
        extra["mlp_bias"] = "blk.0.ffn_gate.bias" in gguf_file.tensors
    if arch in _MOE_ARCHITECTURES:
        extra.update(_moe_config(gguf_file, arch, key, num_layers))
    model_type, architecture = _ARCHITECTURES[arch]
    if arch == "deepseek2":
        extra = gguf_deepseek.deepseek_config(gguf_file, key, num_heads, rope_parameters)
        if gguf_deepseek.is_v3(gguf_file):
            model_type, architecture = _DEEPSEEK_V3
    else:
        extra.update(num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
                     head_dim=int(head_dim), rope_parameters=rope_parameters)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=_vocab_size(gguf_file, arch),
        hidden_size=hidden_size,
        # An MoE file whose layers are all sparse needs no dense size (llama.cpp ignores it).
        intermediate_size=int(key("feed_forward_length", extra.get("moe_intermediate_size"),
                                  required=True)),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=int(key("context_length", required=True)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        bos_token_id=_token_id(gguf_file, "bos_token_id"),
        eos_token_id=_end_token_ids(gguf_file),
        pad_token_id=_token_id(gguf_file, "padding_token_id"),
        tie_word_embeddings="output.weight" not in gguf_file.tensors,
        architectures=[architecture],
        **extra,
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
        expert_names = _expert_names(info) if arch in _EXPERT_ARCHITECTURES else None
        if expert_names is not None:
            # One expert at a time, and only those asked for: an expert-parallel rank
            # dequantizes its own experts, never the whole stack.
            for e, name in enumerate(expert_names):
                if include is None or include(name):
                    yield name, _dequantize(gguf_file, info, e)
            continue
        split_kv_b = gguf_deepseek.split_kv_b(gguf_file, info.name) if arch == "deepseek2" else None
        if split_kv_b is not None:
            name, (k_b, v_b) = split_kv_b
            if info.name == k_b.name and (include is None or include(name)):
                yield name, gguf_deepseek.merged_kv_b(_dequantize(gguf_file, k_b),
                                                      _dequantize(gguf_file, v_b))
            continue  # attn_v_b: yielded with its attn_k_b
        name = hf_weight_name(info.name, arch)
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
        elif name.endswith(".shared_expert_gate.weight") and tensor.dim() == 1:
            tensor = tensor[None]  # llama.cpp keeps this [1, H] router as a vector [H]
        yield name, tensor


def num_gguf_weights(path: str | os.PathLike[str]) -> int:
    """How many tensors iter_gguf_weights yields without `include` (a stack of E experts counts
    E times)."""
    gguf_file = GGUFFile(path)
    return sum(len(names) if (names := _expert_names(info)) is not None else 1
               for info in gguf_file.tensors.values()
               if info.name != _ROPE_FREQS and ".attn_v_b." not in info.name)


def hf_weight_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of one of our architectures, or None if it has
    none (stacked experts have one name per expert: see _expert_names; deepseek2's split
    attn_k_b/attn_v_b one between them: gguf_deepseek.split_kv_b)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    if arch == "deepseek2":
        if part in gguf_deepseek.BIAS_NAMES and kind == "bias":
            return f"model.layers.{layer}.{gguf_deepseek.BIAS_NAMES[part]}"
        names = {**_MOE_LAYER_NAMES, **gguf_deepseek.LAYER_NAMES}
    else:
        names = _MOE_LAYER_NAMES if arch in _MOE_ARCHITECTURES else _LAYER_NAMES
    return f"model.layers.{layer}.{names[part]}.{kind}" if part in names else None


def _expert_names(info: GGUFTensorInfo) -> list[str] | None:
    """The per-expert Hugging Face names of a stacked-experts tensor, or None if it is not one."""
    match = _LAYER_TENSOR.fullmatch(info.name)
    if match is None or match.group(2) not in _EXPERT_STACKS or match.group(3) != "weight":
        return None
    layer, proj = match.group(1), _EXPERT_STACKS[match.group(2)]
    return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(info.shape[0])]


def _moe_config(gguf_file: GGUFFile, arch: str, key: Callable[..., Any],
                num_layers: int) -> dict[str, Any]:
    """The Qwen-MoE config fields. Sizes missing from the metadata (older converters) are read
    off the tensors; which layers are sparse is read off the tensors always (GGUF has no
    decoder_sparse_step or mlp_only_layers)."""
    tensors = gguf_file.tensors

    def size_of(tensor: str, dim: int) -> int | None:
        info = tensors.get(tensor)
        return None if info is None else info.shape[dim]

    sparse = [f"blk.{i}.ffn_gate_inp.weight" in tensors for i in range(num_layers)]
    first = sparse.index(True) if any(sparse) else 0
    fields = {
        "num_experts": int(key("expert_count", required=True)),
        "num_experts_per_tok": int(key("expert_used_count", required=True)),
        "moe_intermediate_size": key("expert_feed_forward_length")
        or size_of(f"blk.{first}.ffn_gate_exps.weight", 1),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, is_sparse in enumerate(sparse) if not is_sparse],
        "norm_topk_prob": bool(key("expert_weights_norm", _NORM_TOPK_DEFAULT[arch])),
    }
    if fields["moe_intermediate_size"] is None:
        raise ModelLoadError(
            f"GGUF file {gguf_file.path} states no expert size: it lacks the metadata key "
            f"'{arch}.expert_feed_forward_length' and any ffn_gate_exps tensor. Re-export it.")
    fields["moe_intermediate_size"] = int(fields["moe_intermediate_size"])
    if arch == "qwen2moe":
        shared = (key("expert_shared_feed_forward_length")
                  or size_of(f"blk.{first}.ffn_up_shexp.weight", 0) or 0)
        fields["shared_expert_intermediate_size"] = int(shared)
    return fields


def _check_architecture(gguf_file: GGUFFile) -> str:
    arch = gguf_file.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_file.path} is a GGUF of architecture {arch!r}; shardserve only serves "
            f"{', '.join(_ARCHITECTURES)} GGUFs (Llama, SmolLM, Mistral, Qwen2/2.5, Qwen3, "
            "Qwen1.5-MoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3/R1 and DeepSeek-R1-Distill "
            "files). Serve this model from its Hugging Face folder (config.json + "
            "*.safetensors) instead.")
    num_experts = gguf_file.get(f"{arch}.expert_count")
    if arch == "llama" and num_experts:
        # llama.cpp writes Mixtral (MixtralForCausalLM) under the llama architecture, its
        # experts as ffn_*_exps: without this the file passed as a dense Llama and failed on
        # its first expert tensor, with advice to use a Hugging Face folder we refuse too.
        raise UnsupportedModelError(
            f"{gguf_file.path} is a mixture-of-experts llama GGUF (llama.expert_count "
            f"{num_experts}: Mixtral or a model built like it), which shardserve does not "
            "serve; its MoE families are Qwen2-MoE, Qwen3-MoE and DeepSeek-V2/V3.")
    return arch


def _check_tensor_types(gguf_file: GGUFFile) -> None:
    """UnsupportedModelError naming every tensor type we cannot dequantize, read off the header
    when the config is built: before any worker starts or weight loads, rather than at the first
    such tensor, which in a big file may come minutes into loading."""
    unsupported: dict[str, list[str]] = {}
    for info in gguf_file.tensors.values():
        if info.ggml_type not in _SUPPORTED_IDS:
            unsupported.setdefault(info.type_name, []).append(info.name)
    if unsupported:
        found = "; ".join(f"{kind} ({names[0]!r}" + (f" and {len(names) - 1} more)"
                                                    if len(names) > 1 else ")")
                          for kind, names in unsupported.items())
        raise UnsupportedModelError(
            f"GGUF file {gguf_file.path} holds tensor types shardserve cannot dequantize: "
            f"{found}. {_SUPPORTED_HINT}")


def _dequantize(gguf_file: GGUFFile, info: GGUFTensorInfo,
                index: int | None = None) -> torch.Tensor:
    """The tensor in float32, or with `index` its slice [index] along the first dim (quant
    blocks run along the last dim, so each slice's bytes are its own)."""
    if info.ggml_type not in _SUPPORTED_IDS:
        raise UnsupportedModelError(
            f"GGUF tensor {info.name!r} in {gguf_file.path} has type {info.type_name}, which "
            f"shardserve cannot dequantize. {_SUPPORTED_HINT}")
    raw, shape = gguf_file.raw(info), info.shape
    if index is not None:
        raw, shape = raw[index], shape[1:]
    values = dequantize(raw, GGMLQuantizationType(info.ggml_type))
    # F32 comes back as a read-only view of the file map; every type gets its own float32 copy.
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))


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


def _end_token_ids(gguf_file: GGUFFile) -> int | list[int] | None:
    """The file's EOS, plus its end-of-turn and end-of-message tokens where they differ, as a
    list the way Llama-3.1's config.json lists them. llama.cpp stops at each; Llama-3-Instruct
    files whose EOS is <|end_of_text|> end every turn with <|eot_id|> (eot_token_id), so
    stopping at the EOS alone ran on into a made-up next turn."""
    ids = [_token_id(gguf_file, name) for name in ("eos_token_id", "eot_token_id", "eom_token_id")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


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
