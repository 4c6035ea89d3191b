"""One Worker per device: sets the device up and drives its ModelRunner.

The same class serves one process (UniProcExecutor) and each rank of a TP/PP world (a worker
process, executor/worker_proc.py); in a world, torch.distributed and the model-parallel groups
are set up before the Worker is built, so its layers shard themselves for their rank.
"""

from __future__ import annotations

import logging
import time

import torch

from shardserve.config import EngineConfig
from shardserve.distributed.comm_timer import CommTimer
from shardserve.distributed.parallel_state import get_pp_group, get_tp_group, get_world_group
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.model_runner import ModelRunner
from shardserve.executor.profiler import RankProfiler

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, local_rank: int = 0, is_driver: bool = True) -> None:
        self.config = config
        if config.device_config.device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(config.model_config.seed)
        self.is_driver = is_driver
        self.runner = ModelRunner(config, self.device, is_driver=is_driver)
        self.comm_timer: CommTimer | None = None
        self.profiler: RankProfiler | None = None

    def start_profile(self, out_dir: str) -> None:
        """Record this rank with torch.profiler until stop_profile (executor/profiler.py)."""
        if self.profiler is None:
            self.profiler = RankProfiler(get_world_group().rank, self.device)
        self.profiler.start(out_dir)

    def stop_profile(self) -> dict:
        """Stop recording; write this rank's trace and kernel table; return their summary."""
        if self.profiler is None:
            raise RuntimeError("This rank is not profiling; call start_profile first.")
        return self.profiler.stop()

    def load_model(self) -> None:
        self.runner.load_model()

    def live_request_ids(self) -> list[str]:
        """The requests this rank still holds state (and a block-table row) for: every one
        the scheduler has finished, aborted or preempted is gone after the next step."""
        return sorted(self.runner.states.states)

    def prompt_logits(self, token_ids: list[int]) -> list | None:
        """Every position's full-vocabulary logits for one prompt, computed outside the KV
        cache, as [shape, float32 bytes] on the TP group's first rank (None on the others):
        for checking layouts against each other (benchmarks/tp_logits.py). Every rank must
        run it (the layers' collectives); pipeline parallelism is not supported."""
        from shardserve.forward_context import set_forward_context
        if get_pp_group().world_size > 1:
            raise ValueError("prompt_logits needs pipeline_parallel_size 1")
        model = self.runner.model
        with torch.inference_mode(), set_forward_context(None):
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            hidden = model(ids, torch.arange(len(token_ids), device=self.device))
            logits = model.compute_logits(hidden, gather_all=False)
        if logits is None:
            return None
        logits = logits.float().cpu().contiguous()
        return [list(logits.shape), logits.numpy().tobytes()]

    def warm_up_communication(self) -> None:
        """Run each TP collective once, so NCCL creates its communicators now: a first
        collective inside a CUDA-graph capture would fail (communicator set-up may not run
        while a stream is capturing), and the first timed step would pay for the set-up."""
        tp, pp = get_tp_group(), get_pp_group()
        if tp.world_size == 1 and pp.world_size == 1:
            return
        x = torch.zeros(1, 8, device=self.device, dtype=self.config.model_config.torch_dtype)
        if tp.world_size > 1:
            tp.all_reduce(x)
            tp.gather(x, 0, dim=-1)
            tp.all_gather(x, dim=-1)
        if pp.world_size > 1:  # the stage-to-stage links, in pipeline order
            if not pp.is_first_rank:
                pp.recv_tensor(tuple(x.shape), x.dtype, self.device)
            if not pp.is_last_rank:
                pp.send_tensor(x).wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def determine_num_blocks(self) -> int:
        """The blocks every rank can hold: each rank profiles its own memory, then all agree
        on the minimum (all_reduce MIN on the world's CPU group)."""
        own = self.runner.profile_num_blocks()
        world = get_world_group()
        num_blocks = world.all_reduce_int(own, "min")
        if world.world_size > 1:
            info = self.runner.kv_cache_info()
            logger.info("Rank %d KV cache: %d KV heads x %d dims per layer (tp_size %d), %d "
                        "bytes per block; %d blocks fit here, %d on the tightest rank",
                        world.rank, info["num_kv_heads"], info["head_size"],
                        get_tp_group().world_size, info["bytes_per_block"], own, num_blocks)
        return self.runner.check_num_blocks(num_blocks)

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def kv_cache_info(self) -> dict[str, int]:
        return self.runner.kv_cache_info()

    def sampling_counts(self) -> dict[str, int]:
        """This rank's sampled steps by path (ModelRunner.sampling_counts)."""
        return dict(self.runner.sampling_counts)

    def enable_comm_timing(self) -> None:
        """Time this rank's TP collectives (the driver does, for the communication share)."""
        self.comm_timer = CommTimer(self.device)
        get_tp_group().enable_comm_timer(self.comm_timer)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async_timed(self, scheduler_output: SchedulerOutput) -> "TimedPending":
        """Queue the step (async scheduling) and return at once; .get() waits for its tokens
        and gives what execute_model_timed does (step seconds: launch to tokens back)."""
        start = time.perf_counter()
        pending = self.runner.execute_model_async(scheduler_output)
        comm = self.comm_timer.detach() if self.comm_timer else ([], 0.0, 0)
        return TimedPending(pending, start, comm)

    def execute_model_timed(self, scheduler_output: SchedulerOutput
                            ) -> tuple[ModelRunnerOutput, float, float, int]:
        """(output, step seconds, seconds in TP collectives, number of them)."""
        start = time.perf_counter()
        out = self.runner.execute_model(scheduler_output)
        comm_s, num_comm = self.comm_timer.collect() if self.comm_timer else (0.0, 0)
        return out, time.perf_counter() - start, comm_s, num_comm


class TimedPending:
    def __init__(self, pending, start: float, comm) -> None:
        self.pending, self.start, self.comm = pending, start, comm

    def ready(self) -> bool:
        return self.pending.ready()

    def get(self) -> tuple[ModelRunnerOutput, float, float, int]:
        out = self.pending.get()
        comm_s, num_comm = CommTimer.resolve(self.comm)
        return out, time.perf_counter() - self.start, comm_s, num_comm
