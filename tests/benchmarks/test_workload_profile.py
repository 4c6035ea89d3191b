"""workload_profile's bookkeeping: kernel names sorted into categories (the names the H200
profiles showed), steps classified by what the scheduler gave them, and each step() call's
time billed to the step it waited for (one call late under async scheduling)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.workload_profile import StepLog, by_category, category, summarise


@pytest.mark.parametrize("name,expected", [
    ("_decode_kernel", "attention decode"),
    ("_decode_reduce_kernel", "attention decode"),
    ("_prefill_attention_kernel", "attention prefill"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "gemm"),
    ("_gemv_kernel", "gemv (triton)"),
    ("_rms_norm_kernel", "rmsnorm"),
    ("_rotary_store_kv_kernel", "rope + kv store"),
    ("_silu_and_mul_kernel", "silu-and-mul"),
    ("Memset (Device)", "copies"),
    ("argmax_kernel", "other (sampling, embedding, elementwise)"),
])
def test_category(name, expected):
    assert category(name) == expected


def test_by_category_per_step_and_share():
    timeline = [(0, 30, "_decode_kernel", True), (30, 40, "nvjet_x", True),
                (40, 50, "nvjet_y", True)]
    rows = by_category(timeline, steps=2)
    assert rows[0] == ("attention decode", pytest.approx(0.015), pytest.approx(0.6))
    assert rows[1] == ("gemm", pytest.approx(0.010), pytest.approx(0.4))


class _Scheduler:
    def __init__(self, outputs, computed):
        self._outputs = iter(outputs)
        self.requests = {rid: SimpleNamespace(num_computed_tokens=n) for rid, n in computed.items()}

    def schedule(self, *args, **kwargs):
        return next(self._outputs)


def _out(tokens):
    return SimpleNamespace(num_scheduled_tokens=tokens, is_empty=not tokens)


def test_step_log_and_billing():
    sched = _Scheduler([_out({"a": 100, "b": 1}), _out({}), _out({"a": 1, "b": 1})],
                       {"a": 10, "b": 30})
    log = StepLog(sched)
    for _ in range(3):
        sched.schedule()
    # Empty steps are not recorded; decode rows add their context.
    assert log.records == [(100, 1, 30), (0, 2, 40)]
    # Lock-step: call i is step i. Async: call i waits for step i - 1; a profiled call (None)
    # is billed to nobody.
    lock = summarise(log.records, [0.2, 0.01], offset=0)
    assert lock["kinds"]["prefill"] == [1, 0.2, 100, 1]
    assert lock["kinds"]["decode"] == [1, 0.01, 0, 2]
    assert lock["mean_decode_ctx"] == 20
    late = summarise(log.records, [0.001, 0.2, None], offset=1)
    assert late["kinds"]["prefill"] == [1, 0.2, 100, 1]
    assert late["kinds"]["decode"][0] == 0
