"""linear(): F.linear everywhere except single half-precision rows on CUDA, where the faster of
F.linear and the Triton GEMV (timed once per shape) runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardserve.layers import linear_op
from shardserve.layers.linear_op import linear


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_is_f_linear_bit_for_bit(rows, dtype):
    x = torch.randn(rows, 48).to(dtype)
    w = torch.randn(20, 48).to(dtype)
    b = torch.randn(20).to(dtype)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x, w), F.linear(x, w))
    assert not linear_op.chosen()  # nothing was timed off the GPU


def test_mode_is_validated(monkeypatch):
    monkeypatch.setenv(linear_op.GEMV_ENV, "fastest")
    with pytest.raises(ValueError, match="auto, triton or cublas"):
        linear_op.gemv_mode()
    monkeypatch.setenv(linear_op.GEMV_ENV, " Triton ")
    assert linear_op.gemv_mode() == "triton"
    monkeypatch.delenv(linear_op.GEMV_ENV)
    assert linear_op.gemv_mode() == "auto"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["auto", "triton", "cublas"])
def test_gpu_single_row_close_to_f_linear(monkeypatch, mode):
    monkeypatch.setenv(linear_op.GEMV_ENV, mode)
    monkeypatch.setattr(linear_op, "_choices", {})
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    ref = F.linear(x.double(), w.double())
    got = linear(x, w)
    assert (got.double() - ref).norm() / ref.norm() < 1e-2
    key = (6144, 4096, torch.bfloat16, False, 0)
    assert key in linear_op.chosen()
    if mode == "cublas":
        assert linear_op.chosen()[key] is None
    if mode == "triton":
        assert linear_op.chosen()[key] is not None


def test_choice_is_timed_once_per_shape_and_never_during_capture(monkeypatch):
    """The selection logic without a GPU: a capture gets F.linear and nothing is kept; the
    first call outside one times the candidates once and keeps the fastest for that shape."""
    monkeypatch.delenv(linear_op.GEMV_ENV, raising=False)
    monkeypatch.setattr(linear_op, "_choices", {})
    calls = []

    def fake_timings(n, k, dtype, has_bias, device):
        calls.append((n, k, has_bias))
        return [(None, 10.0), ("fast", 7.5), ("slow", 12.0)]

    monkeypatch.setattr(linear_op, "time_candidates", fake_timings)
    x, w = torch.randn(1, 32).to(torch.bfloat16), torch.randn(16, 32).to(torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert linear_op._choice(x, w, None) is None and not calls and not linear_op.chosen()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert linear_op._choice(x, w, None) == "fast"
    assert linear_op._choice(x, w, None) == "fast"
    assert calls == [(16, 32, False)]
    # cuBLAS wins another shape; no scratch memory (None) means cuBLAS too.
    monkeypatch.setattr(linear_op, "time_candidates",
                        lambda *a: [(None, 5.0), ("fast", 7.5)])
    assert linear_op._choice(x, torch.randn(8, 32).to(torch.bfloat16), None) is None
    monkeypatch.setattr(linear_op, "time_candidates", lambda *a: None)
    assert linear_op._choice(x, torch.randn(4, 32).to(torch.bfloat16), None) is None
    # Forced modes skip the timing.
    monkeypatch.setenv(linear_op.GEMV_ENV, "cublas")
    assert linear_op._choice(x, torch.randn(2, 32).to(torch.bfloat16), None) is None
