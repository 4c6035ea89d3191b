"""The offline API, with vLLM's names: LLM(model=...).generate(prompts, sampling_params)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

from shardserve.config import EngineConfig
from shardserve.engine.input_processor import PromptType
from shardserve.engine.llm_engine import LLMEngine
from shardserve.errors import InvalidRequestError
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import BeamSearchParams, SamplingParams
from shardserve.tokenizer import chat_prompt_ids, render_chat_template

if TYPE_CHECKING:
    from shardserve.beam_search import BeamSearchOutput

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class LLM:
    """An engine in this process. Every vLLM-style engine argument is accepted by name
    (see shardserve.config for the full list; vLLM's that mean nothing here are taken as
    vllm_only.VLLM_ONLY_KWARGS says: silently, with a warning, or refused), e.g.

        llm = LLM(model="path/to/hf-folder-or.gguf", dtype="float32", max_model_len=2048)
        out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
        print(out[0].outputs[0].text)
    """

    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 seed: int | None = 0, **kwargs: Any) -> None:
        config = EngineConfig.from_kwargs(
            model=model, device=device, dtype=dtype, max_model_len=max_model_len,
            block_size=block_size, enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            **{"usage_context": "llm", **kwargs})
        self.engine = LLMEngine(config)

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine under this LLM."""
        return self.engine

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's: the next prompts are computed in full, none served from earlier ones' blocks."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use when sampling_params is None: SamplingParams'
        defaults overlaid with the model's generation_config.json (generation_config='auto',
        as in vLLM; 'vllm' keeps SamplingParams' own)."""
        return SamplingParams(**self.config.model_config.generation_defaults)

    def start_profile(self, out_dir: str | None = None) -> None:
        """Profile every rank with torch.profiler from now until stop_profile() (vLLM's API).
        out_dir defaults to $SHARDSERVE_TORCH_PROFILER_DIR; each rank writes its own trace
        there, so tensor- and pipeline-parallel ranks are seen too, not just this process."""
        from shardserve.executor.profiler import profiler_dir
        self.engine.core.start_profile(profiler_dir(out_dir))

    def stop_profile(self) -> list[dict]:
        """Stop profiling; returns one dict a rank: its trace file, its kernel table file and
        the top kernels (by GPU time; operators by CPU time on a CPU)."""
        return self.engine.core.stop_profile()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor/pipeline-parallel engine now (they also stop
        when the LLM is garbage-collected or the interpreter exits)."""
        self.engine.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., Any] = True, lora_request: Any = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns one RequestOutput per prompt, in order.
        use_tqdm may be a tqdm-like class to draw the progress bar with (vLLM's)."""
        _refuse_lora(lora_request)
        # vLLM refuses non-zero priorities unless its priority scheduler is on; ours is FCFS.
        if priority is not None and (not isinstance(priority, (list, tuple))
                                     or any(p != 0 for p in priority)):
            raise InvalidRequestError("priority is not supported: requests are scheduled first "
                                      "come, first served; leave priority unset (or all 0).",
                                      "priority")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequestError("prompts must be a string, a {'prompt_token_ids': [...]} dict, "
                                      f"or a list of those; got {type(prompts).__name__}.", "prompts")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _broadcast_params(sampling_params, len(prompts))
        # Check every prompt before queueing any: a bad one must not leave others behind.
        processed = [self.engine.input_processor.process_prompt(p, sp.truncate_prompt_tokens)
                     for p, sp in zip(prompts, params_list)]
        return self._run(processed, params_list, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: Any = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list["BeamSearchOutput"]:
        """vLLM's beam search: per prompt, the params.beam_width best sequences, best first
        (see shardserve/beam_search.py). Runs on generate()'s engine one token a step; prefix
        caching (on by default) keeps the repeated prompts cheap. concurrency_limit: how many
        prompts search together (all by default)."""
        from shardserve.beam_search import beam_search
        _refuse_lora(lora_request)
        if not isinstance(prompts, (str, dict, list, tuple)):
            raise InvalidRequestError("prompts must be a string, a {'prompt_token_ids': [...]} dict, "
                                      f"or a list of those; got {type(prompts).__name__}.", "prompts")
        return beam_search(self, prompts, params, use_tqdm, concurrency_limit)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., Any] = True, lora_request: Any = None,
             chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             chat_template_content_format: str = "auto",
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template
        (vLLM's arguments: chat_template is Jinja text used instead of the model's; tools are
        handed to the template, whose text the reply is, as in vLLM: no tool-call parsing).
        chat_template_content_format is taken for vLLM's signature: content given as a list of
        text parts always reaches the template joined into one string, which is what a
        template iterating over the parts renders too (text only: no images)."""
        _refuse_lora(lora_request)
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise InvalidRequestError(f"chat_template_content_format must be 'auto', 'string' or "
                                      f"'openai', got {chat_template_content_format!r}.",
                                      "chat_template_content_format")
        if mm_processor_kwargs:
            raise InvalidRequestError("mm_processor_kwargs is not supported: this engine takes "
                                      "text-only prompts.", "mm_processor_kwargs")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} "
                                      "dicts (or a list of such lists).", "messages")
        conversations = messages if isinstance(messages[0], list) else [messages]
        tokenizer = self.engine.tokenizer
        texts = [render_chat_template(tokenizer, conv, add_generation_prompt, chat_template_kwargs,
                                      chat_template=chat_template, tools=tools,
                                      continue_final_message=continue_final_message)
                 for conv in conversations]
        # The rendered text rides along as the prompt, so RequestOutput.prompt holds it (vLLM).
        prompts = [{"prompt_token_ids": chat_prompt_ids(tokenizer, text), "prompt": text}
                   for text in texts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, processed, params_list, use_tqdm) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(processed), use_tqdm) if use_tqdm else None
        try:
            for p, sp in zip(processed, params_list):
                ids.append(engine.add_processed(p, sp, stream=False))
            while len(finished) < len(ids):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            # Leave nothing behind: the next call must find a clean engine.
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]


def _broadcast_params(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise InvalidRequestError(f"sampling_params must be a SamplingParams or a list of them; "
                                  f"got {type(params).__name__}.", "sampling_params")
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"Got {len(params)} sampling params for {n} prompts; pass one, "
                                  "or one per prompt.", "sampling_params")
    wrong = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
    if wrong:
        raise InvalidRequestError(f"sampling_params must be SamplingParams objects; got "
                                  f"{wrong[0]}.", "sampling_params")
    return params


def _refuse_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise InvalidRequestError("LoRA adapters are not supported: lora_request must be None "
                                  "(merge the adapter into the weights and load that model).",
                                  "lora_request")


def _progress_bar(total: int, use_tqdm):
    """use_tqdm: True, or a tqdm-like class to draw the bar with (vLLM's)."""
    from tqdm.auto import tqdm
    bar = use_tqdm if callable(use_tqdm) else tqdm
    return bar(total=total, desc="Generating", unit="req", dynamic_ncols=True)
