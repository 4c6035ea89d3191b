"""Turns one step's scheduled requests into the flat tensors the model and attention read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    # Async scheduling: rows of input_ids whose token the previous step is still sampling
    # (filled on the device from its output), and whose request each one is.
    placeholder_rows: list[int]
    placeholder_req_ids: list[str]
    # Per sampled request: its output tokens so far (for min_tokens; counts the placeholders).
    sample_num_outputs: list[int]


def build_model_inputs(out: SchedulerOutput, states: RequestStates, block_size: int,
                       device: torch.device) -> ModelInputs:
    num_reqs = len(out.num_scheduled_tokens)
    req_states: list[CachedRequestState] = [states.states[rid] for rid in out.num_scheduled_tokens]
    num_sched = np.fromiter(out.num_scheduled_tokens.values(), dtype=np.int64, count=num_reqs)
    starts = np.fromiter((s.num_computed_tokens for s in req_states), dtype=np.int64, count=num_reqs)
    ends = starts + num_sched
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(num_sched, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    input_ids: list[int] = []
    placeholder_rows: list[int] = []
    placeholder_req_ids: list[str] = []
    max_blocks = 1
    for rid, state, start, end in zip(out.num_scheduled_tokens, req_states, starts.tolist(),
                                      ends.tolist()):
        input_ids.extend(state.token_ids[start:end])
        if end > len(state.token_ids):
            # Async scheduling: the last position's token is being sampled by the step before
            # (at most one, since at most two steps are in flight).
            placeholder_rows.append(len(input_ids))
            placeholder_req_ids.append(rid)
            input_ids.append(0)
        max_blocks = max(max_blocks, len(state.block_ids))
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int32)
    for i, state in enumerate(req_states):
        block_tables[i, :len(state.block_ids)] = state.block_ids

    # Every token's position and the slot its K/V goes to, without a per-token Python loop.
    req_of_token = np.repeat(np.arange(num_reqs), num_sched)
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, num_sched)
    slot_mapping = (block_tables[req_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)

    sample_req_ids: list[str] = []
    sample_indices: list[int] = []
    sample_num_outputs: list[int] = []
    prompt_spans: list[tuple[str, int, int, int]] = []
    qsl = query_start_loc.tolist()
    for i, (rid, state) in enumerate(zip(out.num_scheduled_tokens, req_states)):
        start, end = int(starts[i]), int(ends[i])
        if end >= len(state.token_ids):  # past the known tokens: a placeholder's step
            sample_req_ids.append(rid)
            sample_indices.append(qsl[i + 1] - 1)
            sample_num_outputs.append(end - state.num_prompt_tokens)
        if state.sampling_params.prompt_logprobs is not None and start < state.num_prompt_tokens - 1:
            # Position p's logits score prompt token p + 1.
            prompt_spans.append((rid, qsl[i], start, min(end, state.num_prompt_tokens - 1) - start))

    def dev(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if device.type == "cpu":
            return tensor
        # From pinned memory, so the copy is queued behind the running step instead of
        # making the host wait for it (a pageable copy may synchronise with the stream).
        return tensor.pin_memory().to(device, non_blocking=True)

    seq_lens = ends.astype(np.int32)
    metadata = AttentionMetadata(
        query_start_loc=dev(query_start_loc.astype(np.int32)),
        seq_lens=dev(seq_lens),
        block_tables=dev(block_tables),
        slot_mapping=dev(slot_mapping),
        max_query_len=int(num_sched.max()) if num_reqs else 0,
        max_seq_len=int(ends.max()) if num_reqs else 0,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens.tolist(),
    )
    return ModelInputs(dev(np.asarray(input_ids, dtype=np.int64)), dev(positions), metadata,
                       list(out.num_scheduled_tokens), sample_req_ids,
                       dev(np.asarray(sample_indices, dtype=np.int64)), prompt_spans,
                       placeholder_rows, placeholder_req_ids, sample_num_outputs)
