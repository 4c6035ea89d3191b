"""EngineCore: the loop of schedule -> execute -> update, over token ids only.

It knows nothing of text: the front end (LLMEngine in-process, or the server through a
client) tokenizes, detokenizes and checks stop strings.

Under pipeline parallelism (P stages) `step` keeps up to P micro-batches in flight (vLLM v1's
step_with_batch_queue): it schedules a new batch while earlier ones are still in the pipeline
and blocks for the oldest only when the queue is full or nothing more can be scheduled. The
scheduler advances num_computed_tokens at schedule time, so a request whose step is in flight
is not scheduled again (a request is in at most one micro-batch, except the chunks of one
prompt, which every stage runs in order), and each micro-batch takes at most 1/P of the
requests, so decode batches spread over the pipeline. Results are applied oldest first.

    time ──▶      stage 0   stage 1   stage 2
                  [ mb1 ]
                  [ mb2 ]   [ mb1 ]
                  [ mb3 ]   [ mb2 ]   [ mb1 ]   ← steady state: no stage waits
                  [ mb4 ]   [ mb3 ]   [ mb2 ]   (mb4 scheduled once mb1's tokens are back)

Async scheduling (one GPU process) uses the same queue with two steps in flight: while the
GPU runs step N, the host schedules step N+1, builds its inputs and launches it, and only then
waits for N's tokens. Unlike micro-batches, consecutive steps hold the same requests (see the
scheduler's output placeholders), so the batch is not split.

    host    [sched N+1 | inputs | launch][wait N][update N][sched N+2 | ... ]
    GPU     [        step N        ][        step N+1       ][   step N+2 ...
"""

from __future__ import annotations

import atexit
import gc
import logging
import time
from collections import deque

from shardserve.config import EngineConfig
from shardserve.engine.outputs import EngineCoreOutput, SchedulerOutput
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler, SchedulerStats
from shardserve.errors import EngineDeadError
from shardserve.executor.executor import Executor

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.perf_counter()
        self.executor = Executor.create(config)
        loaded = time.perf_counter()
        num_blocks = self.executor.determine_num_blocks()
        self.executor.init_kv_cache(num_blocks)
        config.cache_config.num_blocks = num_blocks
        self.scheduler = Scheduler(config, num_blocks)
        # Pipeline parallelism: (step seq, its SchedulerOutput) of the micro-batches in flight;
        # async scheduling: the step on the GPU and the one being prepared.
        self.num_micro_batches = config.parallel_config.pipeline_parallel_size
        self.async_scheduling = bool(config.scheduler_config.async_scheduling)
        self.max_in_flight = 2 if self.async_scheduling else self.num_micro_batches
        self._batch_queue: deque[tuple[int, SchedulerOutput]] = deque()
        self.num_overlapped_steps = 0  # submitted while another step was in flight
        self._profiling = False
        # Tokens the model computed in the step whose outputs step() returned last (0: none
        # came back), for the iteration_tokens_total histogram.
        self.num_step_tokens = 0
        self.startup_seconds = {"load": loaded - start, "kv_cache": time.perf_counter() - loaded}
        logger.info("Engine ready: load %.1f s, KV cache %.1f s", *self.startup_seconds.values())
        freeze_startup_heap()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._batch_queue)

    def step(self) -> list[EngineCoreOutput]:
        self.num_step_tokens = 0
        if self.max_in_flight > 1:
            return self.step_with_batch_queue()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and not scheduler_output.finished_req_ids:
            return []
        runner_output = self.executor.execute_model(scheduler_output)
        self.num_step_tokens = scheduler_output.total_num_scheduled_tokens
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def step_with_batch_queue(self) -> list[EngineCoreOutput]:
        """Submit a new micro-batch if fewer than P are in flight; collect the oldest when the
        pipeline is full or nothing new could be scheduled (see the module doc). Returns []
        while the pipeline fills."""
        try:
            return self._step_with_batch_queue()
        except EngineDeadError:
            self._batch_queue.clear()  # nothing in flight will come back
            raise

    def _step_with_batch_queue(self) -> list[EngineCoreOutput]:
        queue = self._batch_queue
        scheduled = False
        if len(queue) < self.max_in_flight:
            # Split the requests over the micro-batches, so each stage has work in every one
            # (otherwise one batch would take every request and the others stay empty).
            cap = None
            if self.num_micro_batches > 1:
                num_reqs = len(self.scheduler.running) + len(self.scheduler.waiting)
                cap = max(1, -(-num_reqs // self.num_micro_batches))
            scheduler_output = self.scheduler.schedule(cap)
            if scheduler_output.is_empty:
                # Nothing to run: the ids of finished requests ride on the next real step
                # instead of taking a pipeline slot (the workers drop them before adding).
                self.scheduler.defer_finished(scheduler_output.finished_req_ids)
            else:
                self.num_overlapped_steps += bool(queue)
                queue.append((self.executor.submit_step(scheduler_output), scheduler_output))
                scheduled = True
        if not queue or (scheduled and len(queue) < self.max_in_flight):
            return []
        seq, scheduler_output = queue.popleft()
        runner_output = self.executor.collect_step(seq)
        self.num_step_tokens = scheduler_output.total_num_scheduled_tokens
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def parallel_stats(self) -> dict[str, float]:
        """Flat numbers from the executor for /metrics: TP communication share, per-stage
        pipeline busy ratios (key_i for stage i); empty for one process."""
        out: dict[str, float] = {}
        for name in ("comm_stats", "pipeline_stats"):
            getter = getattr(self.executor, name, None)
            for key, value in (getter() if getter else {}).items():
                if isinstance(value, (list, tuple)):
                    out.update({f"{key}_{i}": float(v) for i, v in enumerate(value)})
                elif isinstance(value, (int, float)):
                    out[key] = float(value)
        return out

    def start_profile(self, out_dir: str) -> None:
        """torch.profiler on every rank until stop_profile (executor/profiler.py). Misuse is
        refused here, before a rank could fail on it (a failing rank ends the engine)."""
        if self._profiling:
            raise RuntimeError("Already profiling; call stop_profile first.")
        self.executor.start_profile(out_dir)
        self._profiling = True

    def stop_profile(self) -> list[dict]:
        """Stop profiling; one summary a rank (its trace and kernel-table files, top kernels)."""
        if not self._profiling:
            raise RuntimeError("Not profiling; call start_profile first.")
        self._profiling = False
        return self.executor.stop_profile()

    def shutdown(self, failure: str | None = None) -> None:
        """`failure`: why, when the core stops because it failed (see Executor.shutdown)."""
        self.executor.shutdown(failure)


def freeze_startup_heap() -> None:
    """Move everything alive now (torch, the model, the tokenizer: the bulk of the heap) out of
    the cycle collector's reach. A full collection otherwise walks all of it, 0.1-0.3 s, a few
    times per thousand decode steps (about 1 ms per step at batch 256). Unfreezing first lets
    garbage from engines made earlier in this process (tests) be collected, not frozen; at
    exit everything is unfrozen again, so the interpreter's last collection finalizes it (native
    extensions report what is left as leaks)."""
    global _unfreeze_at_exit
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_unfreeze_at_exit = False
