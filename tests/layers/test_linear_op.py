"""linear(): F.linear everywhere except single half-precision rows on CUDA, where the faster of
F.linear and the Triton GEMV (timed once per shape) runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from shardserve.kernels.gemv import GEMV_CONFIGS
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


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """The selection logic without a GPU: a device name for the stored key, a cache directory
    of the test's own, and a fresh set of in-process choices."""
    monkeypatch.delenv(linear_op.GEMV_ENV, raising=False)
    monkeypatch.setattr(linear_op, "_choices", {})
    monkeypatch.setattr(linear_op, "_device_name", lambda device: "Test GPU")
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return tmp_path / linear_op.CHOICES_FILE


def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def test_choice_is_timed_once_per_shape_and_never_during_capture(monkeypatch, fake_gpu):
    """A capture gets F.linear and nothing is kept; the first call outside one times the
    candidates once and keeps the fastest for that shape."""
    fast, slow = GEMV_CONFIGS[1], GEMV_CONFIGS[2]
    calls = []

    def fake_timings(n, k, dtype, has_bias, device):
        calls.append((n, k, has_bias))
        return [(None, 10.0), (fast, 7.5), (slow, 12.0)]

    monkeypatch.setattr(linear_op, "time_candidates", fake_timings)
    x, w = _bf16(1, 32), _bf16(16, 32)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert linear_op._choice(x, w, None) is None and not calls and not linear_op.chosen()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert linear_op._choice(x, w, None) == fast
    assert linear_op._choice(x, w, None) == fast
    assert calls == [(16, 32, False)]
    # cuBLAS wins another shape; no scratch memory (None) means cuBLAS too.
    monkeypatch.setattr(linear_op, "time_candidates", lambda *a: [(None, 5.0), (fast, 7.5)])
    assert linear_op._choice(x, _bf16(8, 32), None) is None
    monkeypatch.setattr(linear_op, "time_candidates", lambda *a: None)
    assert linear_op._choice(x, _bf16(4, 32), None) is None
    # Forced modes skip the timing.
    monkeypatch.setenv(linear_op.GEMV_ENV, "cublas")
    assert linear_op._choice(x, _bf16(2, 32), None) is None


def test_choices_are_kept_for_the_next_process(monkeypatch, fake_gpu):
    """A new process (fresh in-process choices) takes the stored choice without timing, so a
    near tie cannot flip the kernel, and the bf16 rounding, between restarts."""
    chosen = GEMV_CONFIGS[3]
    monkeypatch.setattr(linear_op, "time_candidates",
                        lambda *a: [(None, 10.0), (GEMV_CONFIGS[0], 9.0), (chosen, 8.0)])
    x = _bf16(1, 32)
    assert linear_op._choice(x, _bf16(16, 32), None) == chosen
    assert linear_op._choice(x, _bf16(24, 32), _bf16(24)) == chosen
    monkeypatch.setattr(linear_op, "time_candidates", lambda *a: [(None, 1.0)])  # cuBLAS now
    assert linear_op._choice(x, _bf16(8, 32), None) is None
    stored = json.loads(fake_gpu.read_text())
    assert len(stored) == 3 and all(key.startswith("Test GPU | torch ") for key in stored)
    assert sorted(stored.values()) == ["F.linear", linear_op._config_name(chosen),
                                       linear_op._config_name(chosen)]

    def must_not_time(*args):
        raise AssertionError("a stored shape was timed again")

    monkeypatch.setattr(linear_op, "_choices", {})  # the next process
    monkeypatch.setattr(linear_op, "time_candidates", must_not_time)
    assert linear_op._choice(x, _bf16(16, 32), None) == chosen
    assert linear_op._choice(x, _bf16(24, 32), _bf16(24)) == chosen
    assert linear_op._choice(x, _bf16(8, 32), None) is None
    # Another GPU (or version) is another key: timed afresh.
    monkeypatch.setattr(linear_op, "_choices", {})
    monkeypatch.setattr(linear_op, "_device_name", lambda device: "Other GPU")
    monkeypatch.setattr(linear_op, "time_candidates", lambda *a: [(None, 1.0)])
    assert linear_op._choice(x, _bf16(16, 32), None) is None
    assert len(json.loads(fake_gpu.read_text())) == 4


def test_damaged_or_unwritable_store_only_costs_a_timing(monkeypatch, fake_gpu):
    monkeypatch.setattr(linear_op, "time_candidates",
                        lambda *a: [(None, 10.0), (GEMV_CONFIGS[0], 5.0)])
    fake_gpu.write_text("{not json")
    assert linear_op._choice(_bf16(1, 32), _bf16(16, 32), None) == GEMV_CONFIGS[0]
    assert list(json.loads(fake_gpu.read_text()).values()) == [
        linear_op._config_name(GEMV_CONFIGS[0])]
    # An entry naming a configuration this version does not have is timed again.
    key = next(iter(json.loads(fake_gpu.read_text())))
    fake_gpu.write_text(json.dumps({key: "gemv 3x3 warps 1 stages 1"}))
    monkeypatch.setattr(linear_op, "_choices", {})
    assert linear_op._choice(_bf16(1, 32), _bf16(16, 32), None) == GEMV_CONFIGS[0]
    # A cache directory that cannot be written: the choice holds in this process only.
    blocker = fake_gpu.parent / "file"
    blocker.write_text("")
    monkeypatch.setenv("SHARDSERVE_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(linear_op, "_choices", {})
    assert linear_op._choice(_bf16(1, 32), _bf16(16, 32), None) == GEMV_CONFIGS[0]
    assert not list(fake_gpu.parent.glob("*.tmp"))
