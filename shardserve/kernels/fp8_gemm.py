"""FP8 (e4m3) GEMM with group scales: Y = X W^T for `--quantization fp8`.

Both operands are quantized in groups of GROUP = 128 consecutive elements along K, each group
with its own float32 scale (the scheme DeepSeek-V3 trains with, which its FP8 checkpoints and
vLLM's block-FP8 kernels use):

    X  [M, K] -> Xq [M, K] e4m3, Xs [M, G]     Xs[m, g] = max|X[m, g*128:(g+1)*128]| / 448
    W  [N, K] -> Wq [N, K] e4m3, Ws [N, G]     the same per weight row (at load)
    Y[m, n] = sum_g Xs[m, g] * Ws[n, g] * sum_{k in g} Xq[m, k] * Wq[n, k]

G = ceil(K / 128); a last partial group is scaled over the elements it has. Scaling per row
and group, not per 128 x 128 weight block, keeps every row independent: a rank's rows of a
tensor-parallel shard (or a fused q/k/v part of any size) quantize the same alone as in the
whole matrix, and a block-FP8 checkpoint's scales spread to its rows exactly.

Each group's products are summed by the matrix units and scaled in float32 before the next
group's are added, so no more than 128 products ever share the units' reduced-precision
accumulator (what DeepSeek-V3's report recommends for Hopper's FP8 MMA).

    quantize_rows_fp8(x)            the activations' quantization, each step (Triton on CUDA)
    fp8_gemm(xq, xs, wq, ws, ...)   the GEMM (Triton on CUDA)
    *_ref                            torch references, also the CPU path
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardserve.config import FP8_GROUP_SIZE as GROUP
FP8_MAX = 448.0  # largest finite e4m3fn
FP8 = torch.float8_e4m3fn
# An all-zero group gets this scale (not 0: the GEMM multiplies by it, and 0 * inf is NaN).
MIN_AMAX = 1e-12


def num_groups(k: int) -> int:
    return triton.cdiv(k, GROUP)


# ---- torch references (and the CPU path) ------------------------------------------------------

def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (e4m3 [M, K], float32 scales [M, G])."""
    m, k = x.shape
    g = num_groups(k)
    padded = torch.nn.functional.pad(x.float(), (0, g * GROUP - k)).view(m, g, GROUP)
    scale = padded.abs().amax(dim=-1).clamp_min(MIN_AMAX) / FP8_MAX
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, g * GROUP)[:, :k].contiguous(), scale


