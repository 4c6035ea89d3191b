"""Build the model for this rank and fill it from the checkpoint."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from shardserve.distributed.parallel_state import get_world_group
from shardserve.errors import ModelLoadError
from shardserve.layers.quantization import quantization_context
from shardserve.layers.weight_utils import LoadedWeight
from shardserve.models.registry import check_architecture, get_model_class
from shardserve.models.weight_loading import owns_expert_weight


def load_model(model_config: Any, device: torch.device | str, stage: Any = None) -> nn.Module:
    """The model of a resolved ModelConfig (hf_config, source, dtype set), its parameters
    created directly on `device` in model_config.torch_dtype and sharded for this process's
    TP group, every one loaded from the checkpoint; ModelLoadError names any left unloaded.

    `stage` (models/pipeline.py StageLayout): build and load only that pipeline stage's
    parts; the other stages' tensors are skipped unread (GGUF: never dequantized), as are the
    experts other expert-parallel ranks hold."""
    if model_config.hf_config is None or model_config.source is None or model_config.dtype == "auto":
        raise ValueError("load_model needs a resolved ModelConfig; call EngineConfig.resolve().")
    arch = model_config.architecture or check_architecture(model_config.hf_config)
    model_cls = get_model_class(arch)
    device = torch.device(device)
    # Allocating under the device context puts parameters (and RoPE tables) straight on the
    # GPU: no full-size CPU copy first.
    with torch.device(device), quantization_context(getattr(model_config, "quantization", None)):
        extra = {} if stage is None else {"stage": stage}
        model = model_cls(model_config.hf_config, dtype=model_config.torch_dtype,
                          max_model_len=model_config.max_model_len or 0, **extra)
    if getattr(model_config, "load_format", "auto") == "dummy":
        from shardserve.loader.dummy import initialize_dummy_weights
        initialize_dummy_weights(model, seed=model_config.seed)
        return model.eval()
    include = None
    if stage is not None:
        tied = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        include = lambda name: stage.owns_weight(name, tied)  # noqa: E731
    owns_expert = owns_expert_weight(model)
    if owns_expert is not None:  # expert parallel: another rank's experts stay unread
        owns_stage = include
        include = lambda name: (owns_expert(name)  # noqa: E731
                                and (owns_stage is None or owns_stage(name)))
    weights, total = _checkpoint_weights(model_config.source, include)
    progress = tqdm(_track_names(weights, current := []), total=total,
                    desc=f"Loading {model_config.source.name}", unit="tensor",
                    disable=get_world_group().rank != 0, leave=False)
    try:
        with torch.no_grad():
            loaded = model.load_weights(progress)
    except ValueError as err:  # a shape mismatch: the config does not describe these weights
        tensor = f" tensor {current[-1]}" if current else ""
        hint = ("Does config.json belong to this checkpoint?" if model_config.source.kind == "hf"
                else "The file's metadata does not describe its tensors: it is damaged or was "
                "not written by llama.cpp's converter; re-export it.")
        raise ModelLoadError(f"Cannot load{tensor} of {model_config.source.path}: {err} "
                             f"{hint}") from err
    missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ModelLoadError(f"The checkpoint at {model_config.source.path} has no weights for "
                             f"{len(missing)} parameters of {arch}: {shown} (a fused "
                             "qkv_proj/gate_up_proj needs all of q/k/v_proj or gate/up_proj).")
    return model.eval()


def _track_names(weights: Iterable[tuple[str, LoadedWeight]], current: list[str]
                 ) -> Iterable[tuple[str, LoadedWeight]]:
    """The weights, with the name of the one being loaded kept in current[-1] (for errors)."""
    for name, weight in weights:
        current[:] = [name]
        yield name, weight


def _checkpoint_weights(source: Any, include: Callable[[str], bool] | None = None
                        ) -> tuple[Iterable[tuple[str, LoadedWeight]], int | None]:
    if source.kind == "hf":
        from shardserve.loader.safetensors import (count_safetensors_weights,
                                                   iter_safetensors_weights)
        weights = iter_safetensors_weights(source.path)
        if include is not None:  # lazy slices: a skipped tensor is never read
            weights = ((name, w) for name, w in weights if include(name))
        return weights, count_safetensors_weights(source.path)
    if source.kind == "gguf":
        # Written alongside; imported lazily so HF-only setups never need the gguf package.
        from shardserve.loader.gguf import iter_gguf_weights, num_gguf_weights
        return iter_gguf_weights(source.path, include=include), num_gguf_weights(source.path)
    raise ModelLoadError(f"Unknown model source kind {source.kind!r}.")

