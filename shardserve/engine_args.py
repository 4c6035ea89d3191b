"""Command-line flags generated from the config tree's fields, with vLLM's names and aliases."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
from typing import Any

from shardserve.config import (DERIVED_FIELDS, KV_CACHE_DTYPES, LOAD_FORMATS, CacheConfig,
                               DeviceConfig, EngineConfig, ModelConfig, ParallelConfig,
                               SchedulerConfig)
from shardserve.config_defaults import QUANTIZATION_METHODS
from shardserve.planner.auto import parse_parallel_size

_SECTIONS = (ModelConfig, CacheConfig, ParallelConfig, SchedulerConfig, DeviceConfig)
_ALIASES = {
    "tensor_parallel_size": ["-tp"],
    "pipeline_parallel_size": ["-pp"],
    "data_parallel_size": ["-dp"],
    "kv_cache_memory_bytes": ["--kv-cache-memory"],
    "quantization": ["-q"],
    "max_cuda_graph_batch_size": ["--max-cudagraph-capture-size"],  # vLLM's name since 0.11
}
# Parallel sizes that also take 'auto' (shardserve/planner/auto.py resolves them).
_AUTO_SIZES = {"tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"}
# Environment variables that act as defaults for a flag (Kubernetes manifests set these).
_ENV_DEFAULTS = {
    "tensor_parallel_size": "TENSOR_PARALLEL_SIZE",
    "pipeline_parallel_size": "PIPELINE_PARALLEL_SIZE",
}
_HELP = {
    "model": "Hugging Face model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    "kv_cache_memory_bytes": "KV cache size, e.g. 2GiB or 500MB (CPU default 1GiB)",
    "gpu_memory_utilization": "this engine's share of each GPU (weights, activations, KV cache), "
                              "whatever other processes hold: two at 0.45 share one GPU",
    "kv_cache_dtype": "KV cache element type: auto (the model's dtype), or fp8 (= fp8_e4m3) / "
                      "fp8_e5m2: half the memory and decode-attention traffic, unscaled",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "quantization": "fp8: FP8 weights and activations in the attention and dense MLP "
                    "projections (scales per row and 128 columns; GPUs of compute capability "
                    "8.9 or later, emulated on CPU); default: a block-FP8 checkpoint runs in "
                    "FP8 on such GPUs, anything else in --dtype",
    "max_num_batched_tokens": "token budget per engine step",
    "async_scheduling": "prepare and launch the next step while the GPU runs this one "
                        "(default: on for CUDA without pipeline parallelism)",
    "load_format": "auto (the path's format), safetensors, gguf, or dummy: random weights "
                   "from config.json alone, for benchmarking a shape",
    "pp_layer_partition": "layers per pipeline stage, e.g. 14,10,8 (default: balanced on "
                          "estimated compute and memory, embedding and LM head included)",
    "disable_custom_all_reduce": "always all-reduce through NCCL, never over symmetric memory "
                                 "(the one-node fast path for small messages)",
    "disable_fused_all_reduce_norm": "run each TP all-reduce and the residual add + RMSNorm "
                                     "after it as two kernels instead of one (the fused "
                                     "kernel needs the custom all-reduce)",
    "disable_vocab_parallel_sampling": "under TP, gather every batch's logits to one rank "
                                       "to sample (by default greedy and plain temperature "
                                       "batches are sampled from each rank's vocabulary "
                                       "shard, exchanging one key per row)",
    "custom_all_reduce_max_bytes": "largest all-reduce, e.g. 8MiB, taken by the custom "
                                   "all-reduce (its buffer per GPU); larger ones use NCCL",
    "served_model_name": "the model's name(s) in the API: all are accepted in requests and "
                         "listed by /v1/models, the first is reported in responses (default: "
                         "the --model path)",
    "rendezvous_timeout_s": "seconds node 0 waits for every rank (and node) to check in",
    "step_timeout_s": "seconds one step or collective may take before its ranks count as hung "
                      "and the engine dies (failing its requests; the server then exits 1)",
    "heartbeat_timeout_s": "seconds of silence after which a worker rank, the engine core, or "
                           "(seen from the workers) node 0 counts as dead: stopped, frozen or "
                           "gone; a long step does not silence it",
    "chat_template": "the chat template for every chat request, instead of the model's: a "
                     "Jinja file's path, or the template's text itself (vLLM's rule: a value "
                     "with braces or a line break is the text)",
    "override_generation_config": "sampling defaults as JSON, e.g. '{\"temperature\": 0.5}', "
                                  "set over --generation-config's (repetition_penalty, "
                                  "temperature, top_k, top_p, min_p, max_new_tokens)",
    "generation_config": "where sampling fields a request leaves unset take their defaults: "
                         "auto (the model's generation_config.json), vllm (none: "
                         "SamplingParams' own) or a folder holding a generation_config.json",
    "tokenizer": "tokenizer folder (tokenizer.json) or .gguf file (default: the model's own)",
    "dtype": "weights and activations: auto (the checkpoint's half type on GPU, float32 on "
             "CPU), float32, float16 or bfloat16",
    "max_model_len": "longest sequence, prompt plus output, in tokens: 4096, 32k (32,000) or "
                     "32K (32,768) (default: the model's max_position_embeddings)",
    "seed": "seed of the random state (and of --load-format dummy weights)",
    "enforce_eager": "run every step eagerly: no CUDA graphs",
    "max_cuda_graph_batch_size": "largest step, in tokens, captured as a CUDA graph (decode "
                                 "batches, and with --mixed-cuda-graphs steps with prompt "
                                 "tokens); larger steps run eagerly",
    "mixed_cuda_graphs": "also capture steps with prompt tokens, by token count (off: only "
                         "decode steps replay graphs, as vLLM's FULL_DECODE_ONLY)",
    "block_size": "tokens per KV-cache block (a power of two)",
    "num_gpu_blocks_override": "KV-cache blocks to allocate, whatever memory is free (testing)",
    "tensor_parallel_size": "GPUs each layer is split over, or auto (the planner picks)",
    "pipeline_parallel_size": "pipeline stages the layers are divided into, or auto",
    "data_parallel_size": "replicas behind one endpoint (serve runs a router in front), or auto",
    "enable_expert_parallel": "MoE: each tensor-parallel rank holds whole experts instead of a "
                              "slice of every expert (the first ranks one more where they do not "
                              "divide evenly); unlike vLLM, data-parallel replicas do not share "
                              "experts",
    "nnodes": "nodes of a multi-node world (default: $LWS_GROUP_SIZE or 1)",
    "node_rank": "this node's index, 0 runs the server (default: $LWS_WORKER_INDEX or 0)",
    "master_addr": "node 0's address (default: $LWS_LEADER_ADDRESS or 127.0.0.1)",
    "master_port": "node 0's rendezvous port (default 29500 with --nnodes above 1; the next 4 "
                   "ports are used too)",
    "max_num_seqs": "most sequences in one step's batch (default 256; offline runs on GPUs of "
                    "70 GiB or more: 512)",
    "enable_chunked_prefill": "split long prompts over steps within --max-num-batched-tokens "
                              "(on; --no-enable-chunked-prefill turns it off)",
    "max_waiting_requests": "requests that may wait for a slot beyond the free ones; past them, "
                            "503 at once (default: no limit)",
    "device": "auto (cuda when a GPU is visible), cuda or cpu",
    "trust_remote_code": "accepted for vLLM compatibility and ignored: shardserve runs only its "
                         "own model code, never Python code shipped with a checkpoint",
}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 500MB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def parse_json_object(text: str) -> dict:
    """A JSON object flag, e.g. --override-generation-config '{"temperature": 0.5}'."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r} (e.g. "
                                         """'{"temperature": 0.5}')""")
    return value


