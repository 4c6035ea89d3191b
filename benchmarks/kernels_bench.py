"""Triton kernels on one GPU, side by side with what they replace: paged attention against the
torch reference backend and torch SDPA (flash) on dense, unpaged tensors; store_kv against
index_copy_; fused RMSNorm+residual, SiLU-and-mul and rotary against the torch layers (eager,
and torch.compile). Llama-3-8B shapes: 32 query heads, 8 KV heads, head 128, hidden 4096,
intermediate 14336, bf16, KV blocks of 16 tokens.

    python benchmarks/kernels_bench.py             # everything, one run (a few minutes)
    python benchmarks/kernels_bench.py --quick     # no sweeps, no torch reference/compile
    python benchmarks/kernels_bench.py --cpu-smoke # tiny shapes through Triton's interpreter:
                                                   # checks the script itself, times nothing
    python benchmarks/kernels_bench.py --only decode-tiles   # decode tiles, bf16 and fp8 caches
    python benchmarks/kernels_bench.py --quick --only decode,prefill --kv-cache-dtype fp8
                                                   # the attention kernels over an fp8 cache
                                                   # (SDPA still gets the bf16 values)

Every Triton result is checked first (attention against the float64 reference); a failed check
prints FAIL in its row and the script exits 1 after the tables. Times are medians of
triton.testing.do_bench (CUDA events, L2 flushed before each call), in microseconds.

Rooflines: decode reads every request's whole K/V once, so its floor is KV bytes / HBM
bandwidth (4.25 TB/s measured on an H200 here as a device copy counting read + write; measured
again at the start). Prefill is matrix work: 4 * heads * head_size * (sum over queries of the
keys each sees, causal) FLOPs over the dense bf16 rate (789 TFLOP/s measured here). SDPA runs
on dense contiguous K/V with no block table: the yardstick, not something the engine could call
on its paged cache.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from shardserve.kernels.decode_attention import (  # noqa: E402
    MIN_PARTITION, choose_num_splits, decode_attention)
from shardserve.kernels.paged_attention_ref import paged_attention_ref  # noqa: E402
from shardserve.kernels.paged_attention import paged_attention  # noqa: E402
from shardserve.kernels.rms_norm import rms_norm  # noqa: E402
from shardserve.kernels.rotary import rotary_embedding_  # noqa: E402
from shardserve.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from shardserve.kernels.store_kv import store_kv  # noqa: E402
from shardserve.layers.activation import SiluAndMul  # noqa: E402
from shardserve.layers.layernorm import RMSNorm  # noqa: E402
from shardserve.layers.rotary import get_rope  # noqa: E402

HBM_BYTES_PER_S = 4.25e12
BF16_FLOPS = 789e12
HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
HIDDEN, INTERMEDIATE = 4096, 14336
DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
if SMOKE:  # tiny, so the interpreter gets through it in a minute
    HEADS, KV_HEADS, HEAD, HIDDEN, INTERMEDIATE = 4, 2, 32, 64, 96
FAILURES: list[str] = []
KV_DTYPE = DTYPE  # --kv-cache-dtype fp8: torch.float8_e4m3fn


def bench(fn, rep: int = 100) -> float:
    """Median microseconds (smoke: one call, wall clock)."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1.5e-2) -> str:
    if torch.isnan(out).any():
        FAILURES.append(name)
        return "FAIL(nan)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    if not err <= tol:
        FAILURES.append(name)
        return f"FAIL({err:.1e})"
    return f"ok({err:.0e})"


