"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

The layer caches, per token, only [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)] - 576 values
for DeepSeek-V2/V3 instead of num_heads x (K + V) head dims - in one tensor per layer:

    [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]

(every TP rank keeps the whole latent: it is shared by all heads). The math of the two ways to
attend over it - decompressed through kv_b_proj, or with kv_b_proj's halves absorbed into the
query and the output - is in kernels/mla_attention_ref.py. Per step:

    decode-only step (max_query_len 1; CUDA graphs replay these)  -> absorbed, batched
    mixed step: requests with 1 query token                        -> absorbed, batched
                requests with a prefill chunk (q_len > 1)          -> decompressed, per request
    no cache yet (profiling run, tests)                            -> decompressed, one sequence

The absorbed decode runs on a small backend chosen from the model runner's: Triton on CUDA
(kernels/mla_decode.py), the batched torch reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from shardserve.forward_context import AttentionMetadata, get_forward_context
from shardserve.kernels.mla_attention_ref import (attend_decompressed, gather_latent,
                                                  mla_absorbed_decode_ref, split_kv_b,
                                                  store_latent_ref)
from shardserve.layers.attention import AttentionLayerBase


class TorchMLABackend:
    """Reference latent store and absorbed decode: any device, not fast."""

    name = "torch"
    supports_cuda_graphs = False

    @staticmethod
    def store_latent(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
        store_latent_ref(kv_c, k_pe, cache, slot_mapping)

    @staticmethod
    def decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               md: AttentionMetadata, scale: float) -> torch.Tensor:
        return mla_absorbed_decode_ref(q_lat, q_pe, cache, md.block_tables, md.seq_lens, scale)


class TritonMLABackend:
    """CUDA: the store_kv kernel writes the latent (padding slots -1 skipped, graph-safe) and
    the split-K MLA decode kernel attends."""

    name = "triton"
    supports_cuda_graphs = True

    @staticmethod
    def store_latent(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
        from shardserve.kernels.store_kv import store_kv

        # The cache as one "KV head" of L + R dims; K and V are the same tensor here, so the
        # kernel's second write repeats the first (a few KB per step).
        latent = torch.cat([kv_c, k_pe], dim=-1).to(cache.dtype).unsqueeze(1)
        view = cache.unsqueeze(2)
        store_kv(latent, latent, view, view, slot_mapping)

    @staticmethod
    def decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               md: AttentionMetadata, scale: float) -> torch.Tensor:
        from shardserve.kernels.mla_decode import mla_decode

        return mla_decode(q_lat, q_pe, cache, md.query_start_loc, md.seq_lens, md.block_tables,
                          md.max_seq_len, scale)


def select_mla_backend(attention_backend) -> type:
    """The MLA counterpart of the runner's attention backend (Triton only where it runs)."""
    triton = getattr(attention_backend, "name", "") == "triton"
    return TritonMLABackend if triton else TorchMLABackend


class MLAAttention(AttentionLayerBase):
    """q_nope [T, H, Dn], q_pe [T, H, R] (rotated), kv_c [T, L] (after kv_a_layernorm),
    k_pe [T, R] (rotated) in; [T, H * Dv] out. H is this rank's heads; kv_b_proj is the
    attention block's (column-parallel, so its rows are this rank's heads)."""

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, kv_lora_rank: int, scale: float, kv_b_proj: nn.Module,
                 layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = v_head_dim, kv_lora_rank
        self.scale = scale
        self.layer_idx = layer_idx
        # What one token stores: one latent "head" (see AttentionLayerBase).
        self.num_kv_heads, self.head_size = 1, kv_lora_rank + qk_rope_head_dim
        # A plain tuple: the projection is the attention block's module, not registered twice.
        self._kv_b_proj = (kv_b_proj,)
        self.kv_cache: torch.Tensor | None = None
        self.backend: type = TorchMLABackend

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        return [(num_blocks, block_size, self.head_size)]

    def bind_kv_cache(self, kv_cache: torch.Tensor, backend) -> None:
        self.kv_cache, self.backend = kv_cache, select_mla_backend(backend)

    @property
    def kv_b_weight(self) -> torch.Tensor:
        return self._kv_b_proj[0].weight

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
                k_pe: torch.Tensor) -> torch.Tensor:
        num_tokens = q_nope.shape[0]
        md = get_forward_context().attn_metadata
        if md is None or self.kv_cache is None:
            # Profiling run before the cache exists: the batch as one causal sequence.
            latent = torch.cat([kv_c, k_pe], dim=-1)
            out = attend_decompressed(q_nope, q_pe, latent, self.kv_b_weight, self.scale)
        else:
            self.backend.store_latent(kv_c, k_pe, self.kv_cache, md.slot_mapping)
            if md.max_query_len <= 1:
                out = self._absorbed_decode(q_nope, q_pe, md)
            else:
                out = self._mixed(q_nope, q_pe, md)
        return out.reshape(num_tokens, self.num_heads * self.v_head_dim)

    def _absorbed_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         md: AttentionMetadata) -> torch.Tensor:
        """Row i is request i's one query -> [R, H, Dv]."""
        w_uk, w_uv = split_kv_b(self.kv_b_weight, self.num_heads, self.qk_nope_head_dim)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)          # [R, H, L]
        o_lat = self.backend.decode(q_lat, q_pe, self.kv_cache, md, self.scale)  # [R, H, L]
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _mixed(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
               md: AttentionMetadata) -> torch.Tensor:
        """Split on the host lists: decodes batched through the absorbed path, each prefill
        chunk decompressed over its context."""
        qsl, seq_lens = md.query_start_loc_cpu, md.seq_lens_cpu
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_head_dim)
        decode_reqs: list[int] = []
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            if end - start == 1:
                decode_reqs.append(i)
            elif end > start:
                latent = gather_latent(self.kv_cache, md.block_tables[i], seq_len)
                out[start:end] = attend_decompressed(q_nope[start:end], q_pe[start:end], latent,
                                                     self.kv_b_weight, self.scale)
        if decode_reqs:
            device = q_nope.device
            reqs = torch.tensor(decode_reqs, device=device)
            rows = torch.tensor([qsl[i] for i in decode_reqs], device=device)
            num = len(decode_reqs)
            sub = AttentionMetadata(
                query_start_loc=torch.arange(num + 1, dtype=torch.int32, device=device),
                seq_lens=md.seq_lens.index_select(0, reqs),
                block_tables=md.block_tables.index_select(0, reqs),
                slot_mapping=md.slot_mapping.index_select(0, rows),
                max_query_len=1, max_seq_len=max(seq_lens[i] for i in decode_reqs),
                query_start_loc_cpu=list(range(num + 1)),
                seq_lens_cpu=[seq_lens[i] for i in decode_reqs])
            out[rows] = self._absorbed_decode(q_nope[rows], q_pe[rows], sub)
        return out

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"rope={self.qk_rope_head_dim}, nope={self.qk_nope_head_dim}, "
                f"v={self.v_head_dim}, scale={self.scale:.4g}")