def parse_token_count(text: str) -> int:
    """vLLM's human-readable lengths: '32k' = 32,000, '32K' = 32,768 (m/M, g/G likewise)."""
    m = re.fullmatch(r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k or 32K; "
                                         "'auto' is not supported: give a length)")
    number, unit = m.groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    from decimal import Decimal
    value = Decimal(number) * scale  # exact: 1.1k is 1100, not 1100.0000000000002
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}")
    return int(value)


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_engine_args(parser: argparse.ArgumentParser, include_model: bool = True) -> None:
    group = parser.add_argument_group("engine")
    for section in _SECTIONS:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if f.name in DERIVED_FIELDS or (f.name == "model" and not include_model):
                continue
            flag = "--" + f.name.replace("_", "-")
            names = [flag] + _ALIASES.get(f.name, [])
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = _HELP.get(f.name, f.name.replace("_", " "))
            env = _ENV_DEFAULTS.get(f.name)
            if env:
                help_text += f" (default: ${env} when set)"
                if os.environ.get(env):
                    # Left as text: argparse converts a string default with `type` only when
                    # the flag is not given, so a bad value is a usage error of the command
                    # that reads it, not a traceback while building every parser.
                    default = os.environ[env]
            hint = hints[f.name]
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
            if hint is bool or hint == "bool" or _base_type(hint) is bool:
                if default or default is None:  # None: 'auto', decided at start-up
                    group.add_argument(*names, **kwargs, type=parse_bool, nargs="?", const=True)
                    group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                       action="store_false", help=argparse.SUPPRESS)
                else:
                    group.add_argument(*names, **kwargs, action="store_true")
                    # vLLM's switches all take the --no- form (--no-enforce-eager)
                    group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                       action="store_false", help=argparse.SUPPRESS)
                continue
            if f.name == "load_format":
                kwargs["choices"] = LOAD_FORMATS
            if f.name == "kv_cache_dtype":
                kwargs["choices"] = KV_CACHE_DTYPES
            if f.name == "quantization":
                kwargs["choices"] = QUANTIZATION_METHODS
            if f.name == "served_model_name":
                kwargs["nargs"] = "+"  # vLLM's aliases: --served-model-name a b
            if f.name in ("kv_cache_memory_bytes", "custom_all_reduce_max_bytes"):
                kwargs["type"] = parse_size
            elif f.name == "max_model_len":
                kwargs["type"] = parse_token_count
            elif _base_type(hint) is dict or typing.get_origin(_base_type(hint)) is dict:
                kwargs["type"] = parse_json_object
            elif f.name in _AUTO_SIZES:
                kwargs["type"] = parse_parallel_size  # an int or 'auto' (the planner picks)
            else:
                base = _base_type(hint)
                kwargs["type"] = base
            if env and os.environ.get(env) and "type" in kwargs:
                kwargs["type"] = _naming_env(kwargs["type"], env)
            group.add_argument(*names, **kwargs)


def _naming_env(convert, env: str):
    """A bad value taken from the environment is named as such: argparse would blame the flag,
    which the user never typed."""
    def parse(text: str):
        try:
            return convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            if text != os.environ.get(env):
                raise
            detail = str(exc) or f"invalid value {text!r}"
            raise argparse.ArgumentTypeError(f"{detail} (from ${env}={text!r}: fix or unset "
                                             "it)") from None
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid <name> value"
    return parse


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for s in _SECTIONS for f in dataclasses.fields(s) if f.name not in DERIVED_FIELDS}
    return {k: v for k, v in vars(args).items() if k in names}


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(**engine_kwargs_from_args(args))
