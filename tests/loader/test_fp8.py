"""FP8 block dequantization: any slice a TP rank reads (rows, columns, unaligned to the blocks)
equals that slice of the whole dequantized weight; pairs are matched in either order."""

from __future__ import annotations

import pytest
import torch

from shardserve.errors import ModelLoadError, UnsupportedModelError
from shardserve.layers.weight_utils import materialize, narrow_weight
from shardserve.loader.fp8 import Fp8BlockDequantSlice, dequantize_fp8_weights, fp8_block_size


def _quantized(rows: int, cols: int, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * cols)
    q = (torch.randn(rows, cols, generator=gen) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-rows // block[0]), -(-cols // block[1]), generator=gen) + 0.5
    return q, scale


def test_slices_match_the_whole_dequantized_weight() -> None:
    block = (8, 16)
    q, scale = _quantized(27, 41, block)
    full = q.float() * scale.repeat_interleave(8, 0)[:27].repeat_interleave(16, 1)[:, :41]
    lazy = Fp8BlockDequantSlice(q, scale, block)
    assert lazy.get_shape() == [27, 41]
    assert torch.equal(materialize(lazy), full)
    assert torch.equal(narrow_weight(lazy, 0, 5, 13), full[5:18])
    assert torch.equal(narrow_weight(lazy, 1, 17, 20), full[:, 17:37])


def test_pairs_in_either_order_and_unpaired_named() -> None:
    q, scale = _quantized(16, 16, (8, 8))
    other = torch.ones(3)
    stream = [("a.weight", q), ("n.weight", other), ("b.weight_scale_inv", scale),
              ("a.weight_scale_inv", scale), ("b.weight", q)]
    out = dict(dequantize_fp8_weights(stream, (8, 8)))
    assert set(out) == {"a.weight", "n.weight", "b.weight"}
    assert out["n.weight"] is other
    assert torch.equal(materialize(out["a.weight"]), materialize(out["b.weight"]))
    with pytest.raises(ModelLoadError, match="c.weight"):
        list(dequantize_fp8_weights([("c.weight", q)], (8, 8)))


def test_block_size_from_config() -> None:
    class Config:
        quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert fp8_block_size(Config()) == (128, 128)
    Config.quantization_config = {"quant_method": "awq"}
    with pytest.raises(UnsupportedModelError, match="awq"):
        fp8_block_size(Config())


def test_mlx_quantized_config_is_refused_by_name() -> None:
    # mlx-lm writes "quantization" (newer versions a quantization_config without quant_method
    # too); such a folder loaded as unquantized and failed on the first packed tensor's shape.
    class Config:
        quantization = {"group_size": 64, "bits": 4}
    with pytest.raises(UnsupportedModelError, match=r"quantization \(4-bit, group size 64\) is "
                                                    "MLX's format"):
        fp8_block_size(Config())
    Config.quantization_config = dict(Config.quantization)
    with pytest.raises(UnsupportedModelError, match="MLX's format"):
        fp8_block_size(Config())
