"""Compile every Triton kernel in shardserve/kernels (this file's configurations) for an H100/H200
(sm_90) on any machine, no GPU needed, and print what the compiler reports: registers per
thread, spilled bytes, shared memory, whether loads are 16 bytes wide and which matrix
instructions were used. Catches compile errors and register spills before a GPU is involved.

    python benchmarks/kernels_resources.py [--dtypes bf16,fp16,fp32] [--arch 90] [--only decode]

Attention is compiled over caches of the query's type and, for half-precision queries, over an
fp8 cache (--kv-cache-dtype fp8) with that cache's default tiles.

Uses the ptxas and cuobjdump that ship inside the triton wheel. "local" is local memory per
thread (register spills, or arrays the compiler could not keep in registers).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from shardserve.kernels import decode_attention as DA  # noqa: E402
from shardserve.kernels import prefill_attention as PA  # noqa: E402
from shardserve.kernels import rms_norm as RN  # noqa: E402
from shardserve.kernels import rotary as RO  # noqa: E402
from shardserve.kernels import silu_and_mul as SM  # noqa: E402
from shardserve.kernels import store_kv as SK  # noqa: E402

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_and_report(tag: str, fn, types: dict, consts: dict, arch: int, num_warps: int,
                       num_stages: int = 2, aligned: tuple = ()) -> bool:
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    # Pointers and strides the launcher would mark 16-divisible (vectorized access).
    # Default: what the launcher marks for Llama-like sizes (every int but head counts is a
    # multiple of 16, every pointer 16-byte aligned).
    aligned = aligned or tuple(n for n in fn.arg_names if n not in consts
                               and types.get(n, "i32") != "fp32" and not n.startswith("num_"))
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # report every failure, keep going
        print(f"{tag:62s} COMPILE ERROR: {type(e).__name__}: {str(e)[:300]}")
        return False
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        info = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path],
                              capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", info)
    spill = re.search(r"LOCAL:(\d+)", info)  # local memory per thread: spills and stack arrays
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "-"
    regs = regs.group(1) if regs else "?"
    spill = spill.group(1) if spill else "?"
    v4 = len(re.findall(r"ld.global(?:.nc)?.v4", ptx))
    print(f"{tag:62s} regs {regs:>3}  local {spill:>5}B  smem {k.metadata.shared:>6}B  "
          f"v4 loads {v4:>3}  {mma}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default="", help="compile only kernels whose tag contains it")
    args = parser.parse_args()

    def report(tag: str, *a, **kw) -> bool:
        return compile_and_report(tag, *a, **kw) if args.only in tag else True
    print(f"triton {triton.__version__}, sm_{args.arch}")
    ok = True
    aligned_attn = ("out_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr", "stride_qt", "stride_qh",
                    "stride_ot", "stride_oh", "stride_cb", "stride_co", "stride_ch", "head_size")
    for dt in args.dtypes.split(","):
        tdt, ptr = TORCH_DTYPES[dt], "*" + dt
        ok &= report(
            f"store_kv {dt} 8x128", SK._store_kv_kernel,
            {n: ptr for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")}
            | {"slot_mapping_ptr": "*i64"}, {"BLOCK_H": 8, "BLOCK_D": 128}, args.arch, 4,
            aligned=("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr", "stride_kt",
                     "stride_kh", "stride_vt", "stride_vh", "stride_cb", "stride_co",
                     "stride_ch", "head_size", "block_size"))
        caches = [("", ptr)] + ([] if dt == "fp32" else [(" fp8 cache", "*fp8e4nv")])
        precision = "tf32x3" if dt == "fp32" else "tf32"
        for cache_tag, cache_ptr in caches:
            attn_types = {"out_ptr": ptr, "q_ptr": ptr, "k_cache_ptr": cache_ptr,
                          "v_cache_ptr": cache_ptr, "block_tables_ptr": "*i32",
                          "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                          "scale_log2e": "fp32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
            fp8 = cache_ptr == "*fp8e4nv"
            for head in (64, 128, 256):
                for group in (1, 4, 8):
                    cfg = PA.default_prefill_config(head, tdt)
                    bm = max(cfg["block_m"], 16, group)
                    ok &= report(
                        f"prefill {dt}{cache_tag} head {head} group {group} "
                        f"({bm}x{cfg['block_n']})",
                        PA._prefill_attention_kernel, attn_types,
                        dict(GROUP=group, BLOCK_Q=bm // group, BLOCK_M=bm,
                             BLOCK_N=cfg["block_n"], BLOCK_D=head, BLOCK_SIZE=16,
                             DOT_PRECISION=precision, FP8_AS_FP16=fp8, SKIP_DECODES=True),
                        args.arch, cfg["num_warps"], cfg["num_stages"], aligned_attn)
                    dcfg = DA.default_decode_config(head, tdt, 1 if fp8 else tdt.itemsize)
                    for split in (False, True):
                        ok &= report(
                            f"decode {dt}{cache_tag} head {head} group {group} split={split} "
                            f"({dcfg['block_n']}/{dcfg['num_warps']}/{dcfg['num_stages']})",
                            DA._decode_kernel, attn_types,
                            dict(GROUP=group, BLOCK_H=max(16, group), BLOCK_N=dcfg["block_n"],
                                 BLOCK_D=head, BLOCK_SIZE=16, SPLIT=split,
                                 DOT_PRECISION=precision, FP8_AS_FP16=fp8),
                            args.arch, dcfg["num_warps"], dcfg["num_stages"], aligned_attn)
        ok &= report(
            f"decode reduce {dt} 64 splits", DA._decode_reduce_kernel, attn_types,
            dict(BLOCK_S=DA.MAX_SPLITS, BLOCK_D=128, BLOCK_N=64), args.arch, 4,
            aligned=("out_ptr", "part_out_ptr", "head_size"))
        norm_types = {n: ptr for n in ("out_ptr", "residual_out_ptr", "x_ptr", "residual_ptr",
                                       "weight_ptr")} | {"eps": "fp32"}
        for has_res in (True, False):
            ok &= report(f"rms_norm {dt} 4096 residual={has_res}",
                                     RN._rms_norm_kernel, norm_types,
                                     {"HAS_RESIDUAL": has_res, "BLOCK": 4096}, args.arch, 8)
        ok &= report(f"silu_and_mul {dt}", SM._silu_and_mul_kernel,
                                 {"out_ptr": ptr, "x_ptr": ptr}, {"BLOCK": 1024}, args.arch, 4)
        for neox in (True, False):
            ok &= report(
                f"rotary {dt} 32+8 heads neox={neox}", RO._rotary_kernel,
                {"q_ptr": ptr, "k_ptr": ptr, "positions_ptr": "*i64", "cos_sin_ptr": "*fp32"},
                {"BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_R": 64, "IS_NEOX": neox}, args.arch, 4)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
