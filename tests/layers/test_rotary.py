"""RoPE tables and rotation against transformers' own rotary embedding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shardserve.errors import UnsupportedModelError
from shardserve.layers.rotary import get_rope, get_rope_config

HEAD_DIM, HEADS, KV_HEADS, MAX_POS = 32, 4, 2, 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
}


def _config(scaling: dict | None) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * HEADS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS,
                       rope_theta=50000.0, rope_scaling=dict(scaling) if scaling else None)


def _ours(config: LlamaConfig):
    base, scaling = get_rope_config(config)
    return get_rope(HEAD_DIM, HEAD_DIM, config.max_position_embeddings, base, scaling)


def _hf_rotate(config, positions, q, k):
    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(q, positions[None])
    num_tokens = q.shape[0]
    q4 = q.view(1, num_tokens, HEADS, HEAD_DIM).transpose(1, 2)
    k4 = k.view(1, num_tokens, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q4, k4 = apply_rotary_pos_emb(q4, k4, cos, sin)
    return (q4.transpose(1, 2).reshape(num_tokens, -1), k4.transpose(1, 2).reshape(num_tokens, -1))


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rotation_matches_transformers(kind: str) -> None:
    config = _config(SCALINGS[kind])
    positions = torch.tensor([0, 1, 2, 7, 15, 16, 33, 63])
    q = torch.randn(len(positions), HEADS * HEAD_DIM)
    k = torch.randn(len(positions), KV_HEADS * HEAD_DIM)
    ours_q, ours_k = _ours(config)(positions, q, k)
    ref_q, ref_k = _hf_rotate(config, positions, q, k)
    torch.testing.assert_close(ours_q, ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_k, ref_k, rtol=1e-6, atol=1e-6)


def test_dynamic_ntk_past_max_position_matches_incremental_decoding() -> None:
    """Beyond max_position transformers rescales per sequence length; decoding one token at a
    time, each token gets the base of its own length, which is what our table holds."""
    config = _config(SCALINGS["dynamic"])
    ours = _ours(config)
    assert ours.max_positions == 2 * MAX_POS
    hf_rope = LlamaRotaryEmbedding(config)  # stateful: grows as positions grow
    for position in (MAX_POS - 1, MAX_POS, MAX_POS + 5, 2 * MAX_POS - 1):
        q = torch.randn(1, HEADS * HEAD_DIM)
        k = torch.randn(1, KV_HEADS * HEAD_DIM)
        cos, sin = hf_rope(q, torch.tensor([[position]]))
        q4, k4 = apply_rotary_pos_emb(q.view(1, 1, HEADS, HEAD_DIM).transpose(1, 2),
                                      k.view(1, 1, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
        ours_q, ours_k = ours(torch.tensor([position]), q, k)
        torch.testing.assert_close(ours_q, q4.transpose(1, 2).reshape(1, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_k, k4.transpose(1, 2).reshape(1, -1), rtol=1e-5, atol=1e-5)


def test_old_style_config_and_errors() -> None:
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0},
                          max_position_embeddings=32)
    assert get_rope_config(old) == (1e6, {"rope_type": "linear", "factor": 4.0})
    assert get_rope_config(SimpleNamespace(rope_theta=5e5, max_position_embeddings=32)) == (5e5, None)
    new = SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          max_position_embeddings=64)
    assert get_rope_config(new)[1]["original_max_position_embeddings"] == 64
    # A top-level original_max_position_embeddings wins over rope_scaling's, as in transformers.
    phi3 = SimpleNamespace(rope_theta=1e4, original_max_position_embeddings=8,
                           rope_scaling={"type": "yarn", "factor": 4.0,
                                         "original_max_position_embeddings": 16},
                           max_position_embeddings=64)
    assert get_rope_config(phi3)[1]["original_max_position_embeddings"] == 8
    with pytest.raises(UnsupportedModelError, match="longrope"):
        get_rope(16, 16, 32, 1e4, {"rope_type": "longrope", "factor": 2.0})


def test_partial_rotary_and_sharing() -> None:
    rope = get_rope(16, 8, 32, 1e4)
    assert get_rope(16, 8, 32, 1e4) is rope  # one table shared by every layer
    q, k = torch.randn(3, 2 * 16), torch.randn(3, 16)
    out_q, out_k = rope(torch.tensor([0, 5, 9]), q, k)
    assert torch.equal(out_q.view(3, 2, 16)[..., 8:], q.view(3, 2, 16)[..., 8:])
    assert torch.equal(out_k[:, 8:], k[:, 8:])
    torch.testing.assert_close(out_q[0], q[0])  # position 0 is the identity
    longer = get_rope(16, 8, 32, 1e4, num_positions=100)  # max_model_len past the config's
    assert longer.max_positions == 100
    assert torch.equal(longer.cos_sin_cache[:32], rope.cos_sin_cache)
