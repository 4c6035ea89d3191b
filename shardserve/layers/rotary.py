"""Rotary position embeddings with the scaling variants Llama/Qwen checkpoints use.

The inverse frequencies follow transformers' modeling_rope_utils op for op (same float32
arithmetic), so cos/sin match Hugging Face to the last bit in the reference path. cos and sin
are precomputed for every position once and looked up by `positions`, so a packed batch of
requests at different positions needs no per-request work:

    cos_sin_cache  [max_positions, rotary_dim]   = [cos(p * inv_freq) | sin(p * inv_freq)]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shardserve.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def get_rope_config(hf_config: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from a transformers 5 config (`rope_parameters` with
    `rope_type` and `rope_theta`) or an older one (`rope_theta` + `rope_scaling` with `type`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    else:
        params = dict(params)
    base = float(params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None)
                 or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type in ("llama3", "yarn"):
        # A top-level field wins over rope_scaling's own (Phi-3 style): transformers' RoPE
        # re-standardises the config when it builds its frequencies and lets it override (its
        # loaded config may still show max_position_embeddings filled in).
        top_level = getattr(hf_config, "original_max_position_embeddings", None)
        if top_level is not None:
            params["original_max_position_embeddings"] = top_level
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    if rope_type == "default" and not params.get("partial_rotary_factor"):
        return base, None
    return base, {"rope_type": rope_type, **params}


def _base_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(base: float, rotary_dim: int, s: dict[str, Any]) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, rotary_dim)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the middle band interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(base: float, rotary_dim: int, max_position: int,
                   s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / original
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _dynamic_freqs(base: float, rotary_dim: int, max_position: int, factor: float,
                   num_positions: int) -> torch.Tensor:
    """Dynamic NTK: position p uses the base transformers picks for a sequence of p + 1 tokens.

    transformers keeps the plain base up to max_position and, decoding with a cache, rotates
    each new token with the base for its own length: per-position bases give exactly that with
    no per-batch state (a batch mixes sequences of many lengths), and cached keys never need
    re-rotating. (One difference: a single prefill longer than max_position gets one base, that
    of its full length, in transformers. vLLM instead fixes the base of max_position * factor
    for every position, which changes short sequences too.)
    """
    # transformers' init value, same float arithmetic (the factor terms cancel to 1.0).
    inv_freq = _base_inv_freq(base * ((factor * max_position / max_position) - (factor - 1))
                              ** (rotary_dim / (rotary_dim - 2)), rotary_dim)
    positions = torch.arange(num_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    if num_positions > max_position:
        seq_len = torch.arange(max_position + 1, num_positions + 1)  # int64, as in HF
        bases = base * ((factor * seq_len / max_position) - (factor - 1)) ** (
            rotary_dim / (rotary_dim - 2))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        long_inv_freq = 1.0 / (bases[:, None] ** exponents[None, :])
        freqs[max_position:] = positions[max_position:, None] * long_inv_freq
    return freqs


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq*D], k [T, Hk*D]) -> rotated (q, k), same shapes.

    Rotates the first rotary_dim dims of each head, neox style (rotate_half, as HF Llama/Qwen),
    or GPT-J style (interleaved pairs) when is_neox_style is False.
    """

    def __init__(self, head_size: int, rotary_dim: int, freqs: torch.Tensor,
                 attention_scaling: float = 1.0, is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox_style
        cache = torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], -1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @property
    def max_positions(self) -> int:
        return self.cos_sin_cache.shape[0]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_size)
        rot, passthrough = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if self.is_neox_style:
            out = torch.cat((o1, o2), dim=-1)
        else:
            out = torch.stack((o1, o2), dim=-1).flatten(-2)
        if passthrough.shape[-1]:
            out = torch.cat((out, passthrough), dim=-1)
        return out.reshape(num_tokens, -1)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (query.is_cuda and query.dim() == 2 and key.dim() == 2
                and query.stride(-1) == 1 and key.stride(-1) == 1):
            # One in-place Triton launch for q and k (the torch path below is ~12 kernels).
            from shardserve.kernels.rotary import rotary_embedding_
            rotary_embedding_(positions, query, key, self.cos_sin_cache, self.head_size,
                              self.rotary_dim, self.is_neox_style)
            return query, key
        return self.forward_native(positions, query, key)

    def forward_native(self, positions: torch.Tensor, query: torch.Tensor,
                       key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch path on any device (new tensors; the reference of the Triton kernels)."""
        cos_sin = self.cos_sin_cache.index_select(0, positions.long())
        # Like HF: cos/sin computed in float32, then cast to the activations' dtype.
        cos, sin = cos_sin.to(query.dtype).unsqueeze(1).chunk(2, dim=-1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_positions={self.max_positions}, neox={self.is_neox_style}")


def _rope_freqs(rotary_dim: int, max_position: int, base: float, rope_type: str,
                scaling: dict[str, Any], min_positions: int) -> tuple[torch.Tensor, float]:
    """(angles [num_positions, rotary_dim // 2], cos/sin scale) for one RoPE variant."""
    if rope_type == "dynamic":
        num_positions = max(int(max_position * scaling["factor"]), min_positions)
        return _dynamic_freqs(base, rotary_dim, max_position, scaling["factor"], num_positions), 1.0
    attention_scaling = 1.0
    num_positions = max_position
    if rope_type == "default":
        inv_freq = _base_inv_freq(base, rotary_dim)
    elif rope_type == "linear":
        inv_freq = _base_inv_freq(base, rotary_dim) / scaling["factor"]
        num_positions = int(max_position * scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(base, rotary_dim, scaling)
    else:  # yarn
        inv_freq, attention_scaling = _yarn_inv_freq(base, rotary_dim, max_position, scaling)
        num_positions = max(max_position, int(scaling["original_max_position_embeddings"]
                                              * (scaling.get("factor") or 1)))
    positions = torch.arange(max(num_positions, min_positions), dtype=torch.float32)
    return positions[:, None] * inv_freq[None, :], attention_scaling


def check_rope_type(rope_type: str) -> None:
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type {rope_type!r} (config.json's rope_scaling / rope_parameters) is "
            f"not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")


def check_rope_config(hf_config: Any) -> None:
    """Refuse RoPE settings of a Llama/Qwen/DeepSeek config that we would serve differently
    from transformers: an unknown scaling type, or partial_rotary_factor, which those models
    in transformers ignore (default RoPE rotates whole heads) or fail on (scaled RoPE builds
    cos/sin narrower than the heads), so no reference says what the checkpoint computes."""
    _, scaling = get_rope_config(hf_config)
    scaling = scaling or {}
    check_rope_type(scaling.get("rope_type", "default"))
    partial = scaling.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(
            f"partial_rotary_factor={partial} (config.json) is not supported for "
            f"{', '.join(getattr(hf_config, 'architectures', None) or ['this model'])}: "
            "transformers' implementation rotates whole heads (or fails with RoPE scaling). "
            "Remove the field if the model was trained with full rotary embeddings.")


_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float,
             rope_scaling: dict[str, Any] | None = None,
             is_neox_style: bool = True, num_positions: int = 0) -> RotaryEmbedding:
    """The rotary embedding for one attention shape, shared by every layer that asks for it
    (one cos/sin table per model, not per layer, on the current default device).

    max_position is the config's max_position_embeddings (the scalings' formulas use it);
    linear and dynamic scaling extend the table by their factor, as the model is meant to run
    past it, and num_positions (the serving max_model_len) extends it further if larger.
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    key = (head_size, rotary_dim, max_position, base, is_neox_style, rope_type, num_positions,
           tuple(sorted((k, str(v)) for k, v in scaling.items())), str(torch.get_default_device()))
    if key in _ROPE_CACHE:
        return _ROPE_CACHE[key]
    check_rope_type(rope_type)
    # Built on the CPU, where transformers computes its frequencies too, then moved.
    with torch.device("cpu"):
        freqs, attention_scaling = _rope_freqs(rotary_dim, max_position, base, rope_type,
                                               scaling, num_positions)
        rope = RotaryEmbedding(head_size, rotary_dim, freqs, attention_scaling, is_neox_style)
    rope = rope.to(torch.get_default_device())
    _ROPE_CACHE[key] = rope
    return rope
