"""The scheduler: no prefill or decode phases. Each step, every request's num_computed_tokens
catches up with its num_tokens under a token budget (max_num_batched_tokens). That one rule
covers chunked prefill, prefix hits, mixed prefill+decode batches and preemption by recompute.

Order is first come, first served: running requests first (in arrival order), then waiting
ones. When blocks run out, the most recently arrived running request is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later (its
full blocks usually survive in the prefix cache, so recomputing is cheap).

Async scheduling (one GPU process): the engine schedules step N+1 before step N's tokens are
back. A request N samples for carries one output placeholder; N+1 runs its next position on it
(the worker takes the token from N's sampled tensor on the device). Limits by length are known
in advance, so a request is not scheduled past max_tokens or max_model_len; only an EOS or a
stop token costs one discarded step. Requests with penalties wait for their token instead
(the penalties read earlier outputs on the host).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from shardserve.config import EngineConfig
from shardserve.engine.kv_cache_manager import KVCacheManager
from shardserve.engine.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput,
                                       NewRequestData, SchedulerOutput)
from shardserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    """A snapshot for metrics; counters are cumulative since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        sc = config.scheduler_config
        self.max_num_seqs = sc.max_num_seqs
        self.max_num_batched_tokens = sc.max_num_batched_tokens
        self.enable_chunked_prefill = sc.enable_chunked_prefill
        self.async_scheduling = bool(sc.async_scheduling)
        self.max_model_len = config.model_config.max_model_len
        self.kv_cache = KVCacheManager(num_blocks, config.cache_config.block_size,
                                       config.cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()  # workers must drop these next step
        self.num_preemptions = 0
        self._step_id = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, stop string found by the detokenizer)."""
        done = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)
            done.append(request)
        return done

    def _free_request(self, request: Request) -> None:
        self.kv_cache.free(request)
        self._finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv_cache.usage,
                              self.kv_cache.stats.queries, self.kv_cache.stats.hits,
                              self.num_preemptions)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self, max_num_reqs: int | None = None) -> SchedulerOutput:
        """The next step. `max_num_reqs` caps the requests in it (pipeline parallelism splits
        the running requests over several micro-batches this way)."""
        budget = self.max_num_batched_tokens
        cap = max_num_reqs if max_num_reqs is not None else self.max_num_seqs
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted_any = False

        # Hot loop (every running request, every step): attributes read once into locals.
        running = self.running
        kv_cache = self.kv_cache
        max_model_len = self.max_model_len
        async_scheduling = self.async_scheduling
        i = 0
        while i < len(running) and budget > 0 and len(num_scheduled) < cap:
            request = running[i]
            pending = request.num_output_placeholders
            computed = request.num_computed_tokens
            num_tokens = request.num_tokens
            num_new = min(num_tokens + pending - computed, budget, max_model_len - computed)
            if num_new <= 0 or (pending and (request.needs_known_tokens
                                             or self._will_finish_by_length(request))):
                i += 1
                continue
            new_blocks = kv_cache.allocate_slots(request, num_new)
            while new_blocks is None:
                victim = running.pop()
                self._preempt(victim)
                preempted_any = True
                if victim is request:
                    break
                new_blocks = kv_cache.allocate_slots(request, num_new)
            if new_blocks is None:
                break
            synced = request.num_synced_tokens
            cached_reqs.append(CachedRequestData(
                request.request_id,
                request.all_token_ids[synced:] if synced < num_tokens else [],
                [b.block_id for b in new_blocks] if new_blocks else [], computed))
            request.num_synced_tokens = num_tokens
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            # Advance now rather than on the step's result, so a pipeline can schedule the next
            # micro-batch before this one returns (a request is in at most one batch at a time).
            # Preemption takes requests from the end of `running`, never one scheduled already.
            request.num_computed_tokens = computed + num_new
            if async_scheduling and computed + num_new == num_tokens + pending:
                request.num_output_placeholders = pending + 1  # this step samples its next token
            i += 1

        # Admit waiting requests only when nothing had to be preempted: otherwise the freed
        # blocks would go straight to newcomers and the preempted request would starve.
        while (self.waiting and budget > 0 and not preempted_any
               and len(self.running) < self.max_num_seqs and len(num_scheduled) < cap):
            request = self.waiting[0]
            hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if not self.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            new_blocks = self.kv_cache.allocate_slots(request, num_new, hit_blocks, num_hit)
            if new_blocks is None:
                break
            self.kv_cache.record_prefix_lookup(request, num_hit)
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            # Outputs of steps before this one belong to an earlier (preempted) run of it.
            request.admitted_step_id = self._step_id
            self.running.append(request)
            new_reqs.append(NewRequestData(
                request.request_id, request.prompt_token_ids, request.output_token_ids,
                request.sampling_params, self.kv_cache.get_block_ids(request.request_id), num_hit,
                sorted(request.eos_token_ids)))
            request.num_synced_tokens = request.num_tokens
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            request.num_computed_tokens = num_hit + num_new
            if (self.async_scheduling and request.num_computed_tokens
                    == request.num_tokens + request.num_output_placeholders):
                request.num_output_placeholders += 1

        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled,
                              sum(num_scheduled.values()), self._finished_req_ids, self._step_id)
        self._finished_req_ids = set()
        self._step_id += 1
        return out

    def _will_finish_by_length(self, request: Request) -> bool:
        """Its tokens in flight take it to max_tokens or max_model_len: no further step."""
        pending = request.num_output_placeholders
        return (request.num_output_tokens + pending >= request.max_tokens
                or request.num_tokens + pending >= self.max_model_len)

    def defer_finished(self, request_ids: Iterable[str]) -> None:
        """Send these finished ids with the next step (an empty step was not sent)."""
        self._finished_req_ids.update(request_ids)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # what is in flight for it is discarded
        request.num_preemptions += 1
        self.num_preemptions += 1
        # The workers drop it and get it whole again (as new) when it is resumed.
        self._finished_req_ids.add(request.request_id)
        request.num_synced_tokens = 0
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append the sampled tokens, apply the stop rules, free finished requests."""
        outputs: list[EngineCoreOutput] = []
        logprobs = runner_output.logprobs
        prompt_logprobs = runner_output.prompt_logprobs
        if prompt_logprobs:
            prompt_logprobs = self._unsent_prompt_logprobs(scheduler_output, prompt_logprobs)
        seen_prompt_lp = set()
        requests = self.requests
        step_id = scheduler_output.step_id
        for idx, (rid, token) in enumerate(zip(runner_output.req_ids, runner_output.sampled_token_ids)):
            request = requests.get(rid)
            if (request is None or request.status != RequestStatus.RUNNING
                    or step_id < request.admitted_step_id):
                # Aborted or preempted while the step ran (with several steps in flight, a
                # preempted request may already be running again from scratch).
                continue
            if request.num_output_placeholders:
                request.num_output_placeholders -= 1
            request.append_output_token(token)
            finished = self._check_stop(request, token)
            out = EngineCoreOutput(rid, [token], num_cached_tokens=max(request.num_cached_tokens, 0))
            if logprobs is not None and request.sampling_params.logprobs is not None:
                out.new_logprobs = [logprobs[idx]]
            if prompt_logprobs and rid in prompt_logprobs:
                out.new_prompt_logprobs = prompt_logprobs[rid]
                seen_prompt_lp.add(rid)
            if finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                self.running.remove(request)
                self._free_request(request)
            outputs.append(out)
        # Prompt chunks that produced no sample still carry prompt logprobs.
        for rid, entries in prompt_logprobs.items():
            if rid not in seen_prompt_lp and rid in self.requests:
                outputs.append(EngineCoreOutput(rid, [], new_prompt_logprobs=entries))
        return outputs

    def _unsent_prompt_logprobs(self, scheduler_output: SchedulerOutput,
                                prompt_logprobs: dict[str, list]) -> dict[str, list]:
        """Drop prompt logprobs of positions sent already: a preempted request recomputes its
        prompt from the start, and its workers score those positions again."""
        starts = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        starts.update((r.req_id, r.num_computed_tokens)
                      for r in scheduler_output.scheduled_cached_reqs)
        unsent = {}
        for rid, entries in prompt_logprobs.items():
            request = self.requests.get(rid)
            if (request is None or rid not in starts or request.status != RequestStatus.RUNNING
                    or scheduler_output.step_id < request.admitted_step_id):
                # As for sampled tokens: gone, preempted, or (with steps in flight) a new
                # request under the id of one aborted while this step ran.
                continue
            start = starts[rid]  # entries[i] scores prompt token start + i + 1
            skip = max(0, request.num_prompt_logprobs_sent - start)
            if skip < len(entries):
                unsent[rid] = entries[skip:]
                request.num_prompt_logprobs_sent = start + len(entries)
        return unsent

    def _check_stop(self, request: Request, token: int) -> bool:
        """Set the finished status the newly appended token gives, if any; True if finished."""
        params = request.sampling_params
        num_outputs = request.num_output_tokens
        # Length first, as vLLM checks it: an EOS or stop token that is also the last token
        # allowed finishes the request as "length" (a stop string there is still "stop": the
        # detokenizer finds it afterwards).
        if num_outputs >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        if num_outputs >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                if token != request.primary_eos_token_id:
                    request.stop_reason = token  # a generation_config EOS: vLLM's stop token
                return True
            if token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return True
        return False

