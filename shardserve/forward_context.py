"""Per-step state the attention layers read, so models stay `forward(input_ids, positions)`."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each query may see.

    Tokens of all scheduled requests are packed into one flat batch:

        query_start_loc  [0, q0, q0+q1, ...]        (cu_seqlens_q, int32, num_reqs + 1)
        seq_lens         [s0, s1, ...]              tokens in context after this step, int32
        block_tables     [num_reqs, max_blocks]     physical block ids, int32, padded with 0
        slot_mapping     [num_tokens]               block_id * block_size + offset, int64

    Request i's queries are the last q_i positions of its s_i-token context (causal).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, for the torch reference path and for kernels' launch grids.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # How many decode rows the decode kernel sizes its split count for, instead of num_reqs:
    # a CUDA graph of a step with prompt tokens has a row for every request such a step could
    # hold, and most are empty on any one replay (executor/cuda_graph.py).
    decode_split_rows: int | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @functools.cached_property
    def has_decodes(self) -> bool:
        """Some request has exactly one query token (a decode row) this step: worked out once
        a step from the host copy, however many layers ask."""
        qsl = self.query_start_loc_cpu
        return any(b - a == 1 for a, b in zip(qsl, qsl[1:]))


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None


_forward_context: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _forward_context is None:
        raise RuntimeError("No forward context: models run inside set_forward_context().")
    return _forward_context


@contextlib.contextmanager
def set_forward_context(attn_metadata: AttentionMetadata | None) -> Iterator[None]:
    global _forward_context
    prev = _forward_context
    _forward_context = ForwardContext(attn_metadata)
    try:
        yield
    finally:
        _forward_context = prev
