"""The custom (symmetric-memory) all-reduce on 2 GPUs (4 and 8 when there are): the sums it
gives equal NCCL's and the exact ones, for bf16 and fp32 over sizes that take the one-shot,
the two-shot and the NCCL path, eagerly and replayed from a CUDA graph with new inputs; and
what it declines (fp16, odd sizes, unaligned or strided views, messages over its buffer)
still comes out right through NCCL. Needs two CUDA GPUs; skipped otherwise.

    python -m pytest -q tests/gpu/test_custom_all_reduce.py -s

NVLink multicast stays off: each rank sets TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NCCL_NVLS_ENABLE=0 before touching symmetric memory or NCCL (the lent machines set them too).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multiproc, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

MAX_BYTES = 4 << 20  # a small buffer, so the NCCL path starts at modest sizes


def _expected_path(custom, nbytes: int) -> str | None:
    from shardserve.distributed.custom_all_reduce import ONE_SHOT, TWO_SHOT
    if nbytes <= custom.one_shot_max_bytes:
        return ONE_SHOT
    return TWO_SHOT if nbytes <= custom.two_shot_max_bytes else None


def _inputs(rank: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small integers (|x| <= 8): every partial sum is exact in bf16 and fp32, so the
    custom kernels, NCCL and the float64 reference must agree bit for bit whatever the
    summation order."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randint(-8, 9, (numel,), generator=gen).to(dtype)


def _exact_sum(world_size: int, numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return sum(_inputs(r, numel, torch.float64, seed) for r in range(world_size)).to(dtype)


def _worker(rank: int, world_size: int) -> None:
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    logging.basicConfig(level=logging.INFO)  # the reason, if the path does not set up
    import torch.distributed as dist

    from shardserve.config import ParallelConfig
    from shardserve.distributed import parallel_state as ps

    device = torch.device("cuda", rank)
    ps.initialize_model_parallel(world_size, 1, parallel_config=ParallelConfig(
        tensor_parallel_size=world_size, custom_all_reduce_max_bytes=MAX_BYTES))
    tp = ps.get_tp_group()
    custom = tp.custom_all_reduce
    assert custom is not None, "the custom all-reduce did not set up: see the log above"
    assert custom.max_bytes == MAX_BYTES

    def check(x: torch.Tensor, expected: torch.Tensor, path, what: str) -> None:
        assert custom.algorithm_for(x) == path, (what, custom.algorithm_for(x), path)
        nccl = x.clone()
        dist.all_reduce(nccl, group=tp.device_group)
        out = tp.all_reduce(x)
        assert out.data_ptr() == x.data_ptr(), f"{what}: not in place"
        assert torch.equal(out, nccl), f"{what}: differs from NCCL"
        assert torch.equal(out.cpu().reshape(-1), expected.reshape(-1)), f"{what}: wrong sum"

    # ---- eager, by size and dtype
    sizes_bytes = [4, 64, 8 << 10, 24 << 10, 128 << 10, custom.one_shot_max_bytes,
                   custom.one_shot_max_bytes + 64, 1 << 20, MAX_BYTES, MAX_BYTES + 64, 16 << 20]
    for dtype in (torch.bfloat16, torch.float32):
        size = torch.finfo(dtype).bits // 8
        for seed, nbytes in enumerate(sizes_bytes):
            numel = nbytes // size
            x = _inputs(rank, numel, dtype, seed).to(device)
            expected = _exact_sum(world_size, numel, dtype, seed)
            check(x, expected, _expected_path(custom, nbytes), f"{dtype} {nbytes} B")
        # A decode-shaped [tokens, hidden] activation goes through whole.
        x = _inputs(rank, 4 * 4096, dtype, 99).to(device).reshape(4, 4096)
        check(x, _exact_sum(world_size, 4 * 4096, dtype, 99), "one_shot", f"{dtype} [4, 4096]")

    # ---- what the kernels do not take: NCCL, same answers
    odd = _inputs(rank, 3, torch.bfloat16, 7).to(device)  # 6 bytes
    check(odd, _exact_sum(world_size, 3, torch.bfloat16, 7), None, "3 x bf16")
    half = _inputs(rank, 2048, torch.float16, 8).to(device)
    check(half, _exact_sum(world_size, 2048, torch.float16, 8), None, "fp16")
    base = _inputs(rank, 4097, torch.bfloat16, 9).to(device)
    shifted = base[1:]  # starts 2 bytes into the allocation
    check(shifted, _exact_sum(world_size, 4097, torch.bfloat16, 9)[1:], None, "unaligned view")
    strided = torch.zeros(64, 2, device=device)[:, 0]  # NCCL itself wants contiguous input
    assert custom.algorithm_for(strided) is None

    # ---- inside a CUDA graph, replayed with new inputs
    for dtype in (torch.bfloat16, torch.float32):
        _graph_case(rank, world_size, tp, custom, device, dtype)

    tp.barrier()
    ps.destroy_model_parallel()


def _graph_case(rank, world_size, tp, custom, device, dtype) -> None:
    """A decode-step-like graph: independent messages of several sizes (one-shot, two-shot,
    and one over the buffer, so NCCL is captured in the same graph) and a chain of 32
    back-to-back all-reduces, each feeding the next."""
    size = torch.finfo(dtype).bits // 8
    numels = [4096, 3 * 4096, 64 * 4096, custom.one_shot_max_bytes // size + 512,
              MAX_BYTES // size + 1024]
    static = [torch.zeros(n, dtype=dtype, device=device) for n in numels]
    chain_in = torch.zeros(4096, dtype=dtype, device=device)  # the same on every rank

    def body():
        outs = [tp.all_reduce(x * 1) for x in static]  # x * 1: a fresh activation each
        h = chain_in * 1
        for _ in range(32):
            # Equal on every rank: the sum is world_size x h, exactly, and / world_size gives
            # h back; a rank that skipped the sum or read a stale buffer would drift.
            h = tp.all_reduce(h) / world_size
        return outs, h

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # warm-up outside the capture, as torch asks
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, h = body()
    for replay in range(5):
        seed = 100 + replay
        for i, (x, n) in enumerate(zip(static, numels)):
            x.copy_(_inputs(rank, n, dtype, seed + 10 * i))
        chain = _inputs(0, chain_in.numel(), dtype, seed + 7)  # rank 0's draw on every rank
        chain_in.copy_(chain)
        graph.replay()
        torch.cuda.synchronize()
        for i, (out, n) in enumerate(zip(outs, numels)):
            expected = _exact_sum(world_size, n, dtype, seed + 10 * i)
            assert torch.equal(out.cpu(), expected), f"graph {dtype} message {i} replay {replay}"
        assert torch.equal(h.cpu(), chain), f"graph {dtype} chain replay {replay}"


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_custom_all_reduce_matches_nccl(world_size: int) -> None:
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs")
    from shardserve.distributed.local_launch import run_local_ranks
    run_local_ranks(_worker, world_size, args=(world_size,), timeout_s=240, backend="nccl")
