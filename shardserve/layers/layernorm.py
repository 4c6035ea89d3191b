"""RMSNorm with the residual add folded in (vLLM style), numerically as in Hugging Face."""

from __future__ import annotations

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.layers.weight_utils import default_weight_loader, set_weight_attrs


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), over the last dim.

    forward(x) returns y. forward(x, residual) first adds the residual stream, x = x + residual,
    and returns (y, x): the caller's next residual is the sum it would otherwise compute itself,
    which lets a fused kernel do add + norm in one pass. The add happens in the input dtype and
    the norm in float32, cast back before the weight multiply, exactly as HF Llama/Qwen do, so
    half-precision outputs match theirs bit for bit in the reference path.

    forward(x, residual, reduce_partial=True) takes x as this rank's partial sum of a
    tensor-parallel sublayer's output (its row-parallel projection not yet all-reduced) and
    all-reduces it first: in one kernel with the add and the norm where the TP group's custom
    all-reduce can (distributed/custom_all_reduce.py), else as all_reduce then the add + norm.
    With residual None (the first layer, whose input is the vocabulary-parallel embedding's
    partial sum) it returns (norm(all_reduce(x)), all_reduce(x)).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x32.to(input_dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                reduce_partial: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if reduce_partial:
            group = get_tp_group()
            if group.can_fuse_rms_norm(x, residual):
                return group.all_reduce_rms_norm(x, residual, self.weight, self.variance_epsilon)
            x = group.all_reduce(x)
            if residual is None:
                # The first layer's input (the embedding's partial sum): it becomes the
                # residual stream as it is.
                return self.forward(x), x
        if x.is_cuda:
            # One Triton kernel instead of ~8 torch kernels (add, cast, square, mean, rsqrt,
            # multiply, cast, multiply): at batch 1 these launches cost more than the math.
            from shardserve.kernels.rms_norm import rms_norm
            return rms_norm(x, self.weight, self.variance_epsilon, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
