"""CudaGraphRunner's padding of a step into a captured graph's static buffers
(executor/cuda_graph.py), checked without CUDA: the attention kernels (through Triton's
interpreter on CPU) read the padded buffers with the host values a graph was captured with,
and the real tokens' outputs must be the unpadded step's. Capture and replay themselves need a
GPU (tests/gpu/test_multi_gpu_graphs.py and the engine's GPU suite run them)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.executor.cuda_graph import CudaGraphRunner  # noqa: E402
from shardserve.executor.graph_sizes import mixed_rows  # noqa: E402
from shardserve.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tests.kernels.kernel_cases import (DEVICE, assert_close_to_reference,  # noqa: E402
                                        make_batch, reference)

# (cached tokens, new tokens) per request: prompts, chunked prompts over a prefix, decodes.
STEPS = {
    "one prompt": [(0, 13)],
    "prompt fills the size": [(0, 16)],
    "chunk and decodes": [(37, 9), (20, 1), (5, 1), (0, 7)],
    "decodes around prompts": [(3, 1), (0, 20), (64, 1), (31, 18), (9, 1)],
}


def _runner(max_num_seqs: int = 8) -> CudaGraphRunner:
    return CudaGraphRunner(None, max_batch_size=4, max_model_len=256, block_size=16,
                           hidden_size=8, dtype=torch.float32, device=torch.device(DEVICE),
                           max_mixed_tokens=64, max_num_seqs=max_num_seqs)


def _stage(runner: CudaGraphRunner, batch) -> tuple[bool, int]:
    n = batch.query.shape[0]
    ids = torch.arange(n, device=DEVICE)
    return runner._stage_inputs(ids, ids.clone(), batch.metadata, None)


@pytest.mark.parametrize("name", list(STEPS))
def test_padded_mixed_step_attends_like_the_step(name):
    specs = STEPS[name]
    batch = make_batch(specs, 8, 2, 64, 16, torch.float32, seed=len(name))
    n = batch.query.shape[0]
    runner = _runner()
    # Stale values from an earlier step (as on a server): the padding must not depend on them.
    stale = make_batch([(70, 1), (0, 30), (12, 1)], 8, 2, 64, 16, torch.float32, seed=99)
    _stage(runner, stale)

    mixed, tokens = _stage(runner, batch)
    assert mixed and tokens == runner.mixed_sizes[next(
        i for i, s in enumerate(runner.mixed_sizes) if s >= n)]
    md = runner._mixed_metadata(tokens, write=False)  # what the graph sees on replay
    rows = mixed_rows(tokens, runner.max_num_seqs)
    qsl = md.query_start_loc.cpu().tolist()
    lens = md.seq_lens.cpu().tolist()
    reqs = len(specs)
    assert qsl[:reqs + 1] == batch.metadata.query_start_loc_cpu
    assert qsl[reqs + 1:] == [tokens] * (rows - reqs)  # padding request, then empty ones
    assert lens[reqs] == tokens - n and lens[reqs + 1:] == [0] * (rows - reqs - 1)
    assert runner.slot_mapping[:n].tolist() == batch.metadata.slot_mapping.tolist()
    assert (runner.slot_mapping[n:tokens] == -1).all()  # padding never writes the cache

    # The padding tokens' queries are noise; the real rows must not see them.
    noise = torch.randn(tokens - n, *batch.query.shape[1:], generator=torch.Generator()
                        .manual_seed(7)).to(batch.query)
    query = torch.cat([batch.query, noise])
    out = TritonAttentionBackend.forward(query, batch.k_cache, batch.v_cache, md, batch.scale)
    assert_close_to_reference(out[:n], reference(batch), torch.float32)


@pytest.mark.parametrize("max_num_seqs,max_model_len", [(1, 128), (2, 100), (1, 13), (8, 256)])
def test_capture_steps_read_inside_the_block_tables(max_num_seqs, max_model_len):
    """A mixed capture runs a made-up step (one prompt of T - 1 tokens, one decode) through
    both kernels, which read block-table entries from each row's start for its seq_len:
    those must lie inside the runner's buffer (rows past the end are another allocation's
    bytes, read as block ids: an illegal address on the GPU). Batch-1 serving with a short
    max_model_len captured steps the scheduler can never form and read past it."""
    runner = CudaGraphRunner(None, max_batch_size=min(4, max_num_seqs),
                             max_model_len=max_model_len, block_size=16, hidden_size=8,
                             dtype=torch.float32, device=torch.device(DEVICE),
                             max_mixed_tokens=512, max_num_seqs=max_num_seqs)
    assert runner.mixed_sizes and runner.mixed_sizes[-1] <= max_num_seqs * max_model_len
    stride, entries = runner.block_tables.stride(0), runner.block_tables.numel()
    for tokens in runner.mixed_sizes:
        md = runner._mixed_metadata(tokens)
        for row, seq_len in enumerate(md.seq_lens.tolist()):
            assert row * stride + -(-seq_len // 16) <= entries, (tokens, row, seq_len)


def test_decode_step_pads_as_before():
    batch = make_batch([(5, 1), (17, 1), (40, 1)], 8, 2, 64, 16, torch.float32, seed=3)
    runner = _runner()
    assert _stage(runner, batch) == (False, 4)
    assert runner.seq_lens[:4].tolist() == batch.metadata.seq_lens_cpu + [1]
    assert runner.slot_mapping[3] == -1


def test_which_steps_replay():
    runner = _runner(max_num_seqs=8)
    decode = make_batch([(5, 1)] * 3, 8, 2, 64, 16, torch.float32, seed=1).metadata
    assert runner.can_run(decode, 3)
    prompt = make_batch([(0, 64)], 8, 2, 64, 16, torch.float32, seed=2).metadata
    assert runner.can_run(prompt, 64)
    longer = make_batch([(0, 65)], 8, 2, 64, 16, torch.float32, seed=2).metadata
    assert not runner.can_run(longer, 65)  # above the ladder: eager
    eager_only = CudaGraphRunner(None, 4, 256, 16, 8, torch.float32, torch.device(DEVICE))
    assert eager_only.mixed_sizes == [] and not eager_only.can_run(prompt, 64)
    assert eager_only.can_run(decode, 3)


def test_mixed_graph_decode_split_count_is_sized_for_a_few_rows(monkeypatch):
    """The split count is fixed at capture. Sized for every row of a 512-token graph (up to
    257) it was 1, and a long-context decode beside a new prompt read its whole context with
    one program per KV head; the mixed metadata sizes it for a few decode rows instead."""
    from shardserve.executor.cuda_graph import MIXED_GRAPH_SPLIT_ROWS
    from shardserve.kernels import decode_attention as da
    runner = CudaGraphRunner(None, max_batch_size=4, max_model_len=4096, block_size=16,
                             hidden_size=8, dtype=torch.float32, device=torch.device(DEVICE),
                             max_mixed_tokens=512, max_num_seqs=256)
    md = runner._mixed_metadata(512)
    assert md.num_reqs == 257 and md.decode_split_rows == MIXED_GRAPH_SPLIT_ROWS
    seen = []
    real = da.choose_num_splits
    monkeypatch.setattr(da, "choose_num_splits",
                        lambda rows, *a, **kw: seen.append(rows) or real(rows, *a, **kw))
    batch = make_batch([(3000, 1), (0, 40)], 8, 2, 64, 16, torch.float32, seed=5)
    mixed, tokens = _stage(runner, batch)
    assert mixed and tokens == 48
    md = runner._mixed_metadata(tokens, write=False)
    query = torch.cat([batch.query, batch.query.new_zeros(tokens - 41, *batch.query.shape[1:])])
    out = TritonAttentionBackend.forward(query, batch.k_cache, batch.v_cache, md, batch.scale)
    assert seen == [MIXED_GRAPH_SPLIT_ROWS]
    assert da.choose_num_splits(MIXED_GRAPH_SPLIT_ROWS, 8, 4096, torch.device("cpu")) > 1  # 132 SMs
    assert da.choose_num_splits(257, 8, 4096, torch.device("cpu")) == 1
    assert_close_to_reference(out[:41], reference(batch), torch.float32)
