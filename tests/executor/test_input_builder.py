"""build_model_inputs against a per-token reference: chunked prefill, decode, async
placeholders, prompt-logprob spans, block tables from the persistent rows; and `upload`'s packed
transfer (one buffer, views on 16-byte boundaries)."""

from __future__ import annotations

import numpy as np
import torch

from shardserve.engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from shardserve.executor.input_builder import build_model_inputs, upload
from shardserve.executor.request_state import RequestStates
from shardserve.sampling_params import SamplingParams

BS = 4


def new(rid, prompt, blocks, computed=0, outputs=(), **params):
    return NewRequestData(rid, list(prompt), list(outputs), SamplingParams(**params), blocks,
                          computed, [2])


def reference(out: SchedulerOutput, states: RequestStates):
    ids, pos, slots, samples, placeholders = [], [], [], [], []
    for rid, n in out.num_scheduled_tokens.items():
        s = states.states[rid]
        table = states.block_table.table[s.block_row]
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            if p < len(s.token_ids):
                ids.append(s.token_ids[p])
            else:
                placeholders.append(len(ids))
                ids.append(0)
            pos.append(p)
            slots.append(int(table[p // BS]) * BS + p % BS)
        if s.num_computed_tokens + n >= len(s.token_ids):
            samples.append((rid, len(ids) - 1))
    return ids, pos, slots, samples, placeholders


def test_mixed_step_matches_reference() -> None:
    states = RequestStates(torch.device("cpu"))
    states.update(SchedulerOutput(
        [new("a", range(10, 19), [3, 5, 8]),  # 9-token prompt, chunk of 6
         new("b", range(20, 25), [1, 2], computed=4),  # prefix hit: one token left
         new("c", range(30, 33), [4], prompt_logprobs=1)],
        [], {"a": 6, "b": 1, "c": 3}, 10, set()))
    out = SchedulerOutput([], [], {"a": 6, "b": 1, "c": 3}, 10, set())
    inputs = build_model_inputs(out, states, BS, torch.device("cpu"))
    ids, pos, slots, samples, placeholders = reference(out, states)
    assert inputs.input_ids.tolist() == ids
    assert inputs.positions.tolist() == pos
    assert inputs.attn_metadata.slot_mapping.tolist() == slots
    assert [(r, i) for r, i in zip(inputs.sample_req_ids, inputs.sample_indices.tolist())] == samples
    assert inputs.sample_req_ids == ["b", "c"]
    assert [s.req_id for s in inputs.sample_states] == ["b", "c"]
    assert inputs.sample_num_outputs == [0, 0]
    assert inputs.placeholder_rows == placeholders == []
    assert inputs.prompt_logprob_spans == [("c", 7, 0, 2)]
    md = inputs.attn_metadata
    assert md.block_tables.tolist() == [[3, 5, 8], [1, 2, 0], [4, 0, 0]]
    assert md.query_start_loc_cpu == [0, 6, 7, 10] and md.seq_lens_cpu == [6, 5, 3]
    assert md.max_query_len == 6 and md.max_seq_len == 6


def test_decode_with_placeholders_and_new_blocks() -> None:
    states = RequestStates(torch.device("cpu"))
    states.update(SchedulerOutput([new("a", [1, 2, 3], [7]), new("b", [4, 5], [9])], [],
                                  {"a": 3, "b": 2}, 5, set()))
    # Async: the next step runs on placeholders (tokens the step before is sampling); "a"
    # crosses into a new block.
    states.update(SchedulerOutput([], [CachedRequestData("a", [], [11], 3),
                                       CachedRequestData("b", [], [], 2)], {"a": 1, "b": 1}, 2, set()))
    out = SchedulerOutput([], [], {"a": 1, "b": 1}, 2, set())
    inputs = build_model_inputs(out, states, BS, torch.device("cpu"))
    ids, pos, slots, samples, placeholders = reference(out, states)
    assert inputs.placeholder_rows == placeholders == [0, 1]
    assert inputs.placeholder_req_ids == ["a", "b"]
    assert inputs.input_ids.tolist() == ids and inputs.positions.tolist() == pos == [3, 2]
    assert inputs.attn_metadata.slot_mapping.tolist() == slots == [7 * BS + 3, 9 * BS + 2]
    assert inputs.sample_num_outputs == [1, 1]
    # The token arrives; "a" finishes and its row is freed, then reused by a newcomer.
    states.update(SchedulerOutput([new("c", [6], [12])], [CachedRequestData("b", [50, 51], [13], 3)],
                                  {"b": 1, "c": 1}, 2, {"a"}))
    assert "a" not in states.states and states.states["c"].block_row == 0
    out = SchedulerOutput([], [], {"b": 1, "c": 1}, 2, set())
    inputs = build_model_inputs(out, states, BS, torch.device("cpu"))
    assert inputs.input_ids.tolist() == [51, 6] and inputs.placeholder_rows == []
    assert inputs.attn_metadata.block_tables.tolist() == [[9, 13], [12, 0]]
    assert inputs.attn_metadata.slot_mapping.tolist() == reference(out, states)[2] == [9 * BS + 3, 12 * BS]


def test_upload_packs_one_buffer_with_aligned_views() -> None:
    arrays = [np.arange(5, dtype=np.int32), np.arange(6, dtype=np.int32).reshape(2, 3),
              np.zeros(0, dtype=np.int32), np.array([7], dtype=np.int32)]
    got = upload(arrays, torch.device("cpu"), pack=True)
    base = got[0].untyped_storage().data_ptr()
    for a, t in zip(arrays, got):
        assert t.dtype == torch.int32 and t.shape == a.shape and t.tolist() == a.tolist()
        assert t.untyped_storage().data_ptr() == base  # one buffer, one copy
        assert (t.data_ptr() - base) % 16 == 0
    unpacked = upload(arrays[:2], torch.device("cpu"))  # on the CPU: the arrays' own memory
    assert unpacked[1].data_ptr() == arrays[1].ctypes.data


def test_async_decode_steady_state_matches_the_general_pass() -> None:
    """Every request on a placeholder takes the vectorised path; its result is the general
    pass's, field by field."""
    from shardserve.executor import input_builder as ib

    states = RequestStates(torch.device("cpu"))
    states.update(SchedulerOutput([new("a", [1, 2, 3], [7, 8]), new("b", [4, 5], [9]),
                                   new("c", [6] * 5, [10, 11], min_tokens=2)], [],
                                  {"a": 3, "b": 2, "c": 5}, 10, set()))
    states.update(SchedulerOutput([], [CachedRequestData("a", [], [], 3),
                                       CachedRequestData("b", [], [], 2),
                                       CachedRequestData("c", [21], [], 6)],
                                  {"a": 1, "b": 1, "c": 1}, 3, set()))
    out = SchedulerOutput([], [], {"a": 1, "b": 1, "c": 1}, 3, set())
    req_ids = list(out.num_scheduled_tokens)
    req_states = [states.states[r] for r in req_ids]
    starts = np.array([s.num_computed_tokens for s in req_states])
    fast = ib._scan_placeholder_decode(req_ids, req_states, starts + 1)
    general = ib._scan_requests(req_ids, req_states, starts.tolist(), (starts + 1).tolist())
    assert fast is not None
    for f, g in zip(fast, general):
        assert list(np.asarray(f).tolist() if isinstance(f, np.ndarray) else f) == list(g)
    inputs = build_model_inputs(out, states, BS, torch.device("cpu"))
    assert inputs.placeholder_rows == [0, 1, 2] and inputs.sample_num_outputs == [1, 1, 2]
    assert inputs.positions.tolist() == [3, 2, 6]
    assert inputs.attn_metadata.slot_mapping.tolist() == reference(out, states)[2]
    # A known token in the batch (lock-step decode, or a request whose token arrived): the
    # general pass.
    assert ib._scan_placeholder_decode(req_ids, req_states, starts) is None
