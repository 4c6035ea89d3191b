"""The FP8 GEMM of --quantization fp8 (kernels/fp8_gemm.py) against its torch reference, and the
reference's quantization against the scheme's definition.

CPU: the Triton GEMM through the interpreter; the quantization kernel's rounding only on the GPU
(the interpreter rounds float32 -> fp8 wrongly, kernel_cases.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels import fp8_gemm as F  # noqa: E402
from tests.kernels.kernel_cases import DEVICE, FP8_STORE_NEEDS_GPU, INTERPRET  # noqa: E402


def test_quantize_rows_ref_follows_the_scheme():
    """One scale per row and 128 columns (a last group of 44), amax / 448; values within
    e4m3's rounding of the input; an all-zero group stays zero, never NaN."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=gen) * torch.logspace(-3, 3, 300)
    x[2] = 0.0
    q, s = F.quantize_rows_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 300) and s.shape == (5, 3)
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        amax = x[:, lo:hi].abs().amax(1).clamp_min(F.MIN_AMAX)
        assert torch.allclose(s[:, g], amax / 448.0)
    back = F.dequantize_rows_fp8(q, s)
    scale = s.repeat_interleave(128, 1)[:, :300]
    # e4m3: 3 mantissa bits (half an ulp is 2^-4 relative); below 2^-6 subnormal steps of 2^-9.
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -10).all()
    assert torch.equal(back[2], torch.zeros(300)) and torch.isfinite(back).all()


# (M, N, K): single row (decode), a partial row tile, a partial K group, the prompt-step tiles.
SHAPES = [(1, 64, 128), (5, 33, 200), (17, 96, 256), (70, 130, 384)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_reference(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen) * 3
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    xq, xs = F.quantize_rows_fp8_ref(x)
    wq, ws = F.quantize_rows_fp8_ref(w)
    ref = F.fp8_gemm_ref(xq, xs, wq, ws, torch.float32, b)
    # FP8 against the float product: the scheme's own error (e4m3 on both sides), a few %.
    assert ((ref - (x @ w.t() + (b if bias else 0))).norm() / ref.norm()) < 0.08
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("no GPU and no interpreter to run the Triton kernel")
    out = F.fp8_gemm(on(xq), on(xs), on(wq), on(ws), torch.float32, on(b),
                     config=(F.gemm_config(m, n) if DEVICE == "cuda" else
                             {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}),
                     triton_kernel=True)
    # The matrix units sum each 128-product group at reduced precision on the GPU.
    tol = 1e-5 if DEVICE == "cpu" else 2e-3
    assert ((out.cpu() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.skipif(INTERPRET or DEVICE == "cpu", reason=FP8_STORE_NEEDS_GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_quantize_kernel_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 1000, generator=gen) * torch.logspace(-2, 2, 1000)).to(dtype)
    q, s = F.quantize_rows_fp8(x.cuda())
    q_ref, s_ref = F.quantize_rows_fp8_ref(x)
    # The same operations; the compiler may divide by the constant 448 as a multiplication.
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    assert (q.cpu().float() != q_ref.float()).float().mean() < 1e-3  # rounding ties only


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 256, 4096])
def test_gpu_gemm_llama_shapes(m):
    """Llama-3-8B's gate_up and down at decode and prompt-step row counts, bf16 out."""
    for n, k in ((28672, 4096), (4096, 14336)):
        gen = torch.Generator(device="cuda").manual_seed(m + n)
        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        xq, xs = F.quantize_rows_fp8(x)
        wq, ws = F.quantize_rows_fp8(w)
        out = F.fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
        ref = F.fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
        assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 30, 256])
def test_gpu_default_path_matches_reference(m):
    """What the layers call (cuBLASLt's block scaling on Hopper, rows padded to fours; the Triton
    kernel elsewhere), with a bias and a K of whole groups."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 512, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    b = torch.randn(384, device="cuda", generator=gen, dtype=torch.bfloat16)
    xq, xs = F.quantize_rows_fp8(x)
    wq, ws = F.quantize_rows_fp8(w)
    out = F.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, b)
    ref = F.fp8_gemm_ref(xq, xs, wq, ws, torch.float32, b)
    assert out.shape == (m, 384)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