class Paged:
    """A batch over a paged cache: (cached, new) tokens per request; physical blocks shuffled."""

    def __init__(self, specs: list[tuple[int, int]], seed: int = 0,
                 kv_dtype: torch.dtype | None = None):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.specs = specs
        self.seq_lens_cpu = [c + q for c, q in specs]
        nblk = [math.ceil(s / BLOCK) for s in self.seq_lens_cpu]
        num_blocks = sum(nblk)
        perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).int()
        self.block_tables = torch.zeros(len(specs), max(nblk), dtype=torch.int32, device=DEVICE)
        offs = 0
        for i, n in enumerate(nblk):
            self.block_tables[i, :n] = perm[offs:offs + n]
            offs += n
        shape = (num_blocks, BLOCK, KV_HEADS, HEAD)
        kv_dtype = kv_dtype or KV_DTYPE
        self.k_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE).to(kv_dtype)
        self.v_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE).to(kv_dtype)
        self.qsl_cpu = [0]
        for _, q in specs:
            self.qsl_cpu.append(self.qsl_cpu[-1] + q)
        self.num_tokens = self.qsl_cpu[-1]
        self.query = torch.randn(self.num_tokens, HEADS, HEAD, generator=gen, device=DEVICE,
                                 dtype=DTYPE)
        self.qsl = torch.tensor(self.qsl_cpu, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor(self.seq_lens_cpu, dtype=torch.int32, device=DEVICE)
        self.max_seq_len = max(self.seq_lens_cpu)
        self.scale = HEAD ** -0.5

    def kv_bytes(self) -> int:
        return sum(self.seq_lens_cpu) * KV_HEADS * HEAD * 2 * self.k_cache.element_size()

    def flops(self) -> float:
        keys_seen = sum((c + 1 + c + q) * q // 2 for c, q in self.specs)
        return 4.0 * HEADS * HEAD * keys_seen

    def reference(self, dtype=torch.float64) -> torch.Tensor:
        return paged_attention_ref(self.query.to(dtype), self.k_cache.to(dtype),
                                   self.v_cache.to(dtype), self.block_tables, self.qsl_cpu,
                                   self.seq_lens_cpu, self.scale)

    def dense(self, rep_kv: bool = False):
        """[B, H, S, D] query/key/value for SDPA (every request the same shape)."""
        b, q_len, s = len(self.specs), self.specs[0][1], self.seq_lens_cpu[0]
        tables = self.block_tables.long()

        def gather(cache):
            x = cache.to(DTYPE)[tables].reshape(b, -1, KV_HEADS, HEAD)[:, :s].transpose(1, 2)
            return x.repeat_interleave(HEADS // KV_HEADS, 1) if rep_kv else x.contiguous()
        q = self.query.view(b, q_len, HEADS, HEAD).transpose(1, 2).contiguous()
        return q, gather(self.k_cache), gather(self.v_cache)


def sdpa_time(p: Paged, causal: bool) -> tuple[float, str]:
    """SDPA on dense K/V: flash with native GQA where this torch has it, else flash on K/V
    repeated per query head (repeated outside the timing), else whatever SDPA picks."""
    if SMOKE:
        return float("nan"), "skipped"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for label, backend, rep_kv in (("flash+gqa", SDPBackend.FLASH_ATTENTION, False),
                                   ("flash,kv repeated", SDPBackend.FLASH_ATTENTION, True),
                                   ("sdpa auto", None, True)):
        q, k, v = p.dense(rep_kv=rep_kv)

        def fn():
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                      enable_gqa=not rep_kv)
        try:
            fn()
        except RuntimeError:
            continue
        return bench(fn), label
    return float("nan"), "none"


def measure_ceilings() -> None:
    if SMOKE:
        return
    from triton.testing import do_bench
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * n / (do_bench(lambda: b.copy_(a), rep=200, return_mode="median") * 1e-3)
    x = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    y = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    fl = 2 * 8192 ** 3 / (do_bench(lambda: x @ y, rep=200, return_mode="median") * 1e-3)
    print(f"measured now: device copy {bw / 1e12:.2f} TB/s, bf16 GEMM {fl / 1e12:.0f} TFLOP/s "
          f"(rooflines below use {HBM_BYTES_PER_S / 1e12:.2f} TB/s and {BF16_FLOPS / 1e12:.0f})")


def decode_table(quick: bool) -> None:
    print("\n== decode: one token per request (TB/s = K/V bytes read / time; "
          f"roofline {HBM_BYTES_PER_S / 1e12:.2f} TB/s) ==")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'KV MB':>8} | {'triton us':>9} {'TB/s':>5} "
          f"{'%roof':>5} | {'sdpa us':>8} {'TB/s':>5} | {'ref us':>8} {'x ref':>6} | check")
    shapes = ([(1, 40), (3, 130)] if SMOKE
              else [(b, c) for b in (1, 64, 256) for c in (1024, 4096)])
    sweep = []
    for batch, ctx in shapes:
        p = Paged([(ctx - 1, 1)] * batch, seed=batch + ctx)
        ref = p.reference()
        out = torch.empty_like(p.query)

        def run(ns=None):
            decode_attention(p.query, p.k_cache, p.v_cache, p.qsl, p.seq_lens, p.block_tables,
                             p.max_seq_len, p.scale, out, num_splits=ns)
        out.fill_(float("nan"))
        run()
        status = check(f"decode b{batch} ctx{ctx}", out, ref)
        t = bench(run)
        splits = choose_num_splits(batch, KV_HEADS, p.max_seq_len, p.query.device)
        t_sdpa, sdpa_label = sdpa_time(p, causal=False)
        if sdpa_label != "flash+gqa":
            status += f" [sdpa: {sdpa_label}]"
        t_ref = float("nan") if quick or batch > 64 else bench(lambda: p.reference(DTYPE), 50)
        tbs = p.kv_bytes() / (t * 1e-6) / 1e12
        print(f"{batch:>5} {ctx:>5} {splits:>6} {p.kv_bytes() / 1e6:>8.1f} | {t:>9.1f} "
              f"{tbs:>5.2f} {100 * tbs * 1e12 / HBM_BYTES_PER_S:>4.0f}% | {t_sdpa:>8.1f} "
              f"{p.kv_bytes() / (t_sdpa * 1e-6) / 1e12:>5.2f} | {t_ref:>8.0f} "
              f"{t_ref / t:>5.1f}x | {status}")
        if not quick:
            row = []
            for ns in (1, 2, 4, 8, 16, 32, 64):
                if ns > 1 and ns * MIN_PARTITION > ctx:
                    break  # partitions would fall under MIN_PARTITION keys: same as fewer
                out.fill_(float("nan"))
                run(ns)
                c = check(f"decode b{batch} ctx{ctx} splits={ns}", out, ref)
                row.append((ns, bench(lambda: run(ns)), c))
            sweep.append((batch, ctx, splits, row))
    if sweep:
        print("  split sweep (splits:us; * = the heuristic's choice):")
        for batch, ctx, chosen, row in sweep:
            cells = " ".join(f"{ns}{'*' if ns == chosen else ''}:{t:.1f}"
                             f"{'' if c.startswith('ok') else c}" for ns, t, c in row)
            print(f"    b{batch:<4} ctx{ctx:<5} {cells}   best={min(row, key=lambda r: r[1])[0]}")


