"""What the config derives when the user leaves a setting out, as vLLM derives it: the dtype
and quantization from the checkpoint, rows and tokens a step from the GPU and the entry point,
max_model_len from the model's positions and RoPE scaling, the CUDA-graph ladder's top.
EngineConfig.resolve() (config.py) applies them; the planner asks them too."""

from __future__ import annotations

import os
from typing import Any

from shardserve.errors import InvalidRequestError

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16"}
QUANTIZATION_METHODS = ("fp8",)  # --quantization (layers/quantization.py)

# vLLM's largest captured batch too. Under --max-num-seqs 512 a cap of 256 left every larger
# decode step eager: about 500 rows took 37.7 ms a step against 29.7 ms replayed (H200, fp8
# cache, 1000 x 1000/1000). Under a max_num_seqs of 256 (a server's default) the ladder stops
# at 256.
DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE = 512


def large_gpu(device: str) -> bool:
    """vLLM's test for its larger batch defaults: a GPU of 70 GiB or more that is not an A100
    (H100, H200, MI300x; vLLM measured the larger token budget slower on the A100)."""
    if device != "cuda":
        return False
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower()


def default_max_num_batched_tokens(usage_context: str, device: str) -> int:
    """vLLM's defaults on large GPUs (large_gpu): 16,384 tokens a step offline, where only
    throughput counts, 8,192 for a server, whose decodes wait behind each prompt chunk. On the
    H200, 1000 x (1000 in / 1000 out) with the fp8 cache made 11,597 output tok/s at 16,384
    against 11,043 at 8,192 (BENCHMARKS.md, session 6): fewer prompt steps, each carrying the
    running decodes. Everywhere else 8,192."""
    return 16384 if usage_context == "llm" and large_gpu(device) else 8192


def default_max_num_seqs(usage_context: str, device: str) -> int:
    """512 rows a step offline on large GPUs (large_gpu), 256 everywhere else and for a server.
    vLLM takes 1,024 on large GPUs; ours stops at the top of the CUDA-graph ladder
    (DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE), since larger decode steps run eager. On the H200,
    1000 x (1000 in / 1000 out), fp8 cache, `bench throughput` in one session: 11,898 output
    tok/s at 512 against 11,355 at 256 (32,768 tokens a step), and 11,223 at 1,024, where the
    cache no longer holds every running request and the newest are preempted (BENCHMARKS.md,
    session 10). A server keeps 256: more rows a step is more throughput but a slower token
    for every stream."""
    if usage_context == "llm" and large_gpu(device):
        return DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
    return 256


def resolve_quantization(quantization: str | None, hf_config: Any, device: str) -> str | None:
    from shardserve.layers.quantization import fp8_supported
    from shardserve.loader.fp8 import fp8_block_size
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise InvalidRequestError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} "
                                  f"(or left out), got {quantization!r}.", "quantization")
    if quantization is None and fp8_block_size(hf_config) is not None and device == "cuda" \
            and fp8_supported():
        return "fp8"  # as vLLM serves a block-FP8 checkpoint: in FP8
    if quantization == "fp8" and device == "cuda" and not fp8_supported():
        raise InvalidRequestError("quantization='fp8' needs FP8 matrix units (compute "
                                  "capability 8.9 or later: Ada, Hopper, Blackwell); leave it "
                                  "out on this GPU.", "quantization")
    return quantization


def scaled_max_model_len(max_position_embeddings: int, rope_scaling: dict[str, Any] | None) -> int:
    """The default (and largest) max_model_len of a model, vLLM's rule: max_position_embeddings,
    or with RoPE scaling the length it stretches to, factor x max_position_embeddings (linear,
    dynamic) or factor x original_max_position_embeddings (yarn). llama3 and longrope configs
    already state the stretched length as max_position_embeddings.

    (Qwen2.5 and Qwen3 model cards enable YaRN by adding rope_scaling {factor 4,
    original_max_position_embeddings 32768} and leave max_position_embeddings at 32768 or
    40960: vLLM serves them 131072 tokens.)"""
    if not rope_scaling or rope_scaling.get("rope_type") in ("llama3", "longrope", "su"):
        return max_position_embeddings
    factor = float(rope_scaling.get("factor") or 1.0)
    base = max_position_embeddings
    if rope_scaling.get("rope_type") == "yarn":
        base = int(rope_scaling.get("original_max_position_embeddings") or max_position_embeddings)
    return int(base * factor)


# vLLM refuses a max_model_len past the model's trained positions unless told otherwise.
ALLOW_LONG_MAX_MODEL_LEN_ENV = ("SHARDSERVE_ALLOW_LONG_MAX_MODEL_LEN",
                                "VLLM_ALLOW_LONG_MAX_MODEL_LEN")


def allow_long_max_model_len() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true")
               for name in ALLOW_LONG_MAX_MODEL_LEN_ENV)


def resolve_dtype(dtype: str, hf_config: Any, device: str) -> str:
    dtype = _DTYPE_ALIASES.get(str(dtype), str(dtype)).replace("torch.", "")
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.", "dtype")
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    ckpt = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "")
    ckpt = ckpt.replace("torch.", "")
    return ckpt if ckpt in ("float16", "bfloat16") else "bfloat16"
