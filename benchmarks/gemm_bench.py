"""The decode step's GEMMs at batch M (M rows against each weight of one decoder layer and the
LM head): cuBLAS through F.linear, cuBLASLt, and a Triton split-K GEMM, per shape, against the
GPU's own limits measured in the same run (a large square GEMM's TFLOP/s, the copy bandwidth).

    python benchmarks/gemm_bench.py --preset llama-3-8b --rows 256,512
    python benchmarks/gemm_bench.py --fp8 --rows 1,256,4096    # --quantization fp8's GEMMs

Each call reads its weight from HBM (enough weight copies to overflow the L2, as in a real
step) and runs inside a CUDA graph, so only GPU time counts. The question it answers: how far
a decode step's GEMMs (6.35 of 15.7 ms at 256 rows with the fp8 cache, BENCHMARKS.md session 6)
are from max(FLOPs / peak, bytes / bandwidth), and whether any candidate closes the gap.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.common import copy_bandwidth, log  # noqa: E402
from benchmarks.gemv_bench import decoder_shapes  # noqa: E402

SCRATCH_BYTES = 512 << 20


@triton.jit
def _splitk_gemm(a_ptr, w_ptr, c_ptr, M, N, K, k_per_split,
                 stride_am, stride_wn, stride_cm,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr):
    """C[M, N] (+)= A[M, K] @ W[N, K]^T over this program's K range (float32 atomics when the K
    dimension is split)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    pm = pid // num_n
    pn = pid % num_n
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k0 = split * k_per_split
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(k0, k0 + k_per_split, BK):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :],
                    mask=(rm < M)[:, None], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + (k + rk)[None, :],
                    mask=(rn < N)[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


TRITON_CONFIGS = [  # (BM, BN, BK, split_k, warps, stages)
    (128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4),
    (128, 128, 64, 2, 8, 4), (128, 128, 64, 4, 8, 4), (64, 128, 128, 2, 4, 3),
    (64, 256, 64, 2, 8, 4), (128, 64, 64, 4, 4, 4), (64, 64, 128, 4, 4, 4),
]


def triton_linear(x, w, cfg, c32=None, out=None):
    bm, bn, bk, split, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    if split == 1:
        _splitk_gemm[grid](x, w, out, m, n, k, k, x.stride(0), w.stride(0), out.stride(0),
                           BM=bm, BN=bn, BK=bk, ATOMIC=False, num_warps=warps,
                           num_stages=stages)
        return out
    c32.zero_()
    _splitk_gemm[grid](x, w, c32, m, n, k, k // split, x.stride(0), w.stride(0), c32.stride(0),
                       BM=bm, BN=bn, BK=bk, ATOMIC=True, num_warps=warps, num_stages=stages)
    out.copy_(c32)
    return out


def graph_time_us(fn, copies: int) -> float:
    """Microseconds a call: `copies` calls (one per weight copy) in one CUDA graph."""
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    best = float("inf")
    for _ in range(4):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / copies)
    del graph
    return best


def peak_tflops(dtype) -> float:
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    b = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    us = graph_time_us(lambda i: a @ b, 10)
    return 2 * 8192 ** 3 / us / 1e6


FP8_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages) tried beside kernels/fp8_gemm.py's choice
    (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 8, 3),
    (128, 128, 8, 4), (128, 256, 8, 3)]


