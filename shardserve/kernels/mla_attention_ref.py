"""Torch multi-head latent attention (DeepSeek-V2/V3 MLA) over a paged latent cache: the CPU
path and the yardstick for kernels/mla_decode.py.

One cache tensor per layer, one row per token (no heads):

    [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]
     row = [ c_kv: the compressed latent after kv_a_layernorm (L) | k_pe: its rotated key (R) ]

kv_b_proj (this rank's heads) turns a latent into per-head keys and values:

    kv_b_weight [num_heads * (Dn + Dv), L]  viewed [num_heads, Dn + Dv, L]:
        W_UK = [:, :Dn, :]  c_kv -> k_nope (Dn per head)
        W_UV = [:, Dn:, :]  c_kv -> v      (Dv per head)

    score(q, token) = q_nope . (W_UK c_kv) + q_pe . k_pe

Two ways to compute the same attention:

- decompressed (`mla_decompress_ref`): expand every cached latent of a request through kv_b_proj
  into full keys/values, then ordinary causal attention with head size Dn + R. Simple; what
  transformers does. Costs a [S, L] x [L, H*(Dn+Dv)] product per request and step, so it suits
  prefill (many queries share the expansion), not decode.
- absorbed (`mla_absorbed_decode_ref`): since q_nope . (W_UK c) = (W_UK^T q_nope) . c, fold W_UK
  into the query once (q_lat = W_UK^T q_nope, L dims per head) and attend straight over the
  latents - multi-query attention with one "KV head" of L + R dims whose values are the c_kv
  part; the output o_lat (L per head) leaves through W_UV. Nothing per cached token but one
  read of its L + R values: the decode algorithm, which the Triton kernel runs on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_latent_ref(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Write [c_kv | k_pe] of each token ([T, L], [T, R]) into its slot; slots < 0 are padding."""
    latent = torch.cat([kv_c, k_pe], dim=-1).to(cache.dtype)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        latent, slot_mapping = latent[valid], slot_mapping[valid]
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent)


def gather_latent(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached rows of one request: [seq_len, L + R]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, cache.shape[-1])[:seq_len]


def split_kv_b(kv_b_weight: torch.Tensor, num_heads: int,
               qk_nope_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_UK [H, Dn, L], W_UV [H, Dv, L]) as views of kv_b_proj's weight."""
    w = kv_b_weight.view(num_heads, -1, kv_b_weight.shape[-1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def attend_decompressed(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        kv_b_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries [q_len, H, Dn] / [q_len, H, R], the last q_len positions of a context whose
    latents are `latent` [S, L + R], causally -> [q_len, H, Dv]."""
    q_len, num_heads, dn = q_nope.shape
    rope = q_pe.shape[-1]
    kv_lora_rank = latent.shape[-1] - rope
    seq_len = latent.shape[0]
    kv = F.linear(latent[:, :kv_lora_rank], kv_b_weight).view(seq_len, num_heads, -1)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k_pe = latent[:, None, kv_lora_rank:].expand(seq_len, num_heads, rope)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)               # [H, q_len, Dn + R]
    k = torch.cat([k_nope, k_pe.to(k_nope.dtype)], dim=-1).transpose(0, 1)
    if q_len == seq_len:
        mask = None
    else:  # query j sits at position seq_len - q_len + j
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), attn_mask=mask,
                                         is_causal=mask is None, scale=scale)
    return out.transpose(0, 1)


def mla_decompress_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                       kv_b_weight: torch.Tensor, block_tables: torch.Tensor,
                       query_start_loc: list[int], seq_lens: list[int], scale: float,
                       v_head_dim: int) -> torch.Tensor:
    """Packed queries [T, H, Dn] / [T, H, R] of the requests (host lists as in
    AttentionMetadata) over the paged latent cache, one request at a time -> [T, H, Dv]."""
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], v_head_dim)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end == start:
            continue
        latent = gather_latent(cache, block_tables[i], seq_len)
        out[start:end] = attend_decompressed(q_nope[start:end], q_pe[start:end], latent,
                                             kv_b_weight, scale)
    return out


def mla_absorbed_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """One query per request (row i is request i's last position): q_lat [R, H, L] (= W_UK^T
    q_nope), q_pe [R, H, rope] over the first seq_lens[i] latents of each request -> o_lat
    [R, H, L]. Batched over requests with no Python loop: every request's block-table row is
    gathered and keys past its seq_len masked."""
    num_reqs, _, kv_lora_rank = q_lat.shape
    if num_reqs == 0:
        return q_lat.new_empty(q_lat.shape)
    latent = cache[block_tables.long()].flatten(1, 2).float()         # [R, S_max, L + R]
    positions = torch.arange(latent.shape[1], device=q_lat.device)
    valid = positions[None, :] < seq_lens.to(q_lat.device).long()[:, None]   # [R, S_max]
    # Rows past seq_len may hold anything (stale or never written): zero them, as a kernel's
    # masked loads would, so 0 x NaN cannot leak into the output.
    latent = latent.masked_fill(~valid[..., None], 0.0)
    c_kv, k_pe = latent[..., :kv_lora_rank], latent[..., kv_lora_rank:]
    scores = (torch.einsum("rhl,rsl->rhs", q_lat.float(), c_kv)
              + torch.einsum("rhp,rsp->rhs", q_pe.float(), k_pe)) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("rhs,rsl->rhl", probs, c_kv).to(q_lat.dtype)
