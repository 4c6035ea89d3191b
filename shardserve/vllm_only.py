"""vLLM engine arguments that shardserve has no field for, as ported scripts pass them to
LLM(...) and as `vllm serve` flags: accepted silently where the value asks for what shardserve
does anyway, ignored with a warning where it only tunes something shardserve lacks, refused
(saying why) where ignoring it would change results. compilation_config's CUDA-graph keys are
translated into the engine settings they mean here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shardserve.errors import InvalidRequestError

_NO_HUB = "shardserve reads local files only (no model hub): pass the model's folder or .gguf"
_NO_REVISION = ("shardserve reads local files only (no model hub): download that revision and "
                "pass its folder as the model")
# vLLM engine arguments shardserve has no field for, as LLM(...) gets them from ported
# scripts: name -> (the values that ask for nothing, whether any other value is only a tuning
# knob to ignore with a warning (else it would change what the user gets: an error), why).
VLLM_ONLY_KWARGS: dict[str, tuple[tuple[Any, ...], bool, str]] = {
    "download_dir": ((None,), True, _NO_HUB),
    "hf_token": ((None,), True, _NO_HUB),
    "revision": ((None,), False, _NO_REVISION),
    "tokenizer_revision": ((None,), False, _NO_REVISION),
    "code_revision": ((None,), False, _NO_REVISION),
    "tokenizer_mode": (("auto", "hf"), False,
                       "shardserve always uses the fast tokenizer (tokenizer.json or the GGUF's)"),
    "skip_tokenizer_init": ((False,), False, "the tokenizer is always loaded"),
    "swap_space": ((4, 0), True, "shardserve preempts by recomputing, never swapping to CPU memory"),
    "cpu_offload_gb": ((0,), False, "weights are never offloaded to CPU memory; use more GPUs "
                                    "(tensor_parallel_size / pipeline_parallel_size)"),
    "disable_log_stats": ((True,), True, "shardserve logs no periodic stats"),
    "disable_log_requests": ((True,), True, "shardserve does not log requests"),
    "max_seq_len_to_capture": ((8192,), True, "CUDA graphs are captured by batch size "
                                              "(max_cuda_graph_batch_size)"),
    "max_context_len_to_capture": ((None,), True, "CUDA graphs are captured by batch size "
                                                  "(max_cuda_graph_batch_size)"),
    # Its CUDA-graph keys are translated (compilation_config_settings); the rest is ignored.
    "compilation_config": ((None,), True, "shardserve does not run torch.compile"),
    "disable_async_output_proc": ((False,), True, "no such stage here"),
    "distributed_executor_backend": ((None, "mp"), True,
                                     "shardserve runs one worker process per GPU (vLLM's mp); "
                                     "across nodes, pass --nnodes and --node-rank"),
    "max_parallel_loading_workers": ((None,), True, "weights load in one pass per rank"),
    "tokenizer_pool_size": ((0,), True, "the tokenizer runs in this process"),
    "calculate_kv_scales": ((False,), True, "fp8 KV caches use a scale of 1.0"),
    "enable_sleep_mode": ((False,), False, "LLM.sleep() is not supported"),
    "max_logprobs": ((20,), True, "logprobs are capped at 20"),
    "model_impl": (("auto",), True, "shardserve runs its own model code"),
    "config_format": (("auto",), True, "config.json or the GGUF header is read as found"),
    "task": (("auto", "generate"), False, "shardserve only generates text"),
    "runner": (("auto", "generate"), False, "shardserve only generates text"),
    "enable_lora": ((False, None), False, "LoRA adapters are not supported (merge the adapter "
                                          "into the weights)"),
    "max_loras": ((1,), True, "LoRA adapters are not supported"),
    "max_lora_rank": ((16,), True, "LoRA adapters are not supported"),
    "speculative_config": ((None,), False, "speculative decoding is not supported"),
    "hf_overrides": ((None, {}), False, "edit config.json instead"),
    "logits_processors": ((None, []), False, "custom logits processors are not supported"),
    "disable_sliding_window": ((False,), False, "sliding-window attention is always applied "
                                                "as the model defines it"),
    "scheduling_policy": (("fcfs",), False, "requests are scheduled first come, first served"),
    "kv_transfer_config": ((None,), False, "KV transfer (disaggregated prefill) is not supported"),
    "limit_mm_per_prompt": ((None, {}), True, "shardserve takes text-only prompts"),
    "mm_processor_kwargs": ((None, {}), True, "shardserve takes text-only prompts"),
    "allowed_local_media_path": (("",), True, "shardserve takes text-only prompts"),
    "structured_outputs_config": ((None,), True, "structured outputs are not supported (requests "
                                                 "asking for them are refused)"),
    "guided_decoding_backend": ((None, "auto"), True, "structured outputs are not supported "
                                                      "(requests asking for them are refused)"),
    "enable_eplb": ((False,), True, "experts are not rebalanced across ranks"),
    "cuda_graph_sizes": ((None, []), True, "CUDA graphs are captured for every batch size up "
                                           "to max_cuda_graph_batch_size"),
    "max_num_partial_prefills": ((1,), True, "prompts are chunked within "
                                             "max_num_batched_tokens, first come first served"),
    "long_prefill_token_threshold": ((0,), True, "prompts are chunked within "
                                                 "max_num_batched_tokens, first come first served"),
    "num_scheduler_steps": ((1,), True, "one step is scheduled at a time (with "
                                        "async_scheduling overlapping the next)"),
    "disable_cascade_attn": ((False, True), True, "there is no cascade attention to disable"),
    "enable_prompt_embeds": ((False,), False, "prompts are text or token ids, not embeddings"),
}


# vLLM's compilation_config.cudagraph_mode -> the settings that give it here. shardserve's
# graphs are always whole forwards (vLLM's FULL): "PIECEWISE" asks for graphs of prompt steps
# too, which is what full graphs of them give.
_CUDAGRAPH_MODES = {"NONE": {"enforce_eager": True},
                    "FULL_DECODE_ONLY": {"mixed_cuda_graphs": False},
                    "PIECEWISE": {}, "FULL": {}, "FULL_AND_PIECEWISE": {}}


def compilation_config_settings(value: Any) -> tuple[dict[str, Any], list[str]]:
    """vLLM's compilation_config (-O): the engine settings its CUDA-graph keys mean here
    (cudagraph_mode, max_cudagraph_capture_size, cudagraph_capture_sizes' largest,
    use_cudagraph), and what is ignored (an optimization level; torch.compile's keys)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"compilation_config is not valid JSON: {exc}.",
                                      "compilation_config") from None
    if not isinstance(value, dict):
        return {}, ([] if value is None else [f"optimization level {value!r}"])
    settings: dict[str, Any] = {}
    ignored: list[str] = []
    for key, item in value.items():
        if key == "cudagraph_mode":
            mode = str(getattr(item, "name", item)).upper()
            if mode not in _CUDAGRAPH_MODES:
                raise InvalidRequestError(
                    f"compilation_config cudagraph_mode={item!r}: use one of "
                    f"{', '.join(_CUDAGRAPH_MODES)}.", "compilation_config")
            settings.update(_CUDAGRAPH_MODES[mode])
        elif key == "max_cudagraph_capture_size" and isinstance(item, int) and item > 0:
            settings["max_cuda_graph_batch_size"] = item
        elif key == "cudagraph_capture_sizes" and isinstance(item, list) and item:
            # The ladder is shardserve's own; the largest size is what bounds it.
            settings["max_cuda_graph_batch_size"] = max(int(s) for s in item)
        elif key == "use_cudagraph" and item is False:
            settings["enforce_eager"] = True
        elif item is not None:
            ignored.append(key)
    return settings, ignored


