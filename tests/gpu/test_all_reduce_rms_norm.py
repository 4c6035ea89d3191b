"""The fused all-reduce + residual add + RMSNorm kernel (kernels/all_reduce_rms_norm.py) on 2
GPUs (4 and 8 when there are): bit for bit the unfused path (the group's all-reduce, then
kernels/rms_norm.py), for bf16, fp16 and fp32 at decode-like and odd shapes, with more rows than
programs, eagerly and replayed from a CUDA graph with new inputs, interleaved with torch's own
symmetric-memory all-reduces over the same buffer and signal pads; and what it does not take
(messages over the one-shot size, mismatched residuals) is declined. Needs two CUDA GPUs.

    python -m pytest -q tests/gpu/test_all_reduce_rms_norm.py -s
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

EPS = 1e-5


def _draw(rank: int, shape, dtype, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def _unfused(tp, x, residual, weight):
    from shardserve.kernels.rms_norm import rms_norm
    return rms_norm(tp.all_reduce(x.clone()), weight, EPS, residual)


def _worker(rank: int, world_size: int) -> None:
    from shardserve.kernels.rms_norm import rms_norm
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    logging.basicConfig(level=logging.INFO)
    from shardserve.config import ParallelConfig
    from shardserve.distributed import parallel_state as ps

    device = torch.device("cuda", rank)
    ps.initialize_model_parallel(world_size, 1, parallel_config=ParallelConfig(
        tensor_parallel_size=world_size))
    tp = ps.get_tp_group()
    custom = tp.custom_all_reduce
    assert custom is not None and custom._norm is not None, "fused path off: see the log"

    # ---- eager, by dtype and shape (rows past 64 wrap around the programs)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for seed, (rows, hidden) in enumerate([(1, 4096), (3, 4096), (64, 4096), (1, 576),
                                               (65, 576), (200, 576), (7, 1000), (2, 8192)]):
            x = _draw(rank, (rows, hidden), dtype, seed, device)
            x_before = x.clone()
            residual = _draw(0, (rows, hidden), dtype, seed + 50, device)  # same on every rank
            weight = _draw(0, (hidden,), dtype, seed + 99, device)
            if x.numel() * x.element_size() > custom.one_shot_max_bytes:
                assert not tp.can_fuse_rms_norm(x, residual), (dtype, rows, hidden)
                continue
            assert tp.can_fuse_rms_norm(x, residual), (dtype, rows, hidden)
            out, res = tp.all_reduce_rms_norm(x, residual, weight, EPS)
            ref_out, ref_res = _unfused(tp, x, residual, weight)
            what = f"{dtype} [{rows}, {hidden}]"
            assert torch.equal(x, x_before), f"{what}: input modified"
            assert torch.equal(res, ref_res), f"{what}: residual differs"
            assert torch.equal(out, ref_out), f"{what}: output differs"
            # No residual yet (the first layer reducing the embedding): the sum is the residual.
            out0, res0 = tp.all_reduce_rms_norm(x, None, weight, EPS)
            summed = tp.all_reduce(x.clone())
            assert torch.equal(res0, summed), f"{what}, no residual: sum differs"
            assert torch.equal(out0, rms_norm(summed, weight, EPS)), f"{what}, no residual"
            # Every rank holds the same bits (the residual stream must not drift apart).
            gathered = tp.all_gather(out.reshape(1, -1), dim=0)
            assert all(torch.equal(gathered[0], g) for g in gathered), f"{what}: ranks differ"

    # ---- declined: over the one-shot size, mismatched residual
    big = torch.zeros(custom.one_shot_max_bytes // 2 + 4096, dtype=torch.bfloat16,
                      device=device).reshape(-1, 4096)
    assert not tp.can_fuse_rms_norm(big, big.clone())
    small = torch.zeros(2, 4096, dtype=torch.bfloat16, device=device)
    assert not tp.can_fuse_rms_norm(small, small.float())
    assert not tp.can_fuse_rms_norm(small, small[:1].clone())

    # ---- a decode-step-like CUDA graph: 32 fused calls in a chain, each after a torch
    # symmetric-memory all-reduce of another message, replayed with new inputs
    for dtype in (torch.bfloat16, torch.float32):
        _graph_case(rank, tp, device, dtype)

    tp.barrier()
    ps.destroy_model_parallel()


def _graph_case(rank, tp, device, dtype) -> None:
    hidden, rows, layers = 4096, 2, 32
    x_in = torch.zeros(rows, hidden, dtype=dtype, device=device)
    other_in = torch.zeros(3 * hidden, dtype=dtype, device=device)
    weights = [_draw(0, (hidden,), dtype, 300 + i, device) for i in range(layers)]
    residual_in = torch.zeros(rows, hidden, dtype=dtype, device=device)

    def body(fused: bool):
        h, residual, others = x_in * 1, residual_in * 1, []
        for i in range(layers):
            others.append(tp.all_reduce(other_in * (i + 1)))  # torch's one-shot kernel
            if fused:
                h, residual = tp.all_reduce_rms_norm(h, residual, weights[i], EPS)
            else:
                h, residual = _unfused(tp, h, residual, weights[i])
            h = h * (0.5 + rank)  # a different partial sum per rank, as after a projection
        return h, residual, others

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body(True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h, residual, others = body(True)
    for replay in range(4):
        seed = 500 + replay
        x_in.copy_(_draw(rank, (rows, hidden), dtype, seed, device))
        residual_in.copy_(_draw(0, (rows, hidden), dtype, seed + 1, device))
        other_in.copy_(_draw(rank, (3 * hidden,), dtype, seed + 2, device))
        graph.replay()
        ref_h, ref_residual, ref_others = body(False)
        torch.cuda.synchronize()
        assert torch.equal(h, ref_h), f"graph {dtype} replay {replay}: output differs"
        assert torch.equal(residual, ref_residual), f"graph {dtype} replay {replay}: residual"
        assert all(torch.equal(a, b) for a, b in zip(others, ref_others)), \
            f"graph {dtype} replay {replay}: an interleaved all-reduce differs"


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_all_reduce_rms_norm_matches_unfused(world_size: int) -> None:
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs")
    from shardserve.distributed.local_launch import run_local_ranks
    run_local_ranks(_worker, world_size, args=(world_size,), timeout_s=120, backend="nccl")
