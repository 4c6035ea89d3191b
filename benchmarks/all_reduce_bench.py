"""All-reduce latency per message size: NCCL against the custom symmetric-memory all-reduce
(shardserve/distributed/custom_all_reduce.py), eagerly and inside a CUDA graph of 64
back-to-back all-reduces (what a decode step's 2 per layer look like to the GPU).

    python benchmarks/all_reduce_bench.py                      # every visible GPU (2, 4 or 8)
    python benchmarks/all_reduce_bench.py --world-size 2 --dtype float32
    python benchmarks/all_reduce_bench.py --sizes 8K,64K,1M    # fewer sizes

Columns (microseconds per all-reduce, bf16 by default, timed on rank 0):
  nccl      torch.distributed.all_reduce on the TP group's NCCL communicator
  1-shot    the custom path forced one-shot (every rank reads all peers' buffers)
  2-shot    the custom path forced two-shot (reduce-scatter + all-gather over the buffers)
  auto      GroupCoordinator.all_reduce with the default thresholds: what serving runs
  ratio     nccl / auto in the graph: the speed-up a captured decode step sees

The summary at the end gives the batch-1 decode estimate (65 all-reduces of 8 KB, Llama-3-8B)
and the crossovers to set ONE_SHOT_MAX_BYTES and --custom-all-reduce-max-bytes from.
It takes ~20-40 s (most of it NCCL start-up); --timeout-s stops every rank after that long.
NVLink multicast stays off: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NCCL_NVLS_ENABLE=0 are set
here for every rank, whatever the caller's environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Set before torch or NCCL ever looks: every rank inherits them (and sets them again).
_SAFE_ENV = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
             "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(_SAFE_ENV)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MODES = ("nccl", "one_shot", "two_shot", "auto")
HEADERS = {"nccl": "nccl", "one_shot": "1-shot", "two_shot": "2-shot", "auto": "auto"}
DECODE_ALL_REDUCES, DECODE_BYTES = 65, 8 << 10  # Llama-3-8B, batch 1: 2 x 32 layers + embedding


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def human(nbytes: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def _time_eager(fn, tensor, iters: int, barrier) -> float:
    """Microseconds per call of fn(tensor), launched back to back from Python."""
    for _ in range(3):
        fn(tensor)
    torch.cuda.synchronize()
    barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(tensor)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def _time_graph(fn, tensor, ops: int, replays: int, barrier) -> float:
    """Microseconds per all-reduce in a CUDA graph of `ops` back-to-back calls, in place."""
    from benchmarks.common import cuda_graph_us

    def body():
        for _ in range(ops):
            fn(tensor)
    return cuda_graph_us(body, replays, barrier) / ops


def _rank(rank: int, world_size: int, sizes: list[int], dtype_name: str, iters: int, ops: int,
          replays: int) -> None:
    os.environ.update(_SAFE_ENV)
    import logging

    import torch.distributed as dist

    from shardserve.config import ParallelConfig
    from shardserve.distributed import parallel_state as ps
    from shardserve.distributed.custom_all_reduce import ONE_SHOT, TWO_SHOT, CustomAllReduce

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[rank %(process)d] %(message)s")
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda", rank)
    start = time.perf_counter()
    # The TP group as serving builds it (default thresholds: the 'auto' column) ...
    ps.initialize_model_parallel(world_size, 1, parallel_config=ParallelConfig(
        tensor_parallel_size=world_size))
    tp = ps.get_tp_group()
    if tp.custom_all_reduce is None:
        raise RuntimeError("The custom all-reduce did not set up on this machine; the log above "
                           "says why.")
    # ... and one with a buffer for the largest size, to force either algorithm at any size.
    forced = CustomAllReduce.create(tp, max_bytes=max(sizes))
    if forced is None:
        raise RuntimeError("Could not set up a symmetric buffer of the largest size.")

    def barrier() -> None:
        tp.barrier()

    fns = {"nccl": lambda t: dist.all_reduce(t, group=tp.device_group),
           "one_shot": lambda t: forced.all_reduce(t, ONE_SHOT),
           "two_shot": lambda t: forced.all_reduce(t, TWO_SHOT),
           "auto": tp.all_reduce}
    dist.all_reduce(torch.zeros(1, device=device), group=tp.device_group)  # NCCL set-up
    torch.cuda.synchronize()
    if rank == 0:
        print(f"set-up {time.perf_counter() - start:.1f} s: {world_size} x "
              f"{torch.cuda.get_device_name(device)}, {dtype_name}, torch {torch.__version__}; "
              f"defaults: {tp.custom_all_reduce}", flush=True)
    if rank == 0:
        print(_header(ops), flush=True)
    rows = []
    for nbytes in sizes:
        # Zeros stay zeros however often they are summed: timing without overflow.
        tensor = torch.zeros(max(1, nbytes // tensor_size(dtype)), dtype=dtype, device=device)
        eager = {mode: _time_eager(fns[mode], tensor, iters, barrier) for mode in MODES}
        graph = {mode: _time_graph(fns[mode], tensor, ops, replays, barrier) for mode in MODES}
        path = tp.custom_all_reduce.algorithm_for(tensor) or "nccl"
        rows.append((nbytes, eager, graph, path))
        if rank == 0:
            print(_row(nbytes, eager, graph, path), flush=True)
        del tensor
    barrier()
    if rank == 0:
        print(_summary(rows, tp.custom_all_reduce, world_size, dtype), flush=True)
    forced = None  # its buffer goes before the group it was set up over
    ps.destroy_model_parallel()


def tensor_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _header(ops: int) -> str:
    eager = " ".join(f"{HEADERS[m]:>7}" for m in MODES)
    graph = " ".join(f"{HEADERS[m]:>7}" for m in MODES)
    line1 = f"{'':>6} | {'eager (us per call)':^31} | {f'CUDA graph of {ops} (us per call)':^31} |"
    line2 = f"{'size':>6} | {eager} | {graph} | {'ratio':>5} auto path"
    return "\n".join([line1, line2, "-" * len(line2)])


def _row(nbytes: int, eager: dict, graph: dict, path: str) -> str:
    cells_e = " ".join(f"{eager[m]:7.1f}" for m in MODES)
    cells_g = " ".join(f"{graph[m]:7.1f}" for m in MODES)
    ratio = graph["nccl"] / graph["auto"] if graph["auto"] > 0 else float("nan")
    return f"{human(nbytes):>6} | {cells_e} | {cells_g} | {ratio:5.2f} {path}"


def _summary(rows: list, custom, world_size: int, dtype: torch.dtype) -> str:
    lines = ["", "summary (CUDA graph, us per all-reduce)"]
    decode = min(rows, key=lambda r: abs(r[0] - DECODE_BYTES))
    nccl_ms = decode[2]["nccl"] * DECODE_ALL_REDUCES / 1000.0
    auto_ms = decode[2]["auto"] * DECODE_ALL_REDUCES / 1000.0
    speedup = decode[2]["nccl"] / decode[2]["auto"]
    lines.append(f"  batch-1 decode, {DECODE_ALL_REDUCES} x {human(decode[0])}: nccl "
                 f"{nccl_ms:.3f} ms, auto {auto_ms:.3f} ms per step "
                 f"(saves {nccl_ms - auto_ms:.3f} ms, {speedup:.1f}x)")
    one_best = [n for n, _, g, _ in rows if g["one_shot"] <= min(g["two_shot"], g["nccl"])]
    custom_best = [n for n, _, g, _ in rows if min(g["one_shot"], g["two_shot"]) < g["nccl"]]
    lines.append(f"  {'size':>6} {'best':>8} {'nccl':>8} {'custom':>8}")
    for nbytes, _, graph, _ in rows:
        best = min(MODES[:3], key=lambda m: graph[m])
        lines.append(f"  {human(nbytes):>6} {HEADERS[best]:>8} {graph['nccl']:8.1f} "
                     f"{min(graph['one_shot'], graph['two_shot']):8.1f}")
    lines.append(f"  one-shot is fastest up to {human(max(one_best)) if one_best else '-'} "
                 f"(default ONE_SHOT_MAX_BYTES[{world_size}] = {human(custom.one_shot_max_bytes)})")
    beats = human(max(custom_best)) if custom_best else "-"
    lines.append(f"  the custom path beats NCCL up to {beats} "
                 f"(default --custom-all-reduce-max-bytes {human(custom.two_shot_max_bytes)})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs (2, 4 or 8; default: every visible one, up to 8)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated message sizes, e.g. 8K,1M (default 2K..16M)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=30, help="eager calls timed per cell")
    parser.add_argument("--graph-ops", type=int, default=64, help="all-reduces per CUDA graph")
    parser.add_argument("--replays", type=int, default=5, help="graph replays timed per cell")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("all_reduce_bench: needs CUDA GPUs (none visible).")
    count = torch.cuda.device_count()
    world_size = args.world_size or max(w for w in (1, 2, 4, 8) if w <= count)
    if world_size not in (2, 4, 8) or world_size > count:
        sys.exit(f"all_reduce_bench: --world-size must be 2, 4 or 8 and at most the {count} "
                 f"visible GPUs, got {world_size}.")
    sizes = ([parse_size(s) for s in args.sizes.split(",")] if args.sizes
             else [2048 << i for i in range(14)])  # 2K .. 16M
    from shardserve.distributed.local_launch import run_local_ranks
    start = time.perf_counter()
    run_local_ranks(_rank, world_size, args=(world_size, sizes, args.dtype, args.iters,
                                             args.graph_ops, args.replays),
                    timeout_s=args.timeout_s, backend="nccl")
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
