"""One config tree, built once and passed down whole (DESIGN.md).

EngineConfig = ModelConfig + CacheConfig + ParallelConfig + SchedulerConfig + DeviceConfig.
Each component unpacks what it needs. `EngineConfig.resolve()` fills the fields that depend on
the model (its Hugging Face config, dtype, max_model_len) once, in the front process; the
resolved tree is what crosses process boundaries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shardserve.errors import InvalidRequestError

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16"}


@dataclass
class ModelConfig:
    """What to serve and in which precision."""

    model: str | None = None  # HF folder or .gguf; None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto: the checkpoint's half type on CUDA, float32 on CPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    seed: int = 0
    served_model_name: str | None = None

    # Filled by resolve(); not user settings.
    source: Any = field(default=None, repr=False)  # loader.source.ModelSource
    hf_config: Any = field(default=None, repr=False)  # transformers.PretrainedConfig
    architecture: str = ""

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU's memory for the whole process
    kv_cache_memory_bytes: int | None = None  # CPU (or an explicit CUDA size); default 1 GiB on CPU
    num_gpu_blocks_override: int | None = None  # tests: force a tiny cache

    num_blocks: int = 0  # filled once the cache is sized


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # per-step token budget; default max(8192, ...)
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # None: unbounded (the server bounds it)


@dataclass
class DeviceConfig:
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EngineConfig:
    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build the tree from flat vLLM-style keyword arguments (LLM(...), CLI flags)."""
        if "model" not in kwargs:
            kwargs["model"] = None
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        built: dict[str, Any] = {}
        for section_name, section_cls in (("model_config", ModelConfig),
                                          ("cache_config", CacheConfig),
                                          ("parallel_config", ParallelConfig),
                                          ("scheduler_config", SchedulerConfig),
                                          ("device_config", DeviceConfig)):
            names = {f.name for f in dataclasses.fields(section_cls) if f.init}
            built[section_name] = section_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        assert set(built) == set(sections)
        if kwargs:
            raise TypeError(f"Unknown engine arguments: {', '.join(sorted(kwargs))}")
        return cls(**built)

    def resolve(self) -> "EngineConfig":
        """Fill the model-dependent fields and check the settings against each other."""
        import torch

        from shardserve.loader.hf_config import load_hf_config
        from shardserve.loader.source import resolve_model_source
        from shardserve.models.registry import check_architecture

        mc, cc, sc, dc = self.model_config, self.cache_config, self.scheduler_config, self.device_config
        if dc.device == "auto":
            dc.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dc.device not in ("cpu", "cuda"):
            raise InvalidRequestError(f"device must be auto, cpu or cuda, got {dc.device!r}.", "device")
        if dc.device == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError("device='cuda' was asked for but no CUDA GPU is visible; "
                                      "use device='cpu' or 'auto'.", "device")
        mc.source = resolve_model_source(mc.model)
        mc.hf_config = load_hf_config(mc.source)
        mc.architecture = check_architecture(mc.hf_config)
        mc.dtype = _resolve_dtype(mc.dtype, mc.hf_config, dc.device)
        model_max = int(getattr(mc.hf_config, "max_position_embeddings", 0) or 2048)
        if mc.max_model_len is None:
            mc.max_model_len = model_max
        elif mc.max_model_len < 1:
            raise InvalidRequestError(f"max_model_len must be positive, got {mc.max_model_len}.",
                                      "max_model_len")
        if cc.block_size < 1 or cc.block_size & (cc.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {cc.block_size}.",
                                      "block_size")
        if sc.max_num_batched_tokens is None:
            sc.max_num_batched_tokens = 8192 if sc.enable_chunked_prefill else max(8192, mc.max_model_len)
        if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < mc.max_model_len:
            raise InvalidRequestError(
                f"Without chunked prefill, max_num_batched_tokens ({sc.max_num_batched_tokens}) must "
                f"be at least max_model_len ({mc.max_model_len}).", "max_num_batched_tokens")
        if sc.max_num_seqs < 1 or sc.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be positive.",
                                      "max_num_seqs")
        if not 0.0 < cc.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError(
                f"gpu_memory_utilization must be in (0, 1], got {cc.gpu_memory_utilization}.",
                "gpu_memory_utilization")
        if mc.served_model_name is None:
            mc.served_model_name = mc.model if mc.model else mc.source.name
        return self


def _resolve_dtype(dtype: str, hf_config: Any, device: str) -> str:
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
