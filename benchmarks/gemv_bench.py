"""Batch-1 GEMVs of a decoder: cuBLAS (F.linear) against the Triton GEMV, per shape and per token.

    python benchmarks/gemv_bench.py --preset llama-3-8b --tp 1,2,4

For each TP size, the shapes one rank multiplies a token by (qkv, o_proj, gate_up, down, LM
head), each timed as layers/linear_op.py times them when it picks (L2-cold weights): microseconds
a call and the bandwidth reached for F.linear and for the best Triton configuration, then what a
whole token's GEMVs cost both ways against the copy bandwidth measured in the same run (the
roofline).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import copy_bandwidth, log  # noqa: E402


def decoder_shapes(cfg: dict, tp: int) -> list[tuple[str, int, int, int]]:
    """(name, N, K, calls per token) of one rank's batch-1 GEMVs."""
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_per_rank = max(kv_heads // tp, 1)
    return [("qkv_proj", (heads // tp + 2 * kv_per_rank) * head_dim, hidden, layers),
            ("o_proj", hidden, heads // tp * head_dim, layers),
            ("gate_up_proj", 2 * inter // tp, hidden, layers),
            ("down_proj", hidden, inter // tp, layers),
            ("lm_head", -(-cfg["vocab_size"] // tp), hidden, 1)]


def main(argv=None) -> None:
    import torch

    from shardserve.layers.linear_op import time_candidates
    from shardserve.testing import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    cfg = dict(PRESETS[args.preset].config)
    print("| TP | layer | N x K | F.linear us | TB/s | Triton us | TB/s | config | Triton/F.linear |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for tp in (int(t) for t in args.tp.split(",")):
        tot_cublas = tot_triton = tot_best = tot_bytes = 0.0
        for name, n, k, calls in decoder_shapes(cfg, tp):
            timings = time_candidates(n, k, dtype, False, device)
            cublas = timings[0][1]
            config, triton_us = min(timings[1:], key=lambda t: t[1])
            nbytes = n * k * elem
            print(f"| {tp} | {name} | {n} x {k} | {cublas:.1f} | {nbytes / cublas / 1e6:.2f} | "
                  f"{triton_us:.1f} | {nbytes / triton_us / 1e6:.2f} | {config.block_n}x"
                  f"{config.block_k} w{config.num_warps} s{config.num_stages} | "
                  f"{cublas / triton_us:.2f}x |")
            tot_cublas += calls * cublas
            tot_triton += calls * triton_us
            tot_best += calls * min(cublas, triton_us)
            tot_bytes += calls * nbytes
        summary.append((tp, tot_cublas, tot_triton, tot_best, tot_bytes / bandwidth * 1e6))
    print("\n| TP | GEMVs a token, F.linear ms | Triton ms | per-shape best ms | roofline ms |")
    print("|---|---|---|---|---|")
    for tp, c, t, b, roof in summary:
        print(f"| {tp} | {c / 1e3:.3f} | {t / 1e3:.3f} | {b / 1e3:.3f} | {roof / 1e3:.3f} |")


if __name__ == "__main__":
    main()
