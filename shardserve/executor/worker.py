"""One Worker per device: sets the device up and drives its ModelRunner."""

from __future__ import annotations

import torch

from shardserve.config import EngineConfig
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.executor.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, local_rank: int = 0) -> None:
        self.config = config
        if config.device_config.device == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(config.model_config.seed)
        self.runner = ModelRunner(config, self.device)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)
