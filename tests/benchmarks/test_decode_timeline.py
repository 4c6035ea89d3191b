"""decode_timeline's reading of a profiler trace: kernels from graph replays told apart from
eager ones, busy time as the union of kernel intervals, idle gaps by size with their
neighbours."""

from __future__ import annotations

import json

from benchmarks.decode_timeline import analyse, kernel_timeline, load_trace


def _trace(tmp_path):
    events = [
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 5,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 90, "dur": 5,
         "args": {"correlation": 8}},
        # graph: two kernels, overlapping; then a 50 us gap; then an eager kernel; 5 us gap
        {"ph": "X", "cat": "kernel", "name": "gemv", "ts": 10, "dur": 20, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "norm", "ts": 25, "dur": 10, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "argmax", "ts": 85, "dur": 10, "args": {"correlation": 8}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 100, "dur": 10,
         "args": {"correlation": 9}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return str(path)


def test_timeline_busy_gaps_and_eager_kernels(tmp_path):
    timeline = kernel_timeline(load_trace(_trace(tmp_path)))
    assert [(name, graph) for _, _, name, graph in timeline] == [
        ("gemv", True), ("norm", True), ("argmax", False), ("Memcpy DtoH", False)]
    a = analyse(timeline, tokens=2)
    assert a["kernels"] == 4 and a["kernels_per_token"] == 2
    window = 110 - 10
    busy = (35 - 10) + 10 + 10  # the two graph kernels overlap: their union is 25 us
    assert abs(a["busy"] - busy / window) < 1e-9
    assert a["gap_ms_per_token"] == {"20-100us": 50 / 1e3 / 2, "5-20us": 5 / 1e3 / 2}
    assert a["largest_gap_places"][0][1:] == ["norm", "argmax"]
    assert set(a["eager_kernels_per_token"]) == {"argmax", "Memcpy DtoH"}
    assert abs(a["kernel_ms_per_token"] - (20 + 10 + 10 + 10) / 1e3 / 2) < 1e-12
