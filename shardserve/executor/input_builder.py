"""Turns one step's scheduled requests into the flat tensors the model and attention read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.engine.outputs import SchedulerOutput
from shardserve.executor.request_state import CachedRequestState, RequestStates
from shardserve.forward_context import AttentionMetadata


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    req_ids: list[str]  # scheduled requests, in batch order
    # Requests whose chunk reaches their last known token, so the step samples for them:
    sample_req_ids: list[str]
    sample_indices: torch.Tensor  # row of each one's last token in the flat batch
    # Requests with prompt logprobs whose chunk covers prompt positions: (req_id, start row,
    # first position, number of prompt positions in this chunk that predict a prompt token).
    prompt_logprob_spans: list[tuple[str, int, int, int]]


def build_model_inputs(out: SchedulerOutput, states: RequestStates, block_size: int,
                       device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    block_rows: list[list[int]] = []
    sample_req_ids: list[str] = []
    sample_indices: list[int] = []
    prompt_spans: list[tuple[str, int, int, int]] = []

    for rid, num_tokens in out.num_scheduled_tokens.items():
        state: CachedRequestState = states.states[rid]
        start = state.num_computed_tokens
        end = start + num_tokens
        row0 = len(input_ids)
        input_ids.extend(state.token_ids[start:end])
        positions.extend(range(start, end))
        blocks = state.block_ids
        slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size
                            for p in range(start, end))
        query_start_loc.append(len(input_ids))
        seq_lens.append(end)
        block_rows.append(blocks)
        if end == len(state.token_ids):
            sample_req_ids.append(rid)
            sample_indices.append(len(input_ids) - 1)
        if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
            # Position p's logits score prompt token p + 1.
            num_pred = min(end, state.num_prompt_tokens - 1) - start
            prompt_spans.append((rid, row0, start, num_pred))

    max_blocks = max((len(b) for b in block_rows), default=0)
    block_tables = torch.zeros(len(block_rows), max(max_blocks, 1), dtype=torch.int32)
    for i, row in enumerate(block_rows):
        block_tables[i, :len(row)] = torch.tensor(row, dtype=torch.int32)

    def dev(data, dtype):
        return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)

    metadata = AttentionMetadata(
        query_start_loc=dev(query_start_loc, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        block_tables=block_tables.to(device, non_blocking=True),
        slot_mapping=dev(slot_mapping, torch.int64),
        max_query_len=max((b - a for a, b in zip(query_start_loc, query_start_loc[1:])), default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return ModelInputs(dev(input_ids, torch.long), dev(positions, torch.long), metadata,
                       list(out.num_scheduled_tokens), sample_req_ids,
                       dev(sample_indices, torch.long), prompt_spans)
