"""Per-GPU memory in /metrics counts only the GPUs this process may use (NVML itself sees
every GPU of the host and ignores CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import pytest

from shardserve.engine.core_proc import _visible_nvml_devices


class FakeNvml:
    uuids = ["GPU-aaa", "GPU-bbb", "GPU-ccc", "GPU-ddd"]

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise RuntimeError("not found")
        return ("handle", self.uuids.index(uuid))

    def nvmlDeviceGetIndex(self, handle):
        return handle[1]


@pytest.mark.parametrize("visible,expected", [
    (None, [0, 1, 2, 3]),
    ("1", [1]),
    ("2,0", [2, 0]),
    ("GPU-ccc,GPU-aaa", [2, 0]),
    ("1,7,2", [1]),  # CUDA stops at the first invalid entry
    ("", []),
])
def test_only_visible_gpus_are_reported(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [i for i, _ in _visible_nvml_devices(FakeNvml())] == expected