def fp8_table(cfg: dict, rows: list[int], bandwidth: float, peak_bf16: float) -> None:
    """--quantization fp8's linear layers (activation quantization + the Triton FP8 GEMM, as
    layers/quantization.py runs them) against bf16 cuBLAS and against torch._scaled_mm with
    per-row / per-column scales (cuBLASLt / CUTLASS FP8: a peer with coarser scales), and the
    FP8 limit max(FLOPs / the measured FP8 peak, FP8 bytes / bandwidth)."""
    from shardserve.kernels import fp8_gemm as FG

    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    us = graph_time_us(lambda i: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16),
                       10)
    peak = 2 * 8192 ** 3 / us / 1e6
    log(f"8192^3 fp8 _scaled_mm {peak:.0f} TFLOP/s (bf16 {peak_bf16:.0f})")
    print("\n| M | layer | N x K | bf16 cuBLAS us | fp8 limit us | ours us (quant + GEMM) | "
          "% fp8 limit | x bf16 | _scaled_mm rowwise us | _scaled_mm 1x128 groups us | "
          "best tile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in rows:
        totals = {"bf16": 0.0, "limit": 0.0, "ours": 0.0, "best": 0.0, "peer": 0.0,
                  "block": 0.0}
        for name, n, k, calls in [s for s in decoder_shapes(cfg, 1) if s[0] != "lm_head"]:
            copies = max(2, min(32, -(-SCRATCH_BYTES // (n * k * 2))))
            w16 = torch.empty(copies, n, k, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
            wq = torch.empty(copies, n, k, dtype=torch.float8_e4m3fn, device="cuda")
            # Column-major scales per copy, as layers/quantization.py keeps them.
            ws = torch.empty(copies, FG.num_groups(k), n, device="cuda").transpose(1, 2)
            for i in range(copies):
                wq[i], ws[i] = FG.quantize_rows_fp8(w16[i])
            wcol = (w16.float().abs().amax(-1) / 448.0).clamp_min(1e-12)  # [copies, n]
            wq_col = (w16.float() / wcol[..., None]).to(torch.float8_e4m3fn)
            del w16
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            w_bf16 = torch.empty(copies, n, k, dtype=torch.bfloat16, device="cuda").normal_(0, .02)
            t_bf16 = graph_time_us(lambda i: x @ w_bf16[i].t(), copies)
            del w_bf16
            limit = max(2 * m * n * k / (peak * 1e6), (n * k + m * k) / bandwidth * 1e6
                        + m * n * 2 / bandwidth * 1e6)

            def ours(i, config=None):
                xq, xs = FG.quantize_rows_fp8(x)
                return FG.fp8_gemm(xq, xs, wq[i], ws[i], torch.bfloat16, config=config)
            ref = FG.fp8_gemm_ref(*FG.quantize_rows_fp8(x), wq[0], ws[0], torch.float32)
            err = ((ours(0).float() - ref).norm() / ref.norm()).item()
            t_ours = graph_time_us(ours, copies)
            best, best_cfg = t_ours, "default"
            for bm, bn, warps, stages in FP8_CONFIGS:
                c = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                if bm > 16 and bm >= 2 * max(m, 16):
                    continue
                try:
                    t = graph_time_us(lambda i: ours(i, c), copies)
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit
                    log(f"{name} {c}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                if t < best:
                    best, best_cfg = t, f"{bm}x{bn}/w{warps}/s{stages}"
            xs_row = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)

            def peer(i):
                xq = (x.float() / xs_row).to(torch.float8_e4m3fn)
                return torch._scaled_mm(xq, wq_col[i].t(), xs_row, wcol[i][None, :],
                                        out_dtype=torch.bfloat16)
            try:
                t_peer = graph_time_us(peer, copies)
            except Exception as exc:  # noqa: BLE001
                log(f"_scaled_mm rowwise: {type(exc).__name__}: {str(exc)[:120]}")
                t_peer = float("nan")
            # cuBLASLt's block scaling with our layout (1 x 128 groups on both sides, scales
            # column-major as its documentation asks). Layouts tried in turn, the first that
            # runs and agrees with the reference is timed.
            def block(i, b_scale):
                xq, xs = FG.quantize_rows_fp8(x)
                return torch._scaled_mm(xq, wq[i].t(), xs, b_scale(i), out_dtype=torch.bfloat16)
            t_block, block_note = float("nan"), "error"
            for label, b_scale in (("[N,G] col-major", lambda i: ws[i]),
                                   ("[G,N] row-major", lambda i: ws[i].t())):
                try:
                    got = block(0, b_scale).float()
                    berr = ((got - ref).norm() / ref.norm()).item()
                    if berr > 1e-2:
                        block_note = f"{label} wrong ({berr:.0e})"
                        continue
                    t_block = graph_time_us(lambda i: block(i, b_scale), copies)
                    block_note = f"{t_block:.1f} ({label}, err {berr:.0e})"
                    break
                except Exception as exc:  # noqa: BLE001
                    log(f"_scaled_mm 1x128 {label}: {type(exc).__name__}: {str(exc)[:300]}")
            for key, val in (("bf16", t_bf16), ("limit", limit), ("ours", t_ours),
                             ("best", best), ("peer", t_peer), ("block", t_block)):
                totals[key] += val * calls
            print(f"| {m} | {name} | {n} x {k} | {t_bf16:.1f} | {limit:.1f} | {t_ours:.1f} "
                  f"(err {err:.0e}) | {100 * limit / t_ours:.0f}% | {t_bf16 / t_ours:.2f} | "
                  f"{t_peer:.1f} | {block_note} | {best_cfg} {best:.1f} |", flush=True)
            del wq, ws, wq_col
            torch.cuda.empty_cache()
        print(f"| {m} | **whole step** | | {totals['bf16'] / 1e3:.2f} ms | "
              f"{totals['limit'] / 1e3:.2f} ms | {totals['ours'] / 1e3:.2f} ms | "
              f"{100 * totals['limit'] / totals['ours']:.0f}% | "
              f"{totals['bf16'] / totals['ours']:.2f} | {totals['peer'] / 1e3:.2f} ms | "
              f"{totals['block'] / 1e3:.2f} ms | best tiles {totals['best'] / 1e3:.2f} ms |",
              flush=True)


def main(argv=None) -> None:
    from shardserve.testing import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--rows", default="256,512")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--fp8", action="store_true",
                   help="--quantization fp8's GEMMs instead (not the LM head, left in bf16)")
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth()
    peak = peak_tflops(dtype)
    log(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
        f"8192^3 bf16 GEMM {peak:.0f} TFLOP/s")
    cfg = dict(PRESETS[args.preset].config)
    if args.fp8:
        fp8_table(cfg, [int(r) for r in args.rows.split(",")], bandwidth, peak)
        return
    print("| M | layer | N x K | limit us | cuBLAS us | % limit | cuBLASLt us | best Triton us | "
          "config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        totals = {"limit": 0.0, "cublas": 0.0, "lt": 0.0, "best": 0.0}
        for name, n, k, calls in decoder_shapes(cfg, 1):
            copies = max(2, min(32, -(-SCRATCH_BYTES // (n * k * 2))))
            ws = torch.empty(copies, n, k, dtype=dtype, device="cuda").normal_(0, 0.02)
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            out = torch.empty(m, n, dtype=dtype, device="cuda")
            c32 = torch.empty(m, n, dtype=torch.float32, device="cuda")
            limit = max(2 * m * n * k / (peak * 1e6), (n * k + m * k + m * n) * 2 / bandwidth * 1e6)
            torch.backends.cuda.preferred_blas_library("cublas")
            t_cublas = graph_time_us(lambda i: torch.matmul(x, ws[i].t(), out=out), copies)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_lt = graph_time_us(lambda i: torch.matmul(x, ws[i].t(), out=out), copies)
            torch.backends.cuda.preferred_blas_library("cublas")
            best, best_cfg = min(t_cublas, t_lt), "cuBLAS"
            t_triton = float("nan")
            ref = F.linear(x, ws[0]).float()
            if not args.no_triton:
                for tc in TRITON_CONFIGS:
                    if k % (tc[2] * tc[3]):
                        continue
                    try:
                        got = triton_linear(x, ws[0], tc, c32, out).float()
                        err = ((got - ref).norm() / ref.norm()).item()
                        if err > 1e-2:
                            log(f"{name} {tc}: wrong ({err:.2e}), skipped")
                            continue
                        t = graph_time_us(lambda i: triton_linear(x, ws[i], tc, c32, out), copies)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile
                        log(f"{name} {tc}: {type(exc).__name__}: {str(exc)[:120]}")
                        continue
                    if not t_triton <= t:
                        t_triton, tri_cfg = t, tc
                if t_triton < best:
                    best, best_cfg = t_triton, str(tri_cfg)
            for key, val in (("limit", limit), ("cublas", t_cublas), ("lt", t_lt),
                             ("best", best)):
                totals[key] += val * calls
            print(f"| {m} | {name} | {n} x {k} | {limit:.1f} | {t_cublas:.1f} | "
                  f"{100 * limit / t_cublas:.0f}% | {t_lt:.1f} | {t_triton:.1f} | {best_cfg} |",
                  flush=True)
            del ws
            torch.cuda.empty_cache()
        print(f"| {m} | **whole step** | | {totals['limit'] / 1e3:.2f} ms | "
              f"{totals['cublas'] / 1e3:.2f} ms | {100 * totals['limit'] / totals['cublas']:.0f}% "
              f"| {totals['lt'] / 1e3:.2f} ms | best of all {totals['best'] / 1e3:.2f} ms | |",
              flush=True)


if __name__ == "__main__":
    main()
