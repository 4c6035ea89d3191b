"""AsyncLLM: the asyncio front end over an engine core in its own process (engine/core_proc.py,
reached through engine/core_client.py).

    generate() ─▶ InputProcessor (validate, tokenize, n > 1 fan-out) ─▶ EngineCoreRequest ─▶ core
    core ─▶ CoreStepOutputs ─▶ reader task ─▶ OutputProcessor (detokenize, stop strings)
         ─▶ one asyncio.Queue per request ─▶ the generate() consumer

The front end holds everything textual; the core holds only token ids. A consumer that goes
away (generator closed or its task cancelled) aborts its request in the core, which frees its
KV blocks at once. If the core process exits, every pending request gets EngineDeadError and
new ones are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Callable

from shardserve.config import EngineConfig
from shardserve.engine.core_client import CoreProcClient
from shardserve.engine.core_messages import (AbortRequests, CoreFailed, CoreReady, CoreStats,
                                             CoreStepOutputs, EngineCoreRequest, ProfileControl,
                                             ProfileResult)
from shardserve.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from shardserve.engine.output_processor import OutputProcessor
from shardserve.engine.stat_logger import FinishedRequestStats, StatLogger
from shardserve.errors import EngineDeadError, InvalidRequestError, OverloadedError
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams
from shardserve.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)

# After the core's process exits, wait this long for its last messages (error outputs,
# CoreFailed) to be read before failing what is left with a generic reason.
_EXIT_GRACE_S = 0.2


@dataclass
class _RequestState:
    request_id: str  # the caller's
    core_id: str  # what the core and the output processor know it as (see _add_request)
    child_ids: list[str]
    arrival_time: float
    num_prompt_tokens: int
    n: int
    max_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # RequestOutput | Exception
    scheduled: bool = False
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None


class AsyncLLM:
    """Serve requests concurrently from one asyncio loop; `await start()` before use.

        llm = AsyncLLM(EngineConfig.from_kwargs(model=..., max_model_len=512).resolve())
        await llm.start()
        async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
            print(out.outputs[0].delta_text, end="")
        await llm.shutdown()
    """

    def __init__(self, config: EngineConfig, stat_logger: StatLogger | None = None,
                 max_queue_time: float | None = None, log_level: int | None = None) -> None:
        self.config = config  # resolved (EngineConfig.resolve()) by the caller
        self.stat_logger = stat_logger or StatLogger()
        self.max_waiting_requests = config.scheduler_config.max_waiting_requests
        self.max_queue_time = max_queue_time
        self._log_level = logging.getLogger().level if log_level is None else log_level
        self.tokenizer: Any = None
        self.input_processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        self.latest_stats: CoreStats | None = None
        self.ready = False
        self.dead = False
        self.dead_reason: str | None = None
        self.on_dead: Callable[[], None] | None = None  # the server's hook (exit later)
        self._shutting_down = False
        self._stopping = False  # abort_all() was called: the server is going away
        self._states: dict[str, _RequestState] = {}
        self._by_core: dict[str, _RequestState] = {}
        self._by_child: dict[str, _RequestState] = {}
        # Requests not scheduled yet, oldest first: the admission bound and queue-time expiry.
        self._unscheduled: OrderedDict[str, _RequestState] = OrderedDict()
        self._ids = itertools.count()
        self._core_seq = itertools.count()
        self._core = CoreProcClient(config, self._log_level)
        self._ready_future: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._core_error: str | None = None
        self._profile_future: asyncio.Future | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer, start the core process and wait until the model is loaded.
        Raises EngineDeadError if the core fails to start."""
        loop = asyncio.get_running_loop()
        mc = self.config.model_config
        self.tokenizer = await asyncio.to_thread(load_tokenizer, mc.source, mc.tokenizer,
                                                    mc.chat_template)
        eos = eos_token_ids(self.tokenizer, mc.hf_config, mc.source.folder)
        self.input_processor = InputProcessor(self.config, self.tokenizer, eos)
        self.output_processor = OutputProcessor(self.tokenizer)

        self._ready_future = loop.create_future()
        await self._core.start(on_exit=self._on_core_exit)
        self._tasks.append(asyncio.create_task(self._read_outputs(), name="AsyncLLM.outputs"))
        if self.max_queue_time is not None:
            self._tasks.append(asyncio.create_task(self._expire_queued(), name="AsyncLLM.expiry"))
        ready: CoreReady = await self._ready_future
        self.ready = True
        logger.info("Engine core ready (pid %d, %d KV blocks)", ready.pid, ready.num_blocks)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (it gets ShutdownCore, then SIGKILL after `timeout` s) and fail what
        is still pending."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self._fail_all(EngineDeadError("The server is shutting down."), "abort")
        for task in self._tasks:  # stop reading before the sockets close under the reader
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._core.shutdown(timeout, loading=not self.ready)

    async def start_profile(self, out_dir: str | None = None) -> None:
        """torch.profiler on every rank until stop_profile() (LLM.start_profile's twin);
        out_dir defaults to $SHARDSERVE_TORCH_PROFILER_DIR."""
        from shardserve.executor.profiler import profiler_dir
        await self._profile_call(ProfileControl("start", profiler_dir(out_dir)))

    async def stop_profile(self) -> list[dict]:
        """Stop profiling; one summary a rank (trace and kernel-table files, top kernels)."""
        return (await self._profile_call(ProfileControl("stop"))).summaries

    async def _profile_call(self, message: ProfileControl) -> ProfileResult:
        self.check_started()
        if self._profile_future is not None:
            raise RuntimeError("A profiler call is already under way.")
        self._profile_future = asyncio.get_running_loop().create_future()
        try:
            self._send(message)
            result: ProfileResult = await self._profile_future
        finally:
            self._profile_future = None
        if result.error:
            raise RuntimeError(f"Profiler {message.action} failed: {result.error}")
        return result

    @property
    def is_alive(self) -> bool:
        """False once the core process has died (liveness)."""
        return not self.dead

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._states)

    @property
    def num_waiting_requests(self) -> int:
        """Requests sent to the core but not yet scheduled, as this front end knows it."""
        return len(self._unscheduled)

    # ---- requests ----------------------------------------------------------------------------

    def process_prompt(self, prompt: PromptType, truncate_prompt_tokens: int | None = None,
                       add_special_tokens: bool = True) -> ProcessedPrompt:
        """Validate and tokenize (raises InvalidRequestError); before admission, so callers can
        check the prompt against max_tokens themselves."""
        self.check_started()
        return self.input_processor.process_prompt(prompt, truncate_prompt_tokens,
                                                   add_special_tokens)

    async def generate(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs for one prompt until it finishes (the last has finished=True).

        Admission errors (bad input, overload, dead engine) raise on the first iteration,
        before anything is yielded. Closing or cancelling the iteration aborts the request."""
        state = self._add_request(prompt, params, request_id)
        finished = False
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(state.request_id)

    def abort(self, request_id: str) -> None:
        """End a request from the front (client gone); its KV blocks are freed at once."""
        state = self._drop(request_id)
        if state is not None:
            self.stat_logger.record_finished("abort", time.monotonic() - state.arrival_time)

    def _drop(self, request_id: str) -> _RequestState | None:
        """Forget a request and stop it in the core, recording nothing."""
        state = self._forget(request_id)
        if state is None:
            return None
        self.output_processor.abort(state.core_id)
        self._send(AbortRequests(list(state.child_ids)))
        return state

    def abort_all(self, reason: str) -> None:
        """End every request now: each stream gets EngineDeadError(reason) and the core frees
        their blocks (a server told to stop without waiting, e.g. by Ctrl-C). Later requests
        are refused: one admitted by the server an instant before, or a beam search's next
        step, would otherwise run on until the process exits under it."""
        self._stopping = True
        children = [c for state in self._states.values() for c in state.child_ids]
        self._fail_all(EngineDeadError(reason), "abort")
        if children:
            self._send(AbortRequests(children))

    def _add_request(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                     request_id: str | None) -> _RequestState:
        self.check_started()
        processed = (prompt if isinstance(prompt, ProcessedPrompt)
                     else self.process_prompt(prompt, params.truncate_prompt_tokens))
        if self._queue_full():
            self.stat_logger.record_rejected("queue_full")
            raise OverloadedError(
                f"The server is overloaded: {len(self._unscheduled)} requests are already waiting "
                f"(--max-waiting-requests {self.max_waiting_requests}); retry later.")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._states:
            raise InvalidRequestError(f"Request id {request_id!r} is already in use.", "request_id")
        now = time.monotonic()
        # The core knows the request under an id of its own. A client may reuse its id the
        # moment it cancels, while the core's outputs for the old request are still on their
        # way (and the core has not seen the abort yet): under the caller's id those would
        # land on the new request, and the core could hold two requests under one id.
        core_id = f"{request_id}-{next(self._core_seq)}"
        requests = self.input_processor.make_requests(core_id, processed, params, now)
        self.output_processor.add_request(core_id, processed.prompt, requests)
        state = _RequestState(request_id, core_id, [r.request_id for r in requests], now,
                              len(processed.prompt_token_ids), len(requests),
                              requests[0].max_tokens)
        self._states[request_id] = state
        self._by_core[core_id] = state
        self._unscheduled[request_id] = state
        for r in requests:
            self._by_child[r.request_id] = state
            self._send(EngineCoreRequest(r.request_id, r.prompt_token_ids, r.sampling_params,
                                         sorted(r.eos_token_ids), r.arrival_time, r.max_tokens,
                                         r.primary_eos_token_id))
        return state

    def _queue_full(self) -> bool:
        """Whether a new request would make more than --max-waiting-requests wait. Only the
        unscheduled requests beyond the --max-num-seqs slots still free will wait: counting
        them all would turn a burst on an idle engine away with slots to spare (and
        --max-waiting-requests 0 would refuse everything). Counts requests, not their n
        samples: an estimate, as the KV cache may hold requests back too (--max-queue-time
        bounds those)."""
        if self.max_waiting_requests is None:
            return False
        num_running = len(self._states) - len(self._unscheduled)
        free = max(0, self.config.scheduler_config.max_num_seqs - num_running)
        return len(self._unscheduled) >= free + self.max_waiting_requests

    def check_started(self) -> None:
        """Raise unless the engine takes requests: EngineDeadError once it died,
        OverloadedError (503) while it loads or drains."""
        if self.dead:
            raise EngineDeadError(f"The engine is dead ({self.dead_reason}); restart the server.")
        if not self.ready or self._shutting_down or self._stopping:
            self.stat_logger.record_rejected("not_ready")
            raise OverloadedError("The model is still loading or the server is stopping; "
                                  "retry shortly.")

    def _forget(self, request_id: str) -> _RequestState | None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._unscheduled.pop(request_id, None)
            self._by_core.pop(state.core_id, None)
            for child in state.child_ids:
                self._by_child.pop(child, None)
        return state

    def _send(self, message: Any) -> None:
        if not self.dead:
            self._core.send(message)

    # ---- outputs -----------------------------------------------------------------------------

    async def _read_outputs(self) -> None:
        try:
            while True:
                message = await self._core.recv()
                if isinstance(message, CoreStepOutputs):
                    self._handle_step(message)
                elif isinstance(message, CoreReady):
                    if not self._ready_future.done():
                        self._ready_future.set_result(message)
                elif isinstance(message, ProfileResult):
                    if self._profile_future is not None and not self._profile_future.done():
                        self._profile_future.set_result(message)
                elif isinstance(message, CoreFailed):
                    self._core_error = message.message
                    logger.error("Engine core failed: %s\n%s", message.message, message.traceback)
                    # The core ends after saying this, but stopping its ranks can take a
                    # second or more; /health must not stay green (and take requests) meanwhile.
                    self._mark_dead(f"the engine core failed: {message.message}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here would hang every request; fail them instead
            logger.exception("The output reader failed")
            self._mark_dead(f"output reader failed: {type(exc).__name__}: {exc}")

    def _handle_step(self, message: CoreStepOutputs) -> None:
        now = time.monotonic()
        for child_id, scheduled_time in message.scheduled.items():
            state = self._by_child.get(child_id)
            if state is not None and not state.scheduled:
                state.scheduled = True
                state.scheduled_time = scheduled_time
                self._unscheduled.pop(state.request_id, None)
                self.stat_logger.record_scheduled(max(scheduled_time - state.arrival_time, 0.0))
        outputs = []
        for out in message.outputs:
            if out.finish_reason == "error":
                self._fail_request(out.req_id, EngineDeadError(
                    f"The engine failed while serving this request: {out.error}"))
            else:
                outputs.append(out)
        if outputs:
            request_outputs, to_abort = self.output_processor.process_outputs(outputs)
            if to_abort:  # a stop string ended these samples; the core must stop them too
                self._send(AbortRequests(to_abort))
            for ro in request_outputs:
                state = self._by_core.get(ro.request_id)
                if state is not None:
                    ro.request_id = state.request_id
                    self._record_output(state, ro, now)
                    state.queue.put_nowait(ro)
                    if ro.finished:
                        self._forget(ro.request_id)
        if message.num_step_tokens:
            self.stat_logger.record_iteration(message.num_step_tokens)
        if message.stats is not None:
            self.latest_stats = message.stats
            self.stat_logger.record_core_stats(message.stats)

    def _record_output(self, state: _RequestState, ro: RequestOutput, now: float) -> None:
        num_new = sum(len(c.delta_token_ids) for c in ro.outputs)
        if num_new:
            if state.first_token_time is None:
                state.first_token_time = now
                self.stat_logger.record_first_token(now - state.arrival_time, state.num_prompt_tokens)
                self.stat_logger.record_tokens(num_new, None)
            else:
                self.stat_logger.record_tokens(num_new, now - state.last_token_time)
            state.last_token_time = now
        if ro.finished:
            reason = ro.outputs[0].finish_reason or "stop"
            self.stat_logger.record_finished(reason, now - state.arrival_time)
            if reason in ("stop", "length"):
                scheduled = (state.scheduled_time if state.scheduled_time is not None
                             else state.arrival_time)
                # No token at all (echo with max_tokens 0): the prompt was the whole work.
                first = state.first_token_time if state.first_token_time is not None else now
                last = state.last_token_time if state.last_token_time is not None else now
                self.stat_logger.record_request(FinishedRequestStats(
                    state.num_prompt_tokens, sum(len(c.token_ids) for c in ro.outputs),
                    state.n, state.max_tokens, max(first - scheduled, 0.0), last - first))

    def _fail_request(self, child_id: str, error: Exception) -> None:
        state = self._by_child.get(child_id)
        if state is None:
            return
        self._forget(state.request_id)
        self.output_processor.abort(state.core_id, "error")
        state.queue.put_nowait(error)
        self.stat_logger.record_finished("error", time.monotonic() - state.arrival_time)

    def _fail_all(self, error: Exception, finish_reason: str = "error") -> None:
        """End every request with `error`, counted in request_success as finish_reason:
        "error" when the engine died, "abort" when the server stops without waiting."""
        now = time.monotonic()
        for request_id in list(self._states):
            state = self._forget(request_id)
            if state is not None:
                self.output_processor.abort(state.core_id, "error")
                state.queue.put_nowait(error)
                self.stat_logger.record_finished(finish_reason, now - state.arrival_time)

    async def _expire_queued(self) -> None:
        """Turn away requests that waited longer than max_queue_time without being scheduled."""
        limit = self.max_queue_time
        period = min(0.05, limit / 4)
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - limit
            while self._unscheduled:
                state = next(iter(self._unscheduled.values()))
                if state.arrival_time > deadline:
                    break
                # A rejection (num_requests_rejected), not a request that ran and was aborted.
                self._drop(state.request_id)
                self.stat_logger.record_rejected("queue_time")
                state.queue.put_nowait(OverloadedError(
                    f"The server is overloaded: the request waited more than {limit:g} s "
                    "(--max-queue-time) to be scheduled; retry later."))

    # ---- death -------------------------------------------------------------------------------

    def _on_core_exit(self) -> None:
        if not self._shutting_down:
            asyncio.get_running_loop().call_later(_EXIT_GRACE_S, self._after_core_exit)

    def _after_core_exit(self) -> None:
        if self._core.kill_reason and not self._core_error:
            self._mark_dead(f"the engine core process {self._core.kill_reason}")
            return
        reason = self._core_error or f"exit code {self._core.exitcode}"
        self._mark_dead(f"the engine core process exited: {reason}")

    def _mark_dead(self, reason: str) -> None:
        if self.dead or self._shutting_down:
            return
        self.dead = True
        self.dead_reason = reason
        logger.error("Engine is dead: %s", reason)
        error = EngineDeadError(f"The engine is dead ({reason}); restart the server.")
        self._fail_all(error)
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(error)
        if self._profile_future is not None and not self._profile_future.done():
            self._profile_future.set_exception(error)
        if self.on_dead is not None:
            self.on_dead()

