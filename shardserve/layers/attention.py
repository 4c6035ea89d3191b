"""Attention over the paged KV cache. Models call `Attention(q, k, v)`, or
`Attention(q, k, v, positions, rotary)` to have q and k rotated (RoPE) first; the layer reads
the step's AttentionMetadata from the forward context and its own cache tensors, which the
model runner binds after sizing the cache (`bind_kv_cache`).

A backend is a class of static methods: `store_kv`, `forward`, and `rotate_and_store`, which
rotates q and k in place and stores k and v in one go where the backend has a fused kernel for
that rotary embedding, and returns False (having done nothing) where it has not; the layer
then rotates (RotaryEmbedding.forward) and calls store_kv."""

from __future__ import annotations

import logging

import torch
from torch import nn

from shardserve.forward_context import get_forward_context
from shardserve.kernels.paged_attention_ref import (causal_sdpa_like_hf, paged_attention_ref,
                                                    store_kv_ref)
from shardserve.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


class TorchAttentionBackend:
    """The reference path: correct on any device, not fast."""

    name = "torch"

    @staticmethod
    def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)

    @staticmethod
    def rotate_and_store(positions, query, key, value, k_cache, v_cache, slot_mapping,
                         rotary) -> bool:
        return False  # no fused path: the layer rotates, then calls store_kv

    @staticmethod
    def forward(query, k_cache, v_cache, metadata, scale) -> torch.Tensor:
        return paged_attention_ref(query, k_cache, v_cache, metadata.block_tables,
                                   metadata.query_start_loc_cpu, metadata.seq_lens_cpu, scale)


def select_attention_backend(device: torch.device | str):
    """One small interface, chosen per device: Triton kernels on CUDA, the torch reference
    elsewhere (and on CUDA when Triton is missing, with a warning)."""
    if torch.device(device).type != "cuda":
        return TorchAttentionBackend
    try:
        from shardserve.layers.triton_attention import TritonAttentionBackend
    except ImportError as e:  # pragma: no cover - only on a CUDA machine without triton
        logger.warning("Triton unavailable (%s): using the torch reference attention", e)
        return TorchAttentionBackend
    return TritonAttentionBackend


class AttentionLayerBase(nn.Module):
    """What the model runner needs of an attention layer with a paged cache: the cache tensors
    it wants (`kv_cache_shapes`, in that order, allocated in the KV cache dtype: the model's
    unless --kv-cache-dtype says otherwise) and a way to take them
    (`bind_kv_cache(*caches, backend)`). The layout is the layer's business: K and V per
    head here, one compressed latent per token in MLA (layers/mla_attention.py).
    num_kv_heads x head_size is what one token stores per layer, for logs and kv_cache_info."""

    num_kv_heads: int
    head_size: int

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def bind_kv_cache(self, *caches_and_backend) -> None:
        raise NotImplementedError


class Attention(AttentionLayerBase):
    """Paged attention for one layer: q [T, num_heads*head_size], k/v [T, num_kv_heads*head_size]
    (this rank's heads) in, [T, num_heads*head_size] out."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = TorchAttentionBackend

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        """K and V: [num_blocks, block_size, num_kv_heads, head_size] each."""
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_size)
        return [shape, shape]

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, backend) -> None:
        self.k_cache, self.v_cache, self.backend = k_cache, v_cache, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None,
                rotary: RotaryEmbedding | None = None) -> torch.Tensor:
        """With rotary (and positions [T]), q and k are rotated before attention, in place
        where the backend fuses the rotation with the cache write (rotate_and_store)."""
        md = get_forward_context().attn_metadata
        num_tokens = q.shape[0]
        if md is None or self.k_cache is None:
            # Profiling run before the cache exists: plain causal attention over the batch.
            if rotary is not None:
                q, k = rotary(positions, q, k)
            out = causal_sdpa_like_hf(*self._split_heads(q, k, v), self.scale)
        else:
            q, k, v = self._rotate_and_store(q, k, v, positions, rotary, md.slot_mapping)
            out = self.backend.forward(q, self.k_cache, self.v_cache, md, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_size)

    def _split_heads(self, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = q.shape[0]
        return (q.view(num_tokens, self.num_heads, self.head_size),
                k.view(num_tokens, self.num_kv_heads, self.head_size),
                v.view(num_tokens, self.num_kv_heads, self.head_size))

    def _rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor | None, rotary: RotaryEmbedding | None,
                          slot_mapping: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoPE (if any) on q and k, then k and v into the cache -> q, k, v per head."""
        heads = self._split_heads(q, k, v)
        if rotary is not None:
            if self.backend.rotate_and_store(positions, *heads, self.k_cache, self.v_cache,
                                             slot_mapping, rotary):
                return heads  # rotated in place and stored, one launch
            q, k = rotary(positions, q, k)
            heads = self._split_heads(q, k, v)
        self.backend.store_kv(heads[1], heads[2], self.k_cache, self.v_cache, slot_mapping)
        return heads
