"""LLMEngine: the in-process front end over one EngineCore (the offline LLM uses it).

    add_request(prompt, params) -> InputProcessor -> EngineCore.add_request (n children)
    step() -> EngineCore.step() -> OutputProcessor -> RequestOutputs (+ aborts for stop strings)
"""

from __future__ import annotations

import logging
from typing import Any

from shardserve.config import EngineConfig
from shardserve.engine.core import EngineCore
from shardserve.engine.input_processor import InputProcessor, PromptType
from shardserve.engine.output_processor import OutputProcessor
from shardserve.engine.request import RequestStatus
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams
from shardserve.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config.resolve()
        dp = self.config.parallel_config.data_parallel_size
        if dp > 1:  # replicas are processes behind a router (router/data_parallel.py)
            logger.warning("data_parallel_size=%d is ignored here: this engine is one "
                           "replica. `shardserve serve -dp %d` runs %d replicas behind a router.",
                           dp, dp, dp)
        mc = self.config.model_config
        self.tokenizer = load_tokenizer(mc.source, mc.tokenizer, mc.chat_template)
        eos = eos_token_ids(self.tokenizer, mc.hf_config, mc.source.folder)
        self.input_processor = InputProcessor(self.config, self.tokenizer, eos)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(self.config)

    def add_request(self, prompt: PromptType, params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Validate, tokenize and queue one prompt; raises before anything is queued if the
        request is bad."""
        processed = self.input_processor.process_prompt(prompt, params.truncate_prompt_tokens)
        return self.add_processed(processed, params, request_id)

    def add_processed(self, processed, params: SamplingParams, request_id: str | None = None,
                      stream: bool = True) -> str:
        request_id = request_id or self.input_processor.next_request_id()
        requests = self.input_processor.make_requests(request_id, processed, params)
        self.output_processor.add_request(request_id, processed.prompt, requests, stream)
        for request in requests:
            self.core.add_request(request)
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            children = self.output_processor.child_ids(rid)
            self.output_processor.abort(rid)
            self.core.abort_requests(children)

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, to_abort = self.output_processor.process_outputs(core_outputs)
        if to_abort:
            self.core.scheduler.finish_requests(to_abort, RequestStatus.FINISHED_STOPPED)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished > 0 or self.core.has_unfinished_requests()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (vLLM's, e.g. between benchmark runs); False, and
        nothing forgotten, while a request holds blocks."""
        return self.core.scheduler.kv_cache.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the executor's worker processes (TP/PP); a no-op for one process."""
        self.core.shutdown()
