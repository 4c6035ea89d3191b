"""EngineCore: the loop of schedule -> execute -> update, over token ids only.

It knows nothing of text: the front end (LLMEngine in-process, or the server through a
client) tokenizes, detokenizes and checks stop strings.
"""

from __future__ import annotations

import logging
import time

from shardserve.config import EngineConfig
from shardserve.engine.outputs import EngineCoreOutput
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler, SchedulerStats
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
        self.startup_seconds = {"load": loaded - start, "kv_cache": time.perf_counter() - loaded}
        logger.info("Engine ready: load %.1f s, KV cache %.1f s", *self.startup_seconds.values())

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and not scheduler_output.finished_req_ids:
            return []
        runner_output = self.executor.execute_model(scheduler_output)
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

    def shutdown(self) -> None:
        self.executor.shutdown()
