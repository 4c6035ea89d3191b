"""One config tree, built once and passed down whole (DESIGN.md).

EngineConfig = ModelConfig + CacheConfig + ParallelConfig + SchedulerConfig + DeviceConfig.
Each component unpacks what it needs. `EngineConfig.resolve()` fills the fields that depend on
the model (its Hugging Face config, dtype, max_model_len) once, in the front process; the
resolved tree is what crosses process boundaries.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from shardserve.errors import InvalidRequestError
from shardserve.config_defaults import (ALLOW_LONG_MAX_MODEL_LEN_ENV,
                                       DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE, allow_long_max_model_len,
                                       default_max_num_batched_tokens, default_max_num_seqs,
                                       resolve_dtype, resolve_quantization, scaled_max_model_len)
from shardserve.parallel_checks import check_parallel_layout
from shardserve.vllm_only import VLLM_ONLY_KWARGS, pop_vllm_only_kwargs

# Filled by resolve(), at start-up or by the entry point (usage_context); never flags.
DERIVED_FIELDS = frozenset({"source", "hf_config", "architecture", "num_blocks",
                             "usage_context", "generation_defaults"})
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# --quantization fp8's scale granularity: columns one float32 scale covers in a row
# (kernels/fp8_gemm.py; the loader and the planner count with it too).
FP8_GROUP_SIZE = 128
_SOURCE_KIND = {"safetensors": "hf", "gguf": "gguf"}
# KV cache element types (vLLM's --kv-cache-dtype): auto is the model's dtype; the others are
# one byte (torch's names here, so this module needs no torch); fp8 is e4m3.
_FP8_KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                        "fp8_e5m2": "float8_e5m2"}
KV_CACHE_DTYPES = ("auto", *_FP8_KV_CACHE_DTYPES)


def check_kv_cache_dtype(name: str) -> None:
    """The engine's and the planner's check of --kv-cache-dtype."""
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                  f"got {name!r}.", "kv_cache_dtype")


@dataclass
class ModelConfig:
    """What to serve and in which precision."""

    model: str | None = None  # HF folder or .gguf; None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto: the checkpoint's half type on CUDA, float32 on CPU
    max_model_len: int | None = None  # default: scaled_max_model_len of the model
    seed: int | None = 0  # None (vLLM accepts it): 0, as vLLM's V1 engine takes it
    # The model's name in the API; several (vLLM's `--served-model-name a b`): all are accepted
    # in requests and listed by /v1/models, the first is the one responses report. None: the
    # model path.
    served_model_name: str | list[str] | None = None
    # Accepted for vLLM compatibility and ignored: shardserve runs only its own model code
    # (models/), never Python shipped inside a checkpoint.
    trust_remote_code: bool = False
    enforce_eager: bool = False  # CUDA: never capture or replay CUDA graphs
    # Steps of up to this many tokens replay a captured graph (vLLM's
    # --max-cudagraph-capture-size): decode batches (capped by max_num_seqs) and, with
    # mixed_cuda_graphs, steps with prompt tokens (capped by max_num_batched_tokens).
    max_cuda_graph_batch_size: int = DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
    # CUDA: capture steps with prompt tokens too (executor/cuda_graph.py), not only decode
    # steps; off, such steps always run eagerly (vLLM's cudagraph_mode FULL_DECODE_ONLY).
    mixed_cuda_graphs: bool = True
    # auto: the path's own format; safetensors or gguf: insist on it; dummy: random weights
    # from config.json alone (benchmarks of shapes too large to write first; loader/dummy.py).
    load_format: str = "auto"
    # vLLM's --chat-template: a Jinja file, or the template's text itself, used instead of the
    # model's own template (tokenizer.resolve_chat_template tells the two apart).
    chat_template: str | None = None
    # Where unset sampling fields take their defaults from (vLLM's --generation-config): auto,
    # the model's generation_config.json; vllm, none (SamplingParams' own); or a folder.
    generation_config: str = "auto"
    # vLLM's --override-generation-config: sampling defaults set over (or, with
    # generation_config "vllm", instead of) the file's, e.g. {"temperature": 0.5}.
    override_generation_config: dict[str, Any] | None = None
    # vLLM's --quantization: fp8, FP8 weights and activations in the dense linear layers
    # (layers/quantization.py); None: the checkpoint's own, i.e. fp8 for a block-FP8 checkpoint
    # on a GPU with FP8 matrix units, else the model dtype (FP8 checkpoints dequantized).
    quantization: str | None = None

    # Filled by resolve(); not user settings.
    source: Any = field(default=None, repr=False)  # loader.source.ModelSource
    hf_config: Any = field(default=None, repr=False)  # transformers.PretrainedConfig
    architecture: str = ""
    # SamplingParams keyword arguments from generation_config (generation_defaults.py)
    generation_defaults: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def served_model_names(self) -> list[str]:
        """Every name the model answers to, the reported one first (after resolve())."""
        name = self.served_model_name
        return [name] if isinstance(name, str) else list(name or [])

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)


@dataclass
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9  # CUDA: this engine's share of each GPU (vLLM's rule)
    kv_cache_memory_bytes: int | None = None  # CPU (or an explicit CUDA size); default 1 GiB on CPU
    num_gpu_blocks_override: int | None = None  # tests: force a tiny cache
    # auto: the model's dtype. fp8 (= fp8_e4m3) or fp8_e5m2: one byte per element, so twice
    # the tokens in the same memory and half the bytes each decode step reads; values are
    # stored unscaled (vLLM's default scale of 1.0), saturated at the format's largest finite
    # value, and widened back to the model's dtype inside attention.
    kv_cache_dtype: str = "auto"

    num_blocks: int = 0  # filled once the cache is sized

    def kv_torch_dtype(self, model_dtype):
        """The cache's element type for a model computing in model_dtype (a torch dtype)."""
        import torch
        if self.kv_cache_dtype == "auto":
            return model_dtype
        return getattr(torch, _FP8_KV_CACHE_DTYPES[self.kv_cache_dtype])


