"""Packed requests over the paged KV cache: a prefill of two requests, then a decode step,
give transformers' logits for each request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.models.tiny_checkpoints import VOCAB, hf_logits, load_ours, save_tiny_checkpoint

from shardserve.forward_context import AttentionMetadata, set_forward_context
from shardserve.layers.attention import Attention, TorchAttentionBackend

BLOCK_SIZE, NUM_BLOCKS = 4, 8


def _metadata(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              slots: list[int]) -> AttentionMetadata:
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=list(seq_lens))


def _slots(block_table: list[int], positions: range) -> list[int]:
    return [block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


@pytest.mark.parametrize("name", ["llama_rope_llama3", "qwen3"])
def test_prefill_then_decode_matches_transformers(name: str, tmp_path: Path) -> None:
    hf = save_tiny_checkpoint(name, tmp_path)
    model = load_ours(tmp_path)
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = (NUM_BLOCKS, BLOCK_SIZE, layer.num_kv_heads, layer.head_size)
            layer.bind_kv_cache(torch.zeros(shape), torch.zeros(shape), TorchAttentionBackend)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, VOCAB, (8,), generator=gen), torch.randint(0, VOCAB, (6,), generator=gen)
    tables = [[0, 1], [3, 5]]

    prefill = _metadata([7, 5], [7, 5], tables, _slots(tables[0], range(7)) + _slots(tables[1], range(5)))
    with torch.no_grad(), set_forward_context(prefill):
        hidden = model(torch.cat([a[:7], b[:5]]), torch.cat([torch.arange(7), torch.arange(5)]))
        logits = model.compute_logits(hidden[[6, 11]])
    decode = _metadata([1, 1], [8, 6], tables, _slots(tables[0], range(7, 8)) + _slots(tables[1], range(5, 6)))
    with torch.no_grad(), set_forward_context(decode):
        step = model.compute_logits(model(torch.stack([a[7], b[5]]), torch.tensor([7, 5])))

    for i, (tokens, prompt_len) in enumerate(((a, 7), (b, 5))):
        ref = hf_logits(hf, tokens[:prompt_len + 1])
        torch.testing.assert_close(logits[i], ref[prompt_len - 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[i], ref[prompt_len], rtol=1e-4, atol=1e-4)
