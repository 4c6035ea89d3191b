"""gemv (Triton, one row against [N, K]) against a float64 F.linear: fresh random inputs at odd
sizes (N not a multiple of BLOCK_N, K not a multiple of BLOCK_K), every launch configuration,
with and without bias, a strided input row, and an output poisoned with NaN beforehand.

CPU: Triton's interpreter, small shapes. GPU (marked gpu): the same plus bf16/fp16 at the
Llama-3-8B decode shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.gemv import GEMV_CONFIGS, gemv  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check(n: int, k: int, dtype: torch.dtype, config, bias: bool, seed: int,
           strided: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    wide = torch.randn(1, 3 * k, generator=gen).to(dtype).to(DEVICE)
    x = wide[:, k:2 * k] if not strided else wide[:, ::3][:, :k]
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    got = gemv(x, weight, b, config, out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (1, n)
    ref = torch.nn.functional.linear(x.double(), weight.double(),
                                     b.double() if b is not None else None)
    assert not torch.isnan(got).any(), "rows left unwritten"
    err = (got.double() - ref).norm() / ref.norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
@pytest.mark.parametrize("n,k", [(37, 300), (64, 1024), (5, 2048)])
def test_gemv_matches_reference(config, n, k):
    _check(n, k, torch.float32, config, bias=False, seed=n * k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_bias_and_half_precision(dtype):
    _check(19, 520, dtype, GEMV_CONFIGS[0], bias=True, seed=7)


def test_gemv_strided_row_and_batched_shape():
    _check(23, 256, torch.float32, GEMV_CONFIGS[2], bias=True, seed=8, strided=True)
    # [1, 1, K] in, [1, 1, N] out, as F.linear keeps leading dims.
    w = torch.randn(9, 64, device=DEVICE)
    x = torch.randn(1, 1, 64, device=DEVICE)
    assert gemv(x, w).shape == (1, 1, 9)
    torch.testing.assert_close(gemv(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_refuses_several_rows():
    with pytest.raises(AssertionError, match="single row"):
        gemv(torch.randn(2, 64, device=DEVICE), torch.randn(8, 64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                 (128256, 4096), (3072, 4096), (1000, 333)])
def test_gemv_decode_shapes_gpu(dtype, n, k):
    for config in GEMV_CONFIGS:
        _check(n, k, dtype, config, bias=n == 3072, seed=n + k)
