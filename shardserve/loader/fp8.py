"""FP8 block-quantized checkpoints (DeepSeek-V3/R1), dequantized to the model dtype on load.

Such a checkpoint stores a quantized linear weight as two tensors:

    X.weight            [N, K]  float8_e4m3fn
    X.weight_scale_inv  [ceil(N / bn), ceil(K / bk)]  float32   (weight_block_size [bn, bk])

    W[n, k] = X.weight[n, k] * X.weight_scale_inv[n // bn, k // bk]

`dequantize_fp8_weights` pairs the two up in the weight stream and yields one lazy slice per
weight (`Fp8BlockDequantSlice`) that the ordinary weight loaders index like any other: a TP rank
reads only its rows or columns of the FP8 weight and the scale blocks that cover them.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from shardserve.config import FP8_GROUP_SIZE
from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.layers.weight_utils import LoadedWeight, materialize, weight_shape

SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_block_size(hf_config: Any) -> tuple[int, int] | None:
    """(bn, bk) of an FP8 block-quantized config, None for an unquantized one; other
    quantization methods raise UnsupportedModelError."""
    mlx = getattr(hf_config, "quantization", None)
    if isinstance(mlx, dict) and "bits" in mlx:
        # mlx-lm's packed integer weights with per-group scales and biases, stated under
        # "quantization" (and in newer files as a quantization_config without quant_method):
        # otherwise loaded as if unquantized, and refused on the first packed tensor's shape.
        raise UnsupportedModelError(
            f"config.json's quantization ({mlx.get('bits')}-bit, group size "
            f"{mlx.get('group_size')}) is MLX's format, which shardserve does not read; use the "
            "unquantized checkpoint or a GGUF file.")
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    block = qc.get("weight_block_size")
    if method != "fp8" or not block or len(block) != 2:
        raise UnsupportedModelError(
            f"config.json's quantization_config (quant_method {method!r}"
            f"{f', weight_block_size {block}' if method == 'fp8' else ''}) is not supported: "
            "of the quantized formats, shardserve reads only FP8 block-quantized checkpoints "
            "(quant_method 'fp8' with weight_block_size); use the unquantized checkpoint or a "
            "GGUF file.")
    return int(block[0]), int(block[1])


def is_fp8(weight: LoadedWeight) -> bool:
    if isinstance(weight, torch.Tensor):
        return weight.dtype in _FP8_DTYPES
    get_dtype = getattr(weight, "get_dtype", None)
    return get_dtype is not None and str(get_dtype()).upper().startswith("F8")


class Fp8BlockDequantSlice:
    """A lazy slice over an FP8 weight and its block scales whose items are dequantized
    float32 tensors (the parameter's copy_ casts them to the model dtype)."""

    def __init__(self, weight: LoadedWeight, scale_inv: LoadedWeight,
                 block_size: tuple[int, int]) -> None:
        self.weight, self.scale_inv, self.block_size = weight, scale_inv, block_size
        shape = weight_shape(weight)
        if len(shape) != 2:
            raise ModelLoadError(f"FP8 weight of shape {shape}: only 2-D weights are supported.")

    def get_shape(self) -> list[int]:
        return list(weight_shape(self.weight))

    def __getitem__(self, index: Any) -> torch.Tensor:
        ranges = _ranges(index, self.get_shape())
        (r0, r1), (c0, c1) = ranges
        w = self.weight[r0:r1, c0:c1]  # a lazy slice reads only these rows and columns
        bn, bk = self.block_size
        s0, s1 = r0 // bn, -(-r1 // bn)
        t0, t1 = c0 // bk, -(-c1 // bk)
        scale = materialize(self.scale_inv)[s0:s1, t0:t1].float()
        scale = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        scale = scale[r0 - s0 * bn:r1 - s0 * bn, c0 - t0 * bk:c1 - t0 * bk]
        return w.float() * scale


    def quantized(self, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The e4m3 values of [rows, cols] as stored and their scales spread to one per row and
        128 columns (layers/quantization.py's layout), or None where that is not exact: other
        block widths, columns not starting on a block, e5m2 values."""
        (r0, r1), (c0, c1) = _ranges((rows, cols), self.get_shape())
        bn, bk = self.block_size
        if bk != FP8_GROUP_SIZE or c0 % bk or _dtype_of(self.weight) != torch.float8_e4m3fn:
            return None
        q = self.weight[r0:r1, c0:c1]
        scale = materialize(self.scale_inv)[:, c0 // bk:-(-c1 // bk)].float()
        return q, scale[torch.arange(r0, r1) // bn]


def _dtype_of(weight: LoadedWeight) -> torch.dtype | None:
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}.get(
        str(weight.get_dtype()).upper())


def _ranges(index: Any, shape: list[int]) -> list[tuple[int, int]]:
    """A tuple of unit-step slices (what narrow_weight and materialize pass) -> (start, stop)
    per dim."""
    index = index if isinstance(index, tuple) else (index,)
    out = []
    for dim, size in enumerate(shape):
        sl = index[dim] if dim < len(index) else slice(None)
        if not isinstance(sl, slice):
            raise TypeError(f"FP8 weights are indexed by slices, got {sl!r}.")
        start, stop, step = sl.indices(size)
        if step != 1:
            raise TypeError("FP8 weights are indexed by unit-step slices.")
        out.append((start, stop))
    return out


def dequantize_fp8_weights(weights: Iterable[tuple[str, LoadedWeight]],
                           block_size: tuple[int, int]
                           ) -> Iterator[tuple[str, LoadedWeight]]:
    """The weight stream with every (X.weight, X.weight_scale_inv) pair replaced by one
    dequantizing X.weight; other tensors pass through. A pair may arrive in either order (and
    from different files); the first half waits, unread, for the second."""
    pending_weights: dict[str, LoadedWeight] = {}
    pending_scales: dict[str, LoadedWeight] = {}
    for name, weight in weights:
        if name.endswith(".weight" + SCALE_SUFFIX):
            base = name[:-len(SCALE_SUFFIX)]
            if base in pending_weights:
                yield base, Fp8BlockDequantSlice(pending_weights.pop(base), weight, block_size)
            else:
                pending_scales[base] = weight
        elif is_fp8(weight):
            if name in pending_scales:
                yield name, Fp8BlockDequantSlice(weight, pending_scales.pop(name), block_size)
            else:
                pending_weights[name] = weight
        else:
            yield name, weight
    if pending_weights or pending_scales:
        names = sorted(pending_weights) + [n + SCALE_SUFFIX for n in sorted(pending_scales)]
        raise ModelLoadError(f"FP8 checkpoint tensors without their pair (weight and "
                             f"weight_scale_inv): {', '.join(names[:10])}.")