def decode_tile_table() -> None:
    """The decode kernel's tiles on one long-context batch (256 requests x 1,500 keys), over a
    bf16 cache and an fp8 one: is it reading at the bandwidth, and which tiles are best?"""
    batch, ctx = (4, 40) if SMOKE else (256, 1500)
    print(f"\n== decode tiles: {batch} requests x {ctx} keys (TB/s of K/V bytes) ==")
    configs = ([(16, 1, 1)] if SMOKE else
               [(bn, w, st) for bn in (32, 64, 128) for w in (1, 2, 4) for st in (1, 2, 3)])
    for kv_dtype in (DTYPE, torch.float8_e4m3fn):
        p = Paged([(ctx - 1, 1)] * batch, seed=ctx, kv_dtype=kv_dtype)
        ref = p.reference()
        out = torch.empty_like(p.query)
        gb = p.kv_bytes() / 1e9
        cells = []
        for bn, w, st in [(None, None, None)] + configs:
            kw = dict(block_n=bn, num_warps=w, num_stages=st,
                      min_partition=max(MIN_PARTITION, bn or 0))
            out.fill_(float("nan"))
            decode_attention(p.query, p.k_cache, p.v_cache, p.qsl, p.seq_lens, p.block_tables,
                             p.max_seq_len, p.scale, out, **kw)
            status = check(f"decode tiles {kv_dtype} {bn}/{w}/{st}", out, ref)
            t = bench(lambda: decode_attention(p.query, p.k_cache, p.v_cache, p.qsl, p.seq_lens,
                                               p.block_tables, p.max_seq_len, p.scale, out,
                                               **kw))
            label = "default" if bn is None else f"bn{bn}/w{w}/s{st}"
            cells.append((t, f"{label}:{t:.0f}us({gb / (t * 1e-6) / 1e3:.2f})"
                          f"{'' if status.startswith('ok') else ' ' + status}"))
        default = cells[0][1]
        best = sorted(cells[1:])[:4]
        print(f"  {str(kv_dtype).replace('torch.', ''):>14} {gb:.2f} GB | {default} | best: "
              + "  ".join(c for _, c in best))