@dataclass
class ParallelConfig:
    """How the model is split over processes, and where those processes run.

    One engine's ranks form a PP x TP grid (TP innermost); with `nnodes` > 1 node r hosts the
    world_size / nnodes consecutive ranks [r * n, (r + 1) * n). Node 0 runs the engine (and the
    server); the other nodes run headless workers (`shardserve worker`). The LeaderWorkerSet
    variables LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX fill master_addr, nnodes
    and node_rank when those are not given.
    """

    # Each may also be 'auto' until EngineConfig.resolve() (planner/auto.py) makes it an int.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per TP rank instead of TP slices
    nnodes: int | None = None  # default: $LWS_GROUP_SIZE or 1
    node_rank: int | None = None  # default: $LWS_WORKER_INDEX or 0
    master_addr: str | None = None  # node 0's address; default: $LWS_LEADER_ADDRESS or 127.0.0.1
    # Multi-node: torch.distributed's store listens here and node 0's engine on the next four
    # ports (steps, results, heartbeats out, heartbeats in). Single node: free ports are picked.
    master_port: int | None = None  # default 29500 with nnodes > 1
    rendezvous_timeout_s: float = 300.0  # how long node 0 waits for every rank to check in
    step_timeout_s: float = 300.0  # longest a step (or a collective) may take before it is a hang
    heartbeat_timeout_s: float = 10.0  # silence after which a worker (or the engine) is dead
    # Layers per pipeline stage, e.g. "14,10,8" (None: balanced on estimated compute and
    # memory, counting the embedding and the LM head; planner/stages.py).
    pp_layer_partition: str | None = None
    # TP all-reduces of small messages over symmetric memory instead of NCCL, when the TP group
    # is one node's GPUs with peer access (distributed/custom_all_reduce.py); messages larger
    # than custom_all_reduce_max_bytes (its buffer per GPU) go through NCCL.
    disable_custom_all_reduce: bool = False
    custom_all_reduce_max_bytes: int = 8 << 20
    # With the custom all-reduce on, a decoder sublayer's all-reduce and the residual add +
    # RMSNorm after it run as one kernel (kernels/all_reduce_rms_norm.py); this keeps them apart.
    disable_fused_all_reduce_norm: bool = False
    # Batches that need only the best token per row (greedy or plain temperature sampling,
    # no logprobs or logit processors) are sampled from each TP rank's vocabulary shard, with
    # one all-reduce of [rows] keys (layers/sampler.py); this gathers the logits to one rank.
    disable_vocab_parallel_sampling: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def num_local_ranks(self) -> int:
        """Ranks (processes, GPUs) on each node."""
        return self.world_size // (self.nnodes or 1)

    @property
    def driver_rank(self) -> int:
        """The rank that samples and answers the engine: TP rank 0 of the last PP stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def node_ranks(self, node_rank: int) -> range:
        """The global ranks that node `node_rank` hosts."""
        n = self.num_local_ranks
        return range(node_rank * n, (node_rank + 1) * n)

    def resolve(self, environ: dict[str, str] | None = None) -> "ParallelConfig":
        """Fill the node fields from LWS_* variables or defaults, and check the layout."""
        env = os.environ if environ is None else environ
        # Where a value came from, for the errors below: a user who passed no --node-rank
        # would not know what to change.
        source: dict[str, str] = {}
        for name, variable, default in (("nnodes", "LWS_GROUP_SIZE", 1),
                                        ("node_rank", "LWS_WORKER_INDEX", 0)):
            if getattr(self, name) is None:
                setattr(self, name, _env_int(env, variable, default, name))
                source[name] = f" (from ${variable})" if env.get(variable) else ""
        if self.master_addr is None:
            self.master_addr = env.get("LWS_LEADER_ADDRESS") or "127.0.0.1"
        if self.master_port is None and self.nnodes > 1:
            self.master_port = 29500
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "nnodes"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1, got {getattr(self, name)}"
                                          f"{source.get(name, '')}.", name)
        dp = self.data_parallel_size
        if isinstance(dp, int) and dp > 1 and self.nnodes > 1:
            # Checked before the split below, which would blame the TP x PP sizes instead.
            raise InvalidRequestError(
                f"data_parallel_size={dp} with nnodes={self.nnodes}: "
                "--nnodes spreads one replica's TP x PP ranks over nodes; for data parallelism "
                "across nodes run one `shardserve serve` per replica group and `shardserve "
                "router` in front of them.", "data_parallel_size")
        if self.world_size % self.nnodes:
            raise InvalidRequestError(
                f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} ranks do not "
                f"split evenly over nnodes={self.nnodes}{source.get('nnodes', '')}.", "nnodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise InvalidRequestError(f"node_rank must be in [0, {self.nnodes}), got "
                                      f"{self.node_rank}{source.get('node_rank', '')}.",
                                      "node_rank")
        # Node 0 listens on master_port .. master_port + 4 (executor/wire.py); ZMQ takes a
        # port past 65535 modulo 65536 without a word, so node 1 would wait at the wrong one.
        if self.master_port is not None and not 1 <= self.master_port <= 65535 - 4:
            raise InvalidRequestError(
                f"master_port must be in [1, {65535 - 4}] (node 0 also listens on the four ports "
                f"after it), got {self.master_port}.", "master_port")
        for name in ("rendezvous_timeout_s", "step_timeout_s", "heartbeat_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name} must be positive.", name)
        self._normalize_pp_layer_partition()
        return self

    def _normalize_pp_layer_partition(self) -> None:
        """LLM(pp_layer_partition=[14, 10, 8]) means what "14,10,8" means on the command line;
        every later reader (and the workers, which get the config as kwargs) takes the string."""
        part = self.pp_layer_partition
        if part is None or isinstance(part, str):
            return
        if (isinstance(part, (list, tuple))
                and all(isinstance(n, int) and not isinstance(n, bool) for n in part)):
            self.pp_layer_partition = ",".join(str(n) for n in part)
            return
        raise InvalidRequestError(
            f"pp_layer_partition must be layer counts per stage, as a string \"14,10,8\" or a "
            f"list [14, 10, 8], got {part!r}.", "pp_layer_partition")


@dataclass
class SchedulerConfig:
    max_num_seqs: int | None = None  # rows a step; default: default_max_num_seqs
    max_num_batched_tokens: int | None = None  # per-step token budget; default: see below
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # None: unbounded (the server bounds it)
    # Schedule and launch step N+1 while step N runs on the GPU (its sampled tokens feed N+1
    # on the device). None: on for CUDA without pipeline parallelism (resolve()).
    async_scheduling: bool | None = None
    # Who runs the engine, as vLLM's UsageContext: "server" (OpenAI server, the default) or
    # "llm" (the offline LLM class, `bench throughput`/`latency`). It only picks the defaults
    # of max_num_seqs and max_num_batched_tokens (default_max_num_seqs, ...batched_tokens).
    usage_context: str = "server"


def _env_int(env: Any, variable: str, default: int, param: str) -> int:
    """An integer from the environment (a LeaderWorkerSet's variables), or a clear error."""
    text = env.get(variable) or ""
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidRequestError(f"${variable}={text!r} is not an integer; it sets {param} when "
                                  f"--{param.replace('_', '-')} is not given.", param) from None


@dataclass
class DeviceConfig:
    device: str = "auto"  # auto | cpu | cuda


def _check_type(name: str, annotation: str, value: Any) -> None:
    """A number or flag of the wrong type (LLM(max_model_len=2.5), block_size="16") would
    pass or break the range checks in resolve() in odd ways; name it here instead."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if (value is None and optional) or kind not in ("int", "float", "bool"):
        return
    if kind == "int" and name.endswith("_parallel_size") and value == "auto":
        return  # the planner picks the layout
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool)}[kind]
    if not ok:
        what = {"int": "an integer", "float": "a number", "bool": "True or False"}[kind]
        raise InvalidRequestError(f"{name} must be {what}{' or None' if optional else ''}, "
                                  f"got {value!r}.", name)


def _check_served_model_name(mc: ModelConfig) -> None:
    """Default the name to the model path; several names must be distinct non-empty strings."""
    name = mc.served_model_name
    if name is None or (isinstance(name, (list, tuple)) and not name):
        mc.served_model_name = mc.model if mc.model else mc.source.name
        return
    names = [name] if isinstance(name, str) else name
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequestError(f"served_model_name must be a non-empty string or a list of "
                                  f"them, got {name!r}.", "served_model_name")
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"served_model_name lists a name twice: {name!r}.",
                                  "served_model_name")
    if not isinstance(name, str):
        mc.served_model_name = list(names)


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
        pop_vllm_only_kwargs(kwargs)
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        built: dict[str, Any] = {}
        for section_name, section_cls in (("model_config", ModelConfig),
                                          ("cache_config", CacheConfig),
                                          ("parallel_config", ParallelConfig),
                                          ("scheduler_config", SchedulerConfig),
                                          ("device_config", DeviceConfig)):
            fields = {f.name: f.type for f in dataclasses.fields(section_cls) if f.init}
            for k in fields.keys() & kwargs.keys():
                _check_type(k, fields[k], kwargs[k])
            built[section_name] = section_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
        assert set(built) == set(sections)
        if kwargs:
            import difflib
            known = [f.name for c in (ModelConfig, CacheConfig, ParallelConfig, SchedulerConfig,
                                      DeviceConfig) for f in dataclasses.fields(c) if f.init]
            known += list(VLLM_ONLY_KWARGS)
            hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
                k, known, n=1, cutoff=0.75)) else k for k in sorted(kwargs)]
            raise TypeError(f"Unknown engine arguments: {', '.join(hints)}")
        return cls(**built)

    def resolve(self) -> "EngineConfig":
        """Fill the model-dependent fields and check the settings against each other."""
        import torch

        from shardserve.generation_defaults import load_generation_defaults
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
        if mc.load_format not in LOAD_FORMATS:
            raise InvalidRequestError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                                      f"got {mc.load_format!r}.", "load_format")
        mc.source = resolve_model_source(mc.model, weights_needed=mc.load_format != "dummy")
        if mc.load_format in ("safetensors", "gguf") and mc.source.kind != _SOURCE_KIND[mc.load_format]:
            raise InvalidRequestError(
                f"load_format={mc.load_format!r} but {mc.source.path} is a "
                f"{'GGUF file' if mc.source.kind == 'gguf' else 'Hugging Face folder'}; use "
                "load_format='auto' or point --model at a matching checkpoint.", "load_format")
        mc.hf_config = load_hf_config(mc.source)
        mc.generation_defaults = load_generation_defaults(mc.generation_config, mc.source.folder,
                                                          mc.override_generation_config)
        if mc.chat_template is not None:  # a missing file is one clear error before loading
            from shardserve.tokenizer import resolve_chat_template
            resolve_chat_template(mc.chat_template)
        mc.architecture = check_architecture(mc.hf_config)
        mc.dtype = resolve_dtype(mc.dtype, mc.hf_config, dc.device)
        mc.quantization = resolve_quantization(mc.quantization, mc.hf_config, dc.device)
        from shardserve.layers.rotary import get_rope_config
        trained_len = getattr(mc.hf_config, "max_position_embeddings", None)
        rope_scaling = get_rope_config(mc.hf_config)[1]
        model_max = scaled_max_model_len(int(trained_len or 2048), rope_scaling)
        if mc.max_model_len is None:
            mc.max_model_len = model_max
        elif mc.max_model_len < 1:
            raise InvalidRequestError(f"max_model_len must be positive, got {mc.max_model_len}.",
                                      "max_model_len")
        if mc.seed is None:
            mc.seed = 0
        if cc.block_size < 1 or cc.block_size & (cc.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {cc.block_size}.",
                                      "block_size")
        self._check_kv_cache_dtype()
        if sc.usage_context not in ("server", "llm"):
            raise InvalidRequestError(f"usage_context must be 'server' or 'llm', got "
                                      f"{sc.usage_context!r}.", "usage_context")
        if sc.max_num_seqs is None:
            sc.max_num_seqs = default_max_num_seqs(sc.usage_context, dc.device)
        if sc.max_num_batched_tokens is None:
            budget = default_max_num_batched_tokens(sc.usage_context, dc.device)
            sc.max_num_batched_tokens = (budget if sc.enable_chunked_prefill
                                         else max(budget, mc.max_model_len))
        if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < mc.max_model_len:
            raise InvalidRequestError(
                f"Without chunked prefill, max_num_batched_tokens ({sc.max_num_batched_tokens}) must "
                f"be at least max_model_len ({mc.max_model_len}).", "max_num_batched_tokens")
        if sc.max_num_seqs < 1 or sc.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be positive.",
                                      "max_num_seqs")
        if mc.max_cuda_graph_batch_size < 1:
            raise InvalidRequestError(
                f"max_cuda_graph_batch_size (--max-cudagraph-capture-size) must be at least 1, "
                f"got {mc.max_cuda_graph_batch_size}; --enforce-eager runs without CUDA graphs.",
                "max_cuda_graph_batch_size")
        if sc.max_waiting_requests is not None and sc.max_waiting_requests < 0:
            # Negative also took away free --max-num-seqs slots: 503s with room to spare.
            raise InvalidRequestError(f"max_waiting_requests must not be negative, got "
                                      f"{sc.max_waiting_requests} (leave it out for no limit).",
                                      "max_waiting_requests")
        if not 0.0 < cc.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError(
                f"gpu_memory_utilization must be in (0, 1], got {cc.gpu_memory_utilization}.",
                "gpu_memory_utilization")
        _check_served_model_name(mc)
        # -tp/-pp/-dp 'auto': the planner picks from the model and the visible GPUs (ints after).
        from shardserve.planner.auto import resolve_auto_parallel_on_device
        resolve_auto_parallel_on_device(self)
        self.parallel_config.resolve()
        check_parallel_layout(self)
        # Past max_position_embeddings (times the RoPE scaling factor, where there is one)
        # positions were never trained.
        rope_type = (rope_scaling or {}).get("rope_type", "default")
        if trained_len and mc.max_model_len > model_max:
            limit = (f"max_position_embeddings {trained_len}" if model_max == trained_len else
                     f"context of {model_max} tokens (max_position_embeddings {trained_len} with "
                     f"{rope_type} RoPE scaling, as vLLM counts it)")
            if not allow_long_max_model_len():
                raise InvalidRequestError(
                    f"max_model_len {mc.max_model_len} is beyond the model's {limit}: positions "
                    "past it were never trained. Lower --max-model-len (or leave it out), or set "
                    f"{ALLOW_LONG_MAX_MODEL_LEN_ENV[0]}=1 (vLLM's "
                    f"{ALLOW_LONG_MAX_MODEL_LEN_ENV[1]} works too) to run it anyway.",
                    "max_model_len")
            logging.getLogger(__name__).warning(
                "max_model_len %d is beyond the model's %s: positions past it were never trained "
                "and outputs there may be wrong.", mc.max_model_len, limit)
        if trained_len and mc.max_model_len > trained_len and rope_type == "dynamic":
            # transformers rotates a whole prompt with the base of its length; we rotate each
            # position with the base of its own (layers/rotary.py _dynamic_freqs).
            logging.getLogger(__name__).warning(
                "Dynamic NTK RoPE: prompts longer than max_position_embeddings %d are rotated "
                "per position, not with one base for the whole prompt as in transformers, so "
                "their outputs differ from transformers' (decoding past it matches).", trained_len)
        no_pipeline = self.parallel_config.pipeline_parallel_size == 1
        if sc.async_scheduling is None:
            sc.async_scheduling = no_pipeline and dc.device == "cuda"
        elif sc.async_scheduling and not no_pipeline:
            # Pipeline stages already overlap through their micro-batches, and the first stage
            # would need the last one's sampled ids on its device: run them in lock-step.
            logging.getLogger(__name__).warning(
                "async_scheduling is off under pipeline parallelism (its micro-batches keep "
                "the stages busy instead).")
            sc.async_scheduling = False
        return self

    def _check_kv_cache_dtype(self) -> None:
        cc = self.cache_config
        check_kv_cache_dtype(cc.kv_cache_dtype)
        if cc.kv_cache_dtype != "auto" and getattr(self.model_config.hf_config, "kv_lora_rank", None):
            raise InvalidRequestError(
                f"kv_cache_dtype={cc.kv_cache_dtype!r} is not supported for multi-head latent "
                "attention models (DeepSeek-V2/V3) yet: their latent cache stays in the model's "
                "dtype. Use kv_cache_dtype='auto'.", "kv_cache_dtype")

    def to_kwargs(self) -> dict[str, Any]:
        """The flat user-level settings (the inverse of from_kwargs; no derived fields), in
        plain types: what node 0 sends other nodes so every rank builds the same engine."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            for f in dataclasses.fields(value):
                if f.init and f.name not in DERIVED_FIELDS:
                    out[f.name] = getattr(value, f.name)
        return out
