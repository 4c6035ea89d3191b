"""The fused all-reduce + residual add + RMSNorm (kernels/all_reduce_rms_norm.py) against the
two kernels it replaces, per call, inside a CUDA graph of 64 chained calls (a decode step's
shape: 2 per layer of a 32-layer model).

    python benchmarks/all_reduce_norm_bench.py                 # 2 GPUs, hidden 4096, bf16
    python benchmarks/all_reduce_norm_bench.py --rows 1,8,64 --hidden 8192

Columns (microseconds per call, rank 0):
  all-reduce   the custom all-reduce alone (torch's symmetric-memory one-shot kernel)
  norm         the residual add + RMSNorm kernel alone (kernels/rms_norm.py)
  unfused      both, one after the other: what runs with --disable-fused-all-reduce-norm
  fused        the one kernel
  saved        unfused - fused, and that times 64 (a Llama-3-8B decode step at TP 2)
NVLink multicast stays off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.update({"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"})
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

CHAIN = 64
EPS = 1e-5


def _rank(rank: int, world_size: int, rows_list: list[int], hidden: int, dtype_name: str,
          replays: int) -> None:
    from benchmarks.common import cuda_graph_us
    from shardserve.config import ParallelConfig
    from shardserve.distributed import parallel_state as ps
    from shardserve.kernels.rms_norm import rms_norm

    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda", rank)
    ps.initialize_model_parallel(world_size, 1, parallel_config=ParallelConfig(
        tensor_parallel_size=world_size))
    tp = ps.get_tp_group()
    assert tp.custom_all_reduce is not None and tp.custom_all_reduce._norm is not None
    weight = torch.randn(hidden, dtype=dtype, device=device)
    lines = []
    for rows in rows_list:
        x = torch.randn(rows, hidden, dtype=dtype, device=device) * 0.1
        residual = torch.randn(rows, hidden, dtype=dtype, device=device)
        assert tp.can_fuse_rms_norm(x, residual), f"[{rows}, {hidden}] is over the fused size"

        def all_reduce_only():
            h = x
            for _ in range(CHAIN):
                h = tp.all_reduce(h * 1)

        def norm_only():
            h, r = x, residual
            for _ in range(CHAIN):
                h, r = rms_norm(h, weight, EPS, r)

        def unfused():
            h, r = x, residual
            for _ in range(CHAIN):
                h, r = rms_norm(tp.all_reduce(h * 1), weight, EPS, r)

        def fused():
            h, r = x, residual
            for _ in range(CHAIN):
                h, r = tp.all_reduce_rms_norm(h * 1, r, weight, EPS)

        # h * 1 in every variant: the fresh activation a projection would hand over.
        times = {name: cuda_graph_us(fn, replays, tp.barrier, warm_replays=3) / CHAIN
                 for name, fn in
                 (("all-reduce", all_reduce_only), ("norm", norm_only), ("unfused", unfused),
                  ("fused", fused))}
        saved = times["unfused"] - times["fused"]
        lines.append(f"| {rows} x {hidden} | {times['all-reduce']:.2f} | {times['norm']:.2f} | "
                     f"{times['unfused']:.2f} | {times['fused']:.2f} | {saved:.2f} "
                     f"({saved * CHAIN / 1e3:.3f} ms / 64) |")
    if rank == 0:
        print(f"\nus per call, {dtype_name}, {world_size} GPUs, graph of {CHAIN} chained calls "
              "(each also runs a x1 multiply)")
        print("| rows x hidden | all-reduce | norm | unfused | fused | saved |")
        print("|---|---|---|---|---|---|")
        print("\n".join(lines), flush=True)
    tp.barrier()
    ps.destroy_model_parallel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--timeout-s", type=float, default=180.0)
    args = p.parse_args()
    from shardserve.distributed.local_launch import run_local_ranks
    rows = [int(r) for r in args.rows.split(",")]
    run_local_ranks(_rank, args.world_size, args=(args.world_size, rows, args.hidden,
                                                  args.dtype, args.replays),
                    timeout_s=args.timeout_s, backend="nccl")


if __name__ == "__main__":
    main()