def prefill_table(quick: bool) -> None:
    print(f"\n== prefill: causal, paged (TFLOP/s of attention math; roofline "
          f"{BF16_FLOPS / 1e12:.0f}; with decodes: both kernels, as the backend runs them) ==")
    print(f"{'case':>27} {'tokens':>6} | {'triton us':>9} {'TFLOP/s':>7} {'%roof':>5} | "
          f"{'sdpa us':>8} {'TFLOP/s':>7} | {'ref us':>8} {'x ref':>6} | check")
    n = 32 if SMOKE else 2048
    cases = {
        f"1 x {n} new": [(0, n)],
        f"4 x {n // 4} new": [(0, n // 4)] * 4,
        f"{n} chunk on {n} cached": [(n, n)],
        f"{3 * n // 4} new + {n // 4} decodes": [(0, 3 * n // 4)] + [(n // 2, 1)] * (n // 4),
    }
    for name, specs in cases.items():
        p = Paged(specs, seed=len(name))
        ref = p.reference()
        out = torch.empty_like(p.query)

        decodes = any(q == 1 for _, q in specs)

        def run(**kw):  # as the engine's backend runs the step
            paged_attention(p.query, p.k_cache, p.v_cache, p.qsl, p.seq_lens, p.block_tables,
                            p.max_seq_len, p.scale, out, has_prefills=True,
                            has_decodes=decodes, **kw)
        out.fill_(float("nan"))
        run()
        status = check(f"prefill {name}", out, ref)
        t = bench(run)
        t_sdpa = float("nan")
        if all(c == 0 and q == specs[0][1] for c, q in specs):  # dense causal SDPA applies
            t_sdpa, sdpa_label = sdpa_time(p, causal=True)
            if sdpa_label != "flash+gqa":
                status += f" [sdpa: {sdpa_label}]"
        t_ref = float("nan") if quick else bench(lambda: p.reference(DTYPE), 50)
        fl = p.flops()
        print(f"{name:>27} {p.num_tokens:>6} | {t:>9.1f} {fl / (t * 1e-6) / 1e12:>7.1f} "
              f"{100 * fl / (t * 1e-6) / BF16_FLOPS:>4.0f}% | {t_sdpa:>8.1f} "
              f"{fl / (t_sdpa * 1e-6) / 1e12:>7.1f} | {t_ref:>8.0f} {t_ref / t:>5.1f}x | "
              f"{status}")
        if not quick and name.startswith("1 x"):
            cells = []
            for bm, bn, w, s in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                 (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3),
                                 (64, 128, 4, 2), (128, 64, 4, 2)):
                kw = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                try:
                    out.fill_(float("nan"))
                    run(**kw)
                    c = check(f"prefill sweep {bm}/{bn}/{w}/{s}", out, ref)
                    tt = bench(lambda: run(**kw))
                    cells.append(f"({bm},{bn},{w},{s}):{tt:.0f}"
                                 f"{'' if c.startswith('ok') else ' ' + c}")
                except Exception as e:  # e.g. out of shared memory: report it, keep going
                    cells.append(f"({bm},{bn},{w},{s}):{type(e).__name__}")
            print("  tile sweep on this case, (block_m,block_n,warps,stages):us; "
                  "default is the first")
            for i in range(0, len(cells), 4):
                print("   ", "  ".join(cells[i:i + 4]))


def store_table() -> None:
    print("\n== store_kv (TB/s = K/V bytes read + written / time) ==")
    for num_tokens in ((5, 33) if SMOKE else (64, 256, 2048, 16384)):
        gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
        k = torch.randn(num_tokens, KV_HEADS, HEAD, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(k.shape, device=DEVICE, dtype=DTYPE, generator=gen)
        num_blocks = num_tokens // BLOCK + 8
        kc = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, device=DEVICE, dtype=DTYPE,
                         generator=gen)
        vc = torch.randn(kc.shape, device=DEVICE, dtype=DTYPE, generator=gen)
        slots = torch.randperm(num_blocks * BLOCK, device=DEVICE, generator=gen)[:num_tokens]
        kr, vr = kc.clone(), vc.clone()
        store_kv(k, v, kc, vc, slots)
        kr.view(-1, KV_HEADS, HEAD).index_copy_(0, slots, k)
        vr.view(-1, KV_HEADS, HEAD).index_copy_(0, slots, v)
        ok = torch.equal(kc, kr) and torch.equal(vc, vr)
        if not ok:
            FAILURES.append(f"store_kv {num_tokens}")
        t = bench(lambda: store_kv(k, v, kc, vc, slots))
        t_ref = bench(lambda: (kr.view(-1, KV_HEADS, HEAD).index_copy_(0, slots, k),
                               vr.view(-1, KV_HEADS, HEAD).index_copy_(0, slots, v)))
        nbytes = 2 * 2 * k.numel() * k.element_size()
        print(f"  {num_tokens:>6} tokens: triton {t:8.1f} us {nbytes / (t * 1e-6) / 1e12:5.2f} "
              f"TB/s | torch index_copy_ x2 {t_ref:8.1f} us | {'ok' if ok else 'FAIL'}")


def fused_table(quick: bool) -> None:
    print("\n== fused elementwise kernels vs the torch layers (TB/s = bytes read + written, "
          "counted once) ==")
    print(f"{'op':>22} {'tokens':>6} | {'triton us':>9} {'TB/s':>5} | {'eager us':>8} "
          f"{'x':>5} | {'compile us':>10} {'x':>5} | check")
    norm = RMSNorm(HIDDEN, 1e-5, params_dtype=DTYPE).to(DEVICE)
    act = SiluAndMul()
    with torch.device(DEVICE):
        rope = get_rope(HEAD, HEAD, 8192, 500000.0)
    compiled = {}
    if not quick and not SMOKE:
        compiled = {"norm": torch.compile(lambda x, r: norm(x, r), dynamic=True),
                    "act": torch.compile(act, dynamic=True),
                    "rope": torch.compile(lambda pos, q, k: rope(pos, q, k), dynamic=True)}
    size = HEAD * (HEADS + 2 * KV_HEADS)
    for num_tokens in ((3, 17) if SMOKE else (1, 64, 256, 2048)):
        gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
        rnd = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=gen)
        norm.weight.data = rnd(HIDDEN)
        x, r = rnd(num_tokens, HIDDEN), rnd(num_tokens, HIDDEN)
        gu = rnd(num_tokens, 2 * INTERMEDIATE)
        qkv = rnd(num_tokens, size)
        q, k = qkv[:, :HEADS * HEAD], qkv[:, HEADS * HEAD:(HEADS + KV_HEADS) * HEAD]
        pos = torch.randint(0, 8192, (num_tokens,), device=DEVICE, generator=gen)
        el = torch.empty((), dtype=DTYPE).element_size()
        rows = [
            ("rmsnorm+residual", lambda: rms_norm(x, norm.weight, 1e-5, r),
             lambda: norm(x, r), lambda: compiled["norm"](x, r),
             4 * num_tokens * HIDDEN * el),
            ("silu_and_mul", lambda: silu_and_mul(gu), lambda: act(gu),
             lambda: compiled["act"](gu), 3 * num_tokens * INTERMEDIATE * el),
            ("rotary q,k (in place)",
             lambda: rotary_embedding_(pos, q, k, rope.cos_sin_cache, HEAD, HEAD),
             lambda: rope(pos, q, k), lambda: compiled["rope"](pos, q, k),
             2 * num_tokens * (HEADS + KV_HEADS) * HEAD * el),
        ]
        for name, ours, eager, comp, nbytes in rows:
            if name.startswith("rotary"):
                ref_q, ref_k = rope(pos, q.clone(), k.clone())
                q_before, k_before = q.clone(), k.clone()
                ours()
                status = check(name, torch.cat([q, k], 1), torch.cat([ref_q, ref_k], 1), 1e-2)
                q.copy_(q_before)
                k.copy_(k_before)
            else:
                got, want = ours(), eager()
                got = torch.cat(got, 1) if isinstance(got, tuple) else got
                want = torch.cat(want, 1) if isinstance(want, tuple) else want
                status = check(name, got, want, 1e-2)
            t, t_eager = bench(ours), bench(eager)
            t_comp = bench(comp) if compiled else float("nan")
            print(f"{name:>22} {num_tokens:>6} | {t:>9.1f} {nbytes / (t * 1e-6) / 1e12:>5.2f} | "
                  f"{t_eager:>8.1f} {t_eager / t:>4.1f}x | {t_comp:>10.1f} {t_comp / t:>4.1f}x | "
                  f"{status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip the tuning sweeps, the torch reference and torch.compile")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes through Triton's interpreter; checks the script only")
    parser.add_argument("--only", default="decode,prefill,store,fused",
                        help="comma-separated tables to run (also: decode-tiles)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: the attention tables read an e4m3 cache")
    args = parser.parse_args()
    global KV_DTYPE
    if args.kv_cache_dtype == "fp8":
        KV_DTYPE = torch.float8_e4m3fn
    if not SMOKE:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --cpu-smoke)"
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"triton {triton.__version__}")
    torch.manual_seed(0)
    measure_ceilings()
    tables = {"decode": lambda: decode_table(args.quick), "decode-tiles": decode_tile_table,
              "prefill": lambda: prefill_table(args.quick),
              "store": store_table, "fused": lambda: fused_table(args.quick)}
    for name in args.only.split(","):
        tables[name]()
    if FAILURES:
        print(f"\nFAILED checks: {FAILURES}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
