"""The CUDA attention backend: Triton kernels over the paged KV cache (kernels/store_kv.py,
kernels/rotary_store.py, kernels/paged_attention.py over the prefill and decode kernels). Same
static interface as TorchAttentionBackend; imported only when a CUDA device asks for it, so
CPU-only installs never import Triton."""

from __future__ import annotations

import torch

from shardserve.forward_context import AttentionMetadata
from shardserve.kernels.paged_attention import paged_attention
from shardserve.kernels.rotary_store import rotary_store_kv_
from shardserve.kernels.store_kv import store_kv
from shardserve.layers.rotary import RotaryEmbedding


class TritonAttentionBackend:
    """Decode rows take the split-K decode kernel and prefill chunks the varlen prefill kernel,
    both in a mixed step (kernels/paged_attention.py). Grids are sized from the host copies in
    AttentionMetadata: nothing here syncs with the GPU."""

    name = "triton"
    # Grids depend only on host values fixed at capture (max_seq_len = max_model_len), and
    # the prefill kernel's on tensor shapes alone: steps with prompt tokens replay too.
    supports_cuda_graphs = True
    supports_mixed_cuda_graphs = True

    @staticmethod
    def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kv(key, value, k_cache, v_cache, slot_mapping)

    @staticmethod
    def rotate_and_store(positions, query, key, value, k_cache, v_cache, slot_mapping,
                         rotary) -> bool:
        """RoPE of query [T, H, D] and key [T, Hkv, D] in place, then key and value into the
        cache, in one launch (kernels/rotary_store.py) for any RotaryEmbedding of this head
        size (neox or GPT-J style, partial rotary_dim). False, with nothing done, otherwise."""
        if not (isinstance(rotary, RotaryEmbedding) and rotary.head_size == key.shape[-1]
                and query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1):
            return False
        rotary_store_kv_(positions, query, key, value, k_cache, v_cache, slot_mapping,
                         rotary.cos_sin_cache, rotary.rotary_dim, rotary.is_neox_style)
        return True

    @staticmethod
    def forward(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        prefills = metadata.max_query_len > 1
        return paged_attention(query, k_cache, v_cache, metadata.query_start_loc,
                               metadata.seq_lens, metadata.block_tables, metadata.max_seq_len,
                               scale, out, has_prefills=prefills,
                               has_decodes=not prefills or metadata.has_decodes,
                               decode_split_rows=metadata.decode_split_rows)
