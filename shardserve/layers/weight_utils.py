"""Read a rank's part of a checkpoint tensor without reading the rest.

A weight reaches a `weight_loader` either as a torch.Tensor (GGUF, tests) or as a safetensors
lazy slice (`safe_open(...).get_slice(name)`), which reads from the memory-mapped file only the
rows/columns it is indexed with. The helpers narrow first and materialise last, so a TP rank
pages in 1/tp of each sharded matrix.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Union

import torch


class LazySlice(Protocol):
    """What we use of safetensors' PySafeSlice."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


LoadedWeight = Union[torch.Tensor, LazySlice]
WeightLoader = Callable[..., None]


def weight_shape(weight: LoadedWeight) -> tuple[int, ...]:
    if isinstance(weight, torch.Tensor):
        return tuple(weight.shape)
    return tuple(weight.get_shape())


def narrow_weight(weight: LoadedWeight, dim: int, start: int, length: int) -> torch.Tensor:
    """`weight.narrow(dim, start, length)` as a tensor, reading only that part of a lazy slice."""
    if isinstance(weight, torch.Tensor):
        return weight.narrow(dim, start, length)
    ndim = len(weight.get_shape())
    dim = dim % ndim
    index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(ndim))
    return weight[index]


def materialize(weight: LoadedWeight) -> torch.Tensor:
    """The whole weight as a tensor."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight[:] if weight.get_shape() else weight[()]


def check_full_size(weight: LoadedWeight, dim: int, expected: int) -> None:
    """A TP loader reads only its rank's part of `dim`, so the copy's own shape check cannot
    see a checkpoint wider there than the model (a config.json that does not belong to the
    checkpoint): its extra rows or columns would be dropped silently. Check the full size."""
    shape = weight_shape(weight)
    if shape[dim] != expected:
        raise ValueError(f"Checkpoint shape {shape} does not match the model's size {expected} "
                         f"along dim {dim % len(shape)}.")


def copy_weight(dst: torch.Tensor, src: torch.Tensor, name: str = "") -> None:
    """dst.copy_(src) after a shape check that names the parameter (copy_ would broadcast)."""
    if tuple(dst.shape) != tuple(src.shape):
        shapes = f"shape {tuple(src.shape)} does not match parameter shape {tuple(dst.shape)}."
        # Without a name, the model loader adds the checkpoint tensor's.
        raise ValueError(f"Weight {name}: checkpoint {shapes}" if name else f"Checkpoint {shapes}")
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded_weight: LoadedWeight) -> None:
    """A replicated parameter: every rank loads the whole tensor."""
    copy_weight(param.data, materialize(loaded_weight))


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loading metadata (weight_loader, output_dim, input_dim) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"Parameter already has attribute {key!r}.")
        setattr(param, key, value)
