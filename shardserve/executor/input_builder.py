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
    # Per sampled request: its state (what the sampler reads), aligned with sample_req_ids.
    sample_states: list[CachedRequestState]


def build_model_inputs(out: SchedulerOutput, states: RequestStates, block_size: int,
                       device: torch.device) -> ModelInputs:
    num_reqs = len(out.num_scheduled_tokens)
    lookup = states.states
    req_ids = list(out.num_scheduled_tokens)
    req_states: list[CachedRequestState] = [lookup[rid] for rid in req_ids]
    num_sched = np.fromiter(out.num_scheduled_tokens.values(), dtype=np.int64, count=num_reqs)
    starts = np.fromiter((s.num_computed_tokens for s in req_states), dtype=np.int64, count=num_reqs)
    ends = starts + num_sched
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(num_sched, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    scan = None
    if num_tokens == num_reqs:
        scan = _scan_placeholder_decode(req_ids, req_states, ends)
    if scan is None:
        scan = _scan_requests(req_ids, req_states, starts.tolist(), ends.tolist())
    (input_ids, placeholder_rows, placeholder_req_ids, sample_req_ids, sample_indices,
     sample_num_outputs, sample_states, prompt_spans) = scan

    # The block table from the persistent rows; every token's position and the slot its K/V
    # goes to, without a per-token Python loop.
    block_rows = np.fromiter((s.block_row for s in req_states), dtype=np.int64, count=num_reqs)
    block_tables = states.block_table.gather(block_rows)
    req_of_token = np.repeat(np.arange(num_reqs), num_sched)
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, num_sched)
    slot_mapping = (block_tables[req_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)

    seq_lens = ends.astype(np.int32)
    qsl_dev, seq_lens_dev, block_tables_dev = upload(
        [query_start_loc.astype(np.int32), seq_lens, block_tables], device)
    input_ids_dev, positions_dev, slot_mapping_dev, sample_indices_dev = upload(
        [np.asarray(input_ids, dtype=np.int64), positions, slot_mapping,
         np.asarray(sample_indices, dtype=np.int64)], device)
    metadata = AttentionMetadata(
        query_start_loc=qsl_dev,
        seq_lens=seq_lens_dev,
        block_tables=block_tables_dev,
        slot_mapping=slot_mapping_dev,
        max_query_len=int(num_sched.max()) if num_reqs else 0,
        max_seq_len=int(ends.max()) if num_reqs else 0,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )
    return ModelInputs(input_ids_dev, positions_dev, metadata, req_ids, sample_req_ids,
                       sample_indices_dev, prompt_spans, placeholder_rows, placeholder_req_ids,
                       sample_num_outputs, sample_states)


def _scan_requests(req_ids: list[str], req_states: list[CachedRequestState], starts: list[int],
                   ends: list[int]) -> tuple:
    """One pass over the requests for what needs their Python lists: input ids, placeholders,
    which requests sample, prompt-logprob spans."""
    input_ids: list[int] = []
    placeholder_rows: list[int] = []
    placeholder_req_ids: list[str] = []
    sample_req_ids: list[str] = []
    sample_indices: list[int] = []
    sample_num_outputs: list[int] = []
    sample_states: list[CachedRequestState] = []
    prompt_spans: list[tuple[str, int, int, int]] = []
    for rid, state, start, end in zip(req_ids, req_states, starts, ends):
        tokens = state.token_ids
        num_known = len(tokens)
        row0 = len(input_ids)
        input_ids.extend(tokens[start:end])
        if end > num_known:
            # Async scheduling: the last position's token is being sampled by the step before
            # (at most one, since at most two steps are in flight).
            placeholder_rows.append(len(input_ids))
            placeholder_req_ids.append(rid)
            input_ids.append(0)
        if end >= num_known:  # past the known tokens: a placeholder's step
            sample_req_ids.append(rid)
            sample_indices.append(len(input_ids) - 1)
            sample_num_outputs.append(end - state.num_prompt_tokens)
            sample_states.append(state)
        if (state.sampling_params.prompt_logprobs is not None
                and start < state.num_prompt_tokens - 1):
            # Position p's logits score prompt token p + 1.
            prompt_spans.append((rid, row0, start, min(end, state.num_prompt_tokens - 1) - start))
    return (input_ids, placeholder_rows, placeholder_req_ids, sample_req_ids, sample_indices,
            sample_num_outputs, sample_states, prompt_spans)


def _scan_placeholder_decode(req_ids: list[str], req_states: list[CachedRequestState],
                             ends: np.ndarray) -> tuple | None:
    """_scan_requests' result without a Python pass, for the async decode steady state: one
    token per request, each on a placeholder (the step before is sampling it). Row i is then
    request i, every row samples, and none is in its prompt. None for any other step."""
    num_reqs = len(req_ids)
    num_known = np.fromiter((len(s.token_ids) for s in req_states), dtype=np.int64,
                            count=num_reqs)
    if not (ends > num_known).all():
        return None
    num_prompt = np.fromiter((s.num_prompt_tokens for s in req_states), dtype=np.int64,
                             count=num_reqs)
    rows = np.arange(num_reqs, dtype=np.int64)
    return (np.zeros(num_reqs, dtype=np.int64), list(range(num_reqs)), list(req_ids),
            list(req_ids), rows, (ends - num_prompt).tolist(), list(req_states), [])


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def upload(arrays: list[np.ndarray], device: torch.device,
           pack: bool | None = None) -> list[torch.Tensor]:
    """The arrays (one dtype) as tensors on `device`. On the CPU they are the arrays' own memory.
    Otherwise they travel together: packed into one pinned buffer, copied with one
    non-blocking copy (queued behind the running step instead of making the host wait for it),
    and returned as views of the device copy, each starting on a 16-byte boundary. A pinned
    staging copy and a copy launch cost the host ~10-20 us each; a step has seven arrays.
    `pack` forces the packed path (tests run it on the CPU)."""
    if pack is None:
        pack = device.type != "cpu"
    if not pack:
        return [torch.from_numpy(a) for a in arrays]
    dtype = arrays[0].dtype
    align = max(16 // dtype.itemsize, 1)
    offsets = []
    total = 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.size // align) * align
    # From the caching host allocator: the buffer is not reused before its copy is done.
    host = torch.empty(max(total, 1), dtype=_TORCH_DTYPES[dtype],
                       pin_memory=device.type == "cuda")
    flat = host.numpy()
    for a, off in zip(arrays, offsets):
        flat[off:off + a.size] = a.reshape(-1)
    moved = host.to(device, non_blocking=True)
    return [moved[off:off + a.size].view(a.shape) for a, off in zip(arrays, offsets)]