def vllm_only_verdict(value: Any, neutral: tuple[Any, ...], ignorable: bool) -> str:
    """What to do with a vLLM-only setting: 'accept' (the value asks for what shardserve does
    anyway), 'warn' (another value of a tuning knob shardserve lacks) or 'refuse' (ignoring
    it would change results)."""
    if any(value == v and type(value) is type(v) for v in neutral):
        return "accept"
    return "warn" if ignorable else "refuse"


def pop_vllm_only_kwargs(kwargs: dict[str, Any]) -> None:
    """Take vLLM's engine arguments that have no meaning here out of kwargs: silently where
    the value asks for nothing, with a warning where it only tunes something shardserve does
    not have, and an InvalidRequestError (saying why) where ignoring it would change results."""
    for name in [k for k in kwargs if k in VLLM_ONLY_KWARGS]:
        value = kwargs.pop(name)
        if name == "compilation_config" and not isinstance(value, (int, type(None))):
            settings, ignored = compilation_config_settings(value)
            for key, setting in settings.items():
                kwargs.setdefault(key, setting)  # an explicit engine argument wins
            if ignored:
                logging.getLogger(__name__).warning(
                    "Ignoring compilation_config's %s: %s.", ", ".join(ignored),
                    VLLM_ONLY_KWARGS[name][2])
            continue
        neutral, ignorable, why = VLLM_ONLY_KWARGS[name]
        verdict = vllm_only_verdict(value, neutral, ignorable)
        if verdict == "accept":
            continue
        if verdict == "warn":
            logging.getLogger(__name__).warning("Ignoring the vLLM engine argument %s=%r: %s.",
                                                name, value, why)
            continue
        raise InvalidRequestError(f"{name}={value!r} is a vLLM engine argument shardserve cannot "
                                  f"honour: {why}; drop it.", name)
