"""Executors run a step on every worker and return the sampling rank's output."""

from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput


class Executor:
    """The interface the engine core sees."""

    def determine_num_blocks(self) -> int: ...
    def init_kv_cache(self, num_blocks: int) -> None: ...
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...
    def check_health(self) -> None: ...

    def shutdown(self, failure: str | None = None) -> None:
        """Stop the workers. `failure`: why, when the engine is stopping because it failed
        (the other nodes of a multi-node world then exit non-zero, not as from a clean stop)."""

    def comm_stats(self) -> dict[str, float]:
        """Communication share of step time and related counters; empty with one process."""
        return {}

    def start_profile(self, out_dir: str) -> None:
        """torch.profiler on every rank until stop_profile (executor/profiler.py)."""
        raise NotImplementedError

    def stop_profile(self) -> list[dict]:
        """Stop every rank's profiler; one summary (files written, top kernels) a rank."""
        raise NotImplementedError

    def pipeline_stats(self) -> dict[str, list[float] | float]:
        """Pipeline parallelism: per-stage busy ratio and seconds (see
        executor/pipeline_stats.py); empty without it."""
        return {}

    @staticmethod
    def create(config: EngineConfig) -> "Executor":
        if config.parallel_config.world_size == 1:
            return UniProcExecutor(config)
        from shardserve.executor.multiproc_executor import MultiprocExecutor
        return MultiprocExecutor(config)


class UniProcExecutor(Executor):
    """One worker in this process."""

    def __init__(self, config: EngineConfig) -> None:
        from shardserve.executor.worker import Worker

        self.worker = Worker(config)
        self.worker.load_model()
        self._seq = 0
        self._pending: dict[int, object] = {}  # seq -> the runner's PendingOutput

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def submit_step(self, scheduler_output: SchedulerOutput) -> int:
        """Launch a step without waiting for its tokens (async scheduling); collect_step(seq)
        waits. Steps run, and must be collected, in order."""
        self._seq += 1
        self._pending[self._seq] = self.worker.runner.execute_model_async(scheduler_output)
        return self._seq

    def collect_step(self, seq: int) -> ModelRunnerOutput:
        return self._pending.pop(seq).get()

    def collective_rpc(self, method: str, args: list | None = None,
                       reply_ranks: list[int] | None = None,
                       timeout_s: float | None = None) -> list:
        """Worker.<method>(*args) on the one worker, as MultiprocExecutor.collective_rpc."""
        return [getattr(self.worker, method)(*(args or []))]

    def start_profile(self, out_dir: str) -> None:
        self.worker.start_profile(out_dir)

    def stop_profile(self) -> list[dict]:
        return [self.worker.stop_profile()]

    def check_health(self) -> None:
        return None

    def shutdown(self, failure: str | None = None) -> None:
        return None
