"""Which steps get a CUDA graph: the ladders of captured sizes (executor/cuda_graph.py), kept
free of torch so the planner (planner/memory.py) sizes the graphs' memory from the same lists.

Decode steps (one token per request) are captured by batch size on a fine ladder: decode is
where a step is short enough for padding to show. Steps with prompt tokens ("mixed": prefill
chunks, with or without decode rows) are captured by token count on a coarser one, about a
quarter apart: a prompt step of 100-500 tokens is host-bound when eager (hundreds of kernel
launches from Python against a few ms of GPU work), and padding it by up to a quarter costs
less than those launches.
"""

from __future__ import annotations

# Token counts of the mixed ladder up to 512; above, every 128.
_MIXED_LADDER = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 448, 512)
MIN_MIXED_TOKENS = 3  # a capture needs one prompt row of 2+ tokens and one decode row


def decode_capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every 8, and max_batch_size itself."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size] + list(range(8, max_batch_size + 1, 8))
    if sizes and sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def mixed_capture_sizes(max_tokens: int, max_model_len: int | None = None,
                        max_num_seqs: int | None = None) -> list[int]:
    """Token counts captured for steps with prompt tokens, up to max_tokens (included).

    A step of n tokens replays the next size up, s, and its s - n padding tokens attend as one
    request of their own: that request must fit in a block-table row, so the ladder stops
    below the first size whose padding could exceed max_model_len. No step holds more than
    max_num_seqs requests of max_model_len tokens: no size goes above that either (such a
    graph would never replay, and its capture's one long prompt would read block-table
    entries past the runner's rows)."""
    if max_model_len is not None and max_num_seqs is not None:
        max_tokens = min(max_tokens, max_num_seqs * max_model_len)
    if max_tokens < MIN_MIXED_TOKENS:
        return []
    ladder = [s for s in _MIXED_LADDER if s < max_tokens]
    ladder += list(range(_MIXED_LADDER[-1] + 128, max_tokens, 128)) + [max_tokens]
    sizes: list[int] = []
    for size in ladder:
        # The smallest step with prompt tokens has 2 (one prompt row of 2): it pads the most.
        below = sizes[-1] if sizes else 1
        if max_model_len is not None and size - below - 1 > max_model_len:
            break
        sizes.append(size)
    return sizes


def mixed_rows(num_tokens: int, max_num_seqs: int) -> int:
    """Request rows of the mixed graph for num_tokens: every request a step of that many
    tokens can hold (one has 2+ tokens, so at most num_tokens - 1; at most max_num_seqs), and
    one more for the padding tokens, which replay as a request of their own."""
    return min(num_tokens - 1, max_num_seqs) + 1
