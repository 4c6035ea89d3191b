"""Random weights in place of a checkpoint (`--load-format dummy`, vLLM's name).

For benchmarks of shapes too large to write to disk first (a 70B model is 140 GB of bf16):
only config.json is read, and each rank fills its own shard on its device. Throughput with
ignore_eos does not depend on the values, so any values do; these keep activations finite.

Every parameter's values come from a generator seeded by (seed, parameter name), so
parameters that TP ranks replicate (norms, MoE router gates) are the same on every rank, as
a real checkpoint's would be: ranks that disagreed on routing would still run, but not the
work a real model does.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

# Small, as vLLM's dummy weights: hidden states stay O(1) through any depth.
DUMMY_WEIGHT_RANGE = 1e-3


def initialize_dummy_weights(model: nn.Module, seed: int = 0,
                             low: float = -DUMMY_WEIGHT_RANGE,
                             high: float = DUMMY_WEIGHT_RANGE) -> set[str]:
    """Fill every parameter of `model` in place; returns their names (all of them loaded).

    Norm weights and quantisation scales are ones (a norm of 1e-3 would shrink every layer's
    output a thousandfold), biases that steer routing are zeros, everything else uniform in
    [low, high)."""
    names: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
            if "norm" in owner or "scale" in leaf:
                param.fill_(1.0)
            elif "bias" in leaf and "correction" in leaf:
                param.zero_()
            else:
                gen = _generator(seed, name, param.device)
                if param.dtype.is_floating_point and param.element_size() >= 2:
                    param.uniform_(low, high, generator=gen)
                else:  # fp8 and integer storage: draw in float32, then convert
                    values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                    param.copy_(values.uniform_(low, high, generator=gen).to(param.dtype))
            names.add(name)
        for name, module in model.named_modules():
            if getattr(module, "quant", None) is not None:
                # FP8 layers (layers/quantization.py): the same range, as e4m3 values over its
                # whole range times one scale (drawn straight into e4m3, nearly all are zero).
                scale = max(abs(low), abs(high)) / 448.0
                module.weight_scale.fill_(scale)
                gen = _generator(seed, name, module.weight.device)
                values = module.weight.data.float().uniform_(low / scale, high / scale,
                                                             generator=gen)
                module.weight.data.copy_(values.to(module.weight.dtype))
    return names


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """Seeded by (seed, name): the same values on every rank that holds the tensor."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return gen