def dequantize_rows_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(e4m3 [M, K], scales [M, G]) -> float32 [M, K]."""
    m, k = q.shape
    g = scale.shape[1]
    padded = torch.nn.functional.pad(q.float(), (0, g * GROUP - k)).view(m, g, GROUP)
    return (padded * scale[..., None]).view(m, g * GROUP)[:, :k]


def fp8_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = dequantize_rows_fp8(xq, xs) @ dequantize_rows_fp8(wq, ws).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---- Triton ---------------------------------------------------------------------------------------

@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg,
                          GROUP_SIZE: tl.constexpr, FP8_MAX_C: tl.constexpr,
                          MIN_AMAX_C: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    cols = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = cols < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), MIN_AMAX_C) / FP8_MAX_C
    q = tl.clamp(x / scale, -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + row.to(tl.int64) * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row.to(tl.int64) * stride_sm + g * stride_sg, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, G]); Triton on CUDA, torch elsewhere."""
    if not x.is_cuda:
        return quantize_rows_fp8_ref(x)
    assert x.dim() == 2 and x.stride(-1) == 1
    m, k = x.shape
    g = num_groups(k)
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    # Column-major scales (a group's scales of all rows side by side): the GEMM then reads a
    # group's scales of a tile in one coalesced load, and cuBLASLt's block scaling wants them so.
    s = torch.empty((g, m), dtype=torch.float32, device=x.device).t()
    if m:
        _quantize_rows_kernel[(m, g)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                                      s.stride(1), GROUP_SIZE=GROUP, FP8_MAX_C=FP8_MAX,
                                      MIN_AMAX_C=MIN_AMAX, num_warps=1)
    return q, s


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, num_groups,
                     stride_am, stride_asm, stride_asg, stride_bn, stride_bsn, stride_bsg,
                     stride_cm,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, SWIZZLE_M: tl.constexpr):
    # Programs walk the output in bands of SWIZZLE_M row tiles so that neighbours share the
    # weight tiles they read while those are still in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = pid // (SWIZZLE_M * tiles_n)
    first_m = band * SWIZZLE_M
    band_m = tl.minimum(tiles_m - first_m, SWIZZLE_M)
    pid_m = first_m + (pid % (SWIZZLE_M * tiles_n)) % band_m
    pid_n = (pid % (SWIZZLE_M * tiles_n)) // band_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    ks = tl.arange(0, GROUP_SIZE)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, num_groups):
        k = g * GROUP_SIZE + ks
        kmask = k < K
        a = tl.load(a_rows + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_rows + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        a_s = tl.load(as_ptr + rows * stride_asm + g * stride_asg, mask=rmask, other=0.0)
        b_s = tl.load(bs_ptr + cols * stride_bsn + g * stride_bsg, mask=cmask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def gemm_config(m: int, n: int) -> dict[str, int]:
    """Tiles by the number of rows: decode steps are a weight stream (small BLOCK_M, every SM
    busy on N), prompt steps compute-bound (128 x 128 tiles, 8 warps)."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 32:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
    if m <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype, bias: torch.Tensor | None = None,
             config: dict[str, int] | None = None, triton_kernel: bool | None = None
             ) -> torch.Tensor:
    """(xq [M, K], xs [M, G]) x (wq [N, K], ws [N, G])^T -> [M, N] in out_dtype, plus bias.
    triton_kernel: None, on CUDA cuBLASLt's block scaling where it applies (Hopper, K whole
    groups, half-precision out) and else the Triton kernel, elsewhere the reference; True
    forces the Triton kernel (the CPU tests run it through Triton's interpreter)."""
    if not (xq.is_cuda if triton_kernel is None else triton_kernel):
        return fp8_gemm_ref(xq, xs, wq, ws, out_dtype, bias)
    if triton_kernel is None:
        out = _cublaslt_gemm(xq, xs, wq, ws, out_dtype)
        if out is not None:
            return out if bias is None else out.add_(bias)
    m, k = xq.shape
    n = wq.shape[0]
    assert wq.shape[1] == k and xs.shape == (m, num_groups(k)) and ws.shape == (n, xs.shape[1])
    assert xq.stride(-1) == 1 and wq.stride(-1) == 1
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    cfg = dict(config or gemm_config(m, n))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        xq, xs, wq, ws, bias if bias is not None else out, out, m, n, k, xs.shape[1],
        xq.stride(0), xs.stride(0), xs.stride(1), wq.stride(0), ws.stride(0), ws.stride(1),
        out.stride(0),
        HAS_BIAS=bias is not None, GROUP_SIZE=GROUP, SWIZZLE_M=8, **cfg)
    return out


# On Hopper, cuBLASLt's block scaling (torch._scaled_mm with per-128-column scales on both
# sides) takes the GEMM whenever K is whole groups: on an H200 it runs Llama-3-8B's layers at
# about bf16's speed (a step's GEMMs at 256 rows 6.35 against 6.05 ms, at 4,096 rows 72.6
# against 72.2 ms, at one row 3.73 against 4.29 ms), where this Triton kernel is slower at one
# row (5.3 ms) and no faster above (BENCHMARKS.md, session 9).
_cublaslt_refused: set[tuple] = set()


@functools.cache
def _is_hopper(device_index: int) -> bool:
    # Asked once per device: the GEMM runs for every projection of every step.
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def _cublaslt_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor | None:
    """torch._scaled_mm with 1 x 128 block scales, or None where it does not apply: K not
    whole groups, not Hopper, or a shape cuBLASLt refused once (remembered)."""
    m, k = xq.shape
    n = wq.shape[0]
    key = (n, k, out_dtype, xq.device.index)
    if k % GROUP or key in _cublaslt_refused or out_dtype not in (torch.bfloat16, torch.float16) \
            or not _is_hopper(xq.device.index or 0):
        return None
    rows = -(-m // 4) * 4  # cuBLASLt wants the rows in fours
    if rows != m:
        padded = torch.zeros((rows, k), dtype=xq.dtype, device=xq.device)
        padded[:m] = xq
        scales = torch.ones((xs.shape[1], rows), dtype=xs.dtype, device=xs.device).t()
        scales[:m] = xs
        xq, xs = padded, scales
    if xs.stride(0) != 1:  # column-major, as quantize_rows_fp8 writes them
        xs = xs.t().contiguous().t()
    try:
        out = torch._scaled_mm(xq, wq.t(), xs, ws.t().contiguous() if ws.stride(0) != 1
                               else ws.t(), out_dtype=out_dtype)
    except RuntimeError:
        _cublaslt_refused.add(key)
        return None
    return out[:m] if rows != m else out
