"""Would two half-batches on two CUDA streams make a decode step faster? (issue 3)

A decode step of the Llama-3-8B shape at 256 rows is memory-bound attention (8.3 ms reading the
fp8 K/V) followed by compute-bound GEMMs (6.4 ms), one after the other (BENCHMARKS.md, session
6). Split the batch in two and run the halves on two streams, and one half's attention can run
beside the other half's GEMMs (NanoFlow's idea), at the price of reading the weights twice.
This probe times exactly the kernels the engine launches for such a step (cuBLAS projections,
the Triton decode kernel over a paged fp8 cache, SiLU-and-mul; 32 layers and the LM head; the
small norm/rotary kernels left out), each variant captured in one CUDA graph:

    seq        all rows on one stream (what the engine does today)
    two        two halves, two streams, each free-running
    stagger    two halves, the second starting once the first has finished layer 0's qkv
    carve N    as stagger, cuBLAS told to leave N SMs free (torch's SM carve-out)

    python benchmarks/overlap_probe.py --rows 256,512
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import log  # noqa: E402
from shardserve.kernels.decode_attention import decode_attention  # noqa: E402
from shardserve.kernels.silu_and_mul import silu_and_mul  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD, VOCAB, BLOCK = 4096, 14336, 32, 8, 128, 128256, 16


class Half:
    """Requests [lo, hi) of the batch: their query offsets, lengths and block tables."""

    def __init__(self, lens: list[int], tables: torch.Tensor, lo: int, hi: int):
        n = hi - lo
        self.rows = n
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device="cuda")
        self.seq_lens = torch.tensor(lens[lo:hi], dtype=torch.int32, device="cuda")
        self.tables = tables[lo:hi].contiguous()
        self.max_len = max(lens[lo:hi])
        self.x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device="cuda")
        self.attn = torch.empty(n, HEADS, HEAD, dtype=torch.bfloat16, device="cuda")


def forward(half: Half, layers, caches, lm_head, after_first_qkv=None):
    """One decode step's kernels for `half`'s rows; after_first_qkv() runs after layer 0's qkv."""
    x = half.x
    for i, (w_qkv, w_o, w_gu, w_down) in enumerate(layers):
        qkv = F.linear(x, w_qkv)
        if i == 0 and after_first_qkv is not None:
            after_first_qkv()
        q = qkv[:, :HEADS * HEAD].view(half.rows, HEADS, HEAD)
        k_cache, v_cache = caches[i]
        decode_attention(q, k_cache, v_cache, half.qsl, half.seq_lens, half.tables,
                         half.max_len, HEAD ** -0.5, out=half.attn)
        h = F.linear(half.attn.view(half.rows, -1), w_o) + x
        x = F.linear(silu_and_mul(F.linear(h, w_gu)), w_down) + h
    return F.linear(x, lm_head)


def time_graph(fn, iters: int) -> float:
    """Milliseconds per replay of fn captured in one CUDA graph (median of iters)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture (Triton compiles, cuBLAS picks)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return sorted(times)[len(times) // 2]


def two_streams(run_a, run_b, stagger: bool):
    """Fork run_a and run_b onto two streams of the capturing stream and join them."""
    main = torch.cuda.current_stream()
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    sa.wait_stream(main)
    sb.wait_stream(main)
    started = torch.cuda.Event()
    with torch.cuda.stream(sa):
        run_a(started.record if stagger else None)
    with torch.cuda.stream(sb):
        if stagger:
            sb.wait_event(started)
        run_b(None)
    main.wait_stream(sa)
    main.wait_stream(sb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="256,512")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", default="1000,2000", help="uniform range of context lengths")
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=["fp8", "bf16"])
    ap.add_argument("--carveouts", default="16,32,48")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    lo_ctx, hi_ctx = (int(c) for c in args.context.split(","))
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)

    def weight(n, k):
        return (torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16)
                * k ** -0.5)

    log(f"weights: {args.layers} layers of the Llama-3-8B shape")
    layers = [(weight((HEADS + 2 * KV_HEADS) * HEAD, HIDDEN), weight(HIDDEN, HIDDEN),
               weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER)) for _ in range(args.layers)]
    lm_head = weight(VOCAB, HIDDEN)
    max_rows = max(rows_list)
    rng = random.Random(0)
    lens = [rng.randint(lo_ctx, hi_ctx) for _ in range(max_rows)]
    blocks = [-(-n // BLOCK) for n in lens]
    tables = torch.zeros(max_rows, max(blocks), dtype=torch.int32, device="cuda")
    perm = torch.randperm(sum(blocks), device="cuda", generator=gen).int()
    off = 0
    for i, b in enumerate(blocks):
        tables[i, :b] = perm[off:off + b]
        off += b
    log(f"K/V caches: {sum(blocks)} blocks a layer, {args.kv_cache_dtype}")
    caches = []
    for _ in range(args.layers):
        shape = (sum(blocks), BLOCK, KV_HEADS, HEAD)
        caches.append(tuple(torch.randn(shape, generator=gen, device="cuda",
                                        dtype=torch.bfloat16).to(kv_dtype) for _ in range(2)))
    elem = torch.empty((), dtype=kv_dtype).element_size()
    print(f"{'rows':>5} {'variant':<10} {'ms/step':>8} {'tok/s':>8} {'vs seq':>7}  "
          f"(K/V {'GB':>4}, attention alone ms, GEMMs alone ms)")
    for rows in rows_list:
        whole = Half(lens, tables, 0, rows)
        a, b = Half(lens, tables, 0, rows // 2), Half(lens, tables, rows // 2, rows)
        kv_gb = sum(lens[:rows]) * KV_HEADS * HEAD * 2 * elem * args.layers / 1e9

        def attn_only():
            for i in range(args.layers):
                q = whole.attn  # any [rows, heads, head] tensor
                decode_attention(q, *caches[i], whole.qsl, whole.seq_lens, whole.tables,
                                 whole.max_len, HEAD ** -0.5, out=whole.attn)

        def gemms_only():
            x = whole.x
            for w_qkv, w_o, w_gu, w_down in layers:
                F.linear(x, w_qkv)
                h = F.linear(whole.attn.view(rows, -1), w_o) + x
                x = F.linear(silu_and_mul(F.linear(h, w_gu)), w_down) + h
            F.linear(x, lm_head)

        t_attn = time_graph(attn_only, args.iters)
        t_gemm = time_graph(gemms_only, args.iters)
        t_seq = time_graph(lambda: forward(whole, layers, caches, lm_head), args.iters)
        results = [("seq", t_seq)]
        for name, stagger in (("two", False), ("stagger", True)):
            results.append((name, time_graph(lambda: two_streams(
                lambda cb: forward(a, layers, caches, lm_head, cb),
                lambda cb: forward(b, layers, caches, lm_head, cb), stagger), args.iters)))
        for carve in (int(c) for c in args.carveouts.split(",") if c):
            torch._C._set_sm_carveout_experimental(carve)
            try:
                results.append((f"carve {carve}", time_graph(lambda: two_streams(
                    lambda cb: forward(a, layers, caches, lm_head, cb),
                    lambda cb: forward(b, layers, caches, lm_head, cb), True), args.iters)))
            finally:
                torch._C._set_sm_carveout_experimental(None)
        for name, ms in results:
            print(f"{rows:>5} {name:<10} {ms:>8.2f} {rows / ms * 1e3:>8.0f} {t_seq / ms:>6.2f}x"
                  f"  ({kv_gb:.1f}, {t_attn:.2f}, {t_gemm:.2f})", flush=True)


if __name__ == "__main__":
    main()
