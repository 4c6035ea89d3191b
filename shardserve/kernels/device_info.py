"""What the kernels' launch heuristics ask of a CUDA device, read once per device."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (without an index: the current one)."""
    return _sms(device.index if device.index is not None else torch.cuda.current_device())
