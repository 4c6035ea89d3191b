"""`--quantization fp8`: FP8 (e4m3) weights and activations in the dense linear layers.

Which layers: the projections a layer marks `quantizable` (attention q/k/v and o, the dense
and shared-expert MLPs' gate/up and down). Left in the model dtype: embeddings and the LM head
(as vLLM), routers, routed experts (FusedMoE) and DeepSeek's MLA projections, whose kv_b weight
the attention reads directly.

What a quantized layer holds (kernels/fp8_gemm.py has the scheme):

    weight        [rows, cols] float8_e4m3fn
    weight_scale  [rows, ceil(cols / 128)] float32, one scale per row and 128 columns

A weight arrives through the usual weight loaders, narrowed to this rank's rows or columns:
a full-precision tensor is quantized as it is copied in; a block-FP8 checkpoint's
(Fp8BlockDequantSlice) FP8 values and scales are copied as they are whenever this rank's
columns start on a 128 boundary and the checkpoint's blocks are 128 columns wide (DeepSeek-V3,
Qwen3-FP8), so nothing is rounded twice. Each step the layer's input is quantized per row and
128 columns (dynamic scales), then one FP8 GEMM.

The method is chosen when the model is built (`quantization_context` around its construction,
from ModelConfig.quantization), the way layers ask for their process group: a model's code
does not pass it through every constructor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from shardserve.config_defaults import QUANTIZATION_METHODS
from shardserve.kernels.fp8_gemm import (FP8, fp8_gemm, num_groups,
                                         quantize_rows_fp8, quantize_rows_fp8_ref)
from shardserve.layers.weight_utils import LoadedWeight, copy_weight, weight_shape

_current: str | None = None


@contextlib.contextmanager
def quantization_context(method: str | None) -> Iterator[None]:
    """Layers built inside take `method` (None: unquantized)."""
    global _current
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"Unknown quantization {method!r}; choose from {QUANTIZATION_METHODS}.")
    previous, _current = _current, method
    try:
        yield
    finally:
        _current = previous


def current_quantization() -> str | None:
    return _current


def fp8_supported() -> bool:
    """Whether this process's GPU has FP8 matrix units (sm_89 and later). The CPU runs the
    same arithmetic in torch (kernels/fp8_gemm.py's references)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


class Fp8Linear:
    """The FP8 half of a LinearBase: its parameters, how rows get into them, its GEMM."""

    def create_weights(self, layer: nn.Module, rows: int, cols: int) -> None:
        layer.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8), requires_grad=False)
        # A buffer, not a parameter: it is filled with the weight, never named by a checkpoint.
        # Column-major like the activations' scales (kernels/fp8_gemm.py says why).
        layer.register_buffer("weight_scale", torch.empty(num_groups(cols), rows,
                                                          dtype=torch.float32).t(),
                              persistent=False)

    def load(self, layer: nn.Module, dst_row: int, num_rows: int, src: LoadedWeight,
             src_row: int, src_col: int) -> None:
        """weight[dst_row:+num_rows] = the checkpoint's [src_row:+num_rows, src_col:+cols],
        cols the layer's (all its input features, or this rank's slice of them)."""
        from shardserve.loader.fp8 import Fp8BlockDequantSlice
        cols = layer.weight.shape[1]
        shape = weight_shape(src)
        if len(shape) != 2 or shape[1] != layer.input_size:
            raise ValueError(f"Checkpoint shape {tuple(shape)} does not match the layer's "
                             f"[{layer.output_size}, {layer.input_size}] weight.")
        index = (slice(src_row, src_row + num_rows), slice(src_col, src_col + cols))
        exact = src.quantized(*index) if isinstance(src, Fp8BlockDequantSlice) else None
        # Anything else (a tensor or a lazy slice, dequantized FP8 of other blocks included)
        # is quantized here, on the layer's device.
        q, scale = exact or quantize_rows_fp8_ref(src[index].to(layer.weight_scale.device))
        copy_weight(layer.weight.data.narrow(0, dst_row, num_rows), q)
        copy_weight(layer.weight_scale.narrow(0, dst_row, num_rows), scale)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows_fp8(x.reshape(-1, shape[-1]))
        out = fp8_gemm(xq, xs, layer.weight, layer.weight_scale, x.dtype, bias)
        return out.view(*shape[:-1], out.shape[-1])
