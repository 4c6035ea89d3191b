"""Gated activations over a stacked [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[..., 2d] -> silu(x[..., :d]) * x[..., d:], the SwiGLU of Llama/Qwen MLPs.

    The input is MergedColumnParallelLinear's [gate_r | up_r], so each TP rank applies it to
    its own slice without communication.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from shardserve.kernels.silu_and_mul import silu_and_mul  # one kernel, not three
            return silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
