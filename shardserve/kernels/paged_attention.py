"""One step's attention over the paged KV cache, each request sent to the kernel made for it:
decode rows (one query token) to the split-K decode kernel, prefill and chunked-prefill chunks
to the varlen prefill kernel. A mixed step launches both, each skipping the other's requests:
in a prefill query tile a decode row is one valid token of BLOCK_Q, and the tile still walks
that request's whole context (kernels_bench on an H200: 1,536 prompt tokens beside 512 decodes
took 1.21 ms in the prefill kernel alone, 8x a 2,048-token prompt's 0.15 ms; 0.66 ms split).
Reference: `paged_attention_ref.paged_attention_ref`. The engine's TritonAttentionBackend and
benchmarks/kernels_bench.py both call this, so the benchmark times what the engine runs."""

from __future__ import annotations

import torch

from shardserve.kernels.decode_attention import decode_attention
from shardserve.kernels.prefill_attention import prefill_attention


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, max_seq_len: int, scale: float,
                    out: torch.Tensor, *, has_prefills: bool, has_decodes: bool,
                    decode_split_rows: int | None = None, **prefill_tiles: int) -> torch.Tensor:
    """Fill out [num_tokens, num_heads, head_size]. has_prefills / has_decodes: whether some
    request has several query tokens / exactly one (host values: nothing here syncs with the
    GPU). decode_split_rows: the decode rows to size the decode kernel's split count for
    (default: every request). prefill_tiles: the prefill kernel's tile overrides (benchmark
    sweeps)."""
    if has_prefills:
        prefill_attention(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                          scale, out, skip_decodes=has_decodes, **prefill_tiles)
    if has_decodes:
        decode_attention(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                         max_seq_len, scale, out, split_rows=decode_split_rows)
    return out
