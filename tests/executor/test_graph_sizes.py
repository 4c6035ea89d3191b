"""The CUDA-graph ladders (executor/graph_sizes.py): which decode batches and which steps with
prompt tokens replay a captured graph, and how many request rows a mixed graph holds."""

from __future__ import annotations

import pytest

from shardserve.executor.graph_sizes import (MIN_MIXED_TOKENS, decode_capture_sizes,
                                             mixed_capture_sizes, mixed_rows)


def test_decode_ladder():
    assert decode_capture_sizes(1) == [1]
    assert decode_capture_sizes(3) == [1, 2, 3]
    assert decode_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert decode_capture_sizes(512)[-3:] == [496, 504, 512]


@pytest.mark.parametrize("max_tokens", [3, 15, 16, 17, 100, 512, 513, 1000, 2048])
def test_mixed_ladder_covers_every_step_up_to_the_top(max_tokens):
    sizes = mixed_capture_sizes(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    assert sizes[0] >= MIN_MIXED_TOKENS
    # Padding stays under half the step from 32 tokens on (at most a quarter from 64).
    for below, size in zip(sizes, sizes[1:]):
        if below >= 64:
            assert size - below <= max(below // 4, 128) or size == max_tokens


def test_mixed_ladder_needs_room_for_a_capture():
    assert mixed_capture_sizes(0) == [] and mixed_capture_sizes(2) == []
    assert mixed_capture_sizes(512)[:4] == [16, 32, 48, 64]


@pytest.mark.parametrize("max_model_len", [12, 13, 14, 20, 40, 64, 100, 127])
def test_mixed_padding_fits_one_sequence(max_model_len):
    """The padding tokens of a step replay as one request, which must fit max_model_len."""
    sizes = mixed_capture_sizes(1024, max_model_len)
    below = 1  # the smallest step with prompt tokens: one prompt of 2
    for size in sizes:
        assert size - below - 1 <= max_model_len  # the most padding a step of below+1 gets
        below = size
    if max_model_len < 14:  # 16 - 2: even the smallest size could pad past it
        assert sizes == []
    elif max_model_len < 127:  # gaps of 128 above 512 pad up to 127 tokens
        assert sizes and sizes[-1] < 1024  # stopped where a gap got too wide
    else:
        assert sizes == mixed_capture_sizes(1024)


def test_mixed_ladder_stops_at_the_largest_step():
    """No step holds more than max_num_seqs requests of max_model_len tokens each."""
    assert mixed_capture_sizes(512, 128, max_num_seqs=1) == [16, 32, 48, 64, 80, 96, 128]
    assert mixed_capture_sizes(512, 100, max_num_seqs=2)[-1] == 200
    assert mixed_capture_sizes(512, 4096, max_num_seqs=1) == mixed_capture_sizes(512, 4096)


def test_mixed_rows():
    assert mixed_rows(16, 256) == 16  # 15 requests at most (one has 2+ tokens), + padding
    assert mixed_rows(512, 256) == 257
    assert mixed_rows(3, 1) == 2
