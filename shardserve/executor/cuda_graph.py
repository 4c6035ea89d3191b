"""CUDA graphs for decode steps.

At start-up the model's forward is captured once per batch size on a ladder (1, 2, 4, 8, then
every 8 up to max_cuda_graph_batch_size). A decode-only step (one new token per request) pads
its batch to the next captured size and replays that graph: one launch instead of hundreds,
which is what batch-1 decode needs to approach the memory-bandwidth limit. Prefill and mixed
steps, and batches above the ladder, run eagerly.

Replay reads its inputs from static buffers, so the attention metadata a graph sees must be
tensors at fixed addresses plus host values fixed at capture time: max_seq_len is captured as
max_model_len (the decode kernel skips key partitions past each request's own length).

    static buffers (max_bs rows)        padded rows (beyond the real batch)
    input_ids, positions  [max_bs]      token 0, position 0
    slot_mapping          [max_bs]      -1: the KV write is skipped
    seq_lens              [max_bs]      1: attends to one (garbage) key, output discarded
    block_tables    [max_bs, max_blocks]

Under pipeline parallelism each stage captures its own share: a non-first stage's graph also
reads the hidden states and residual it received (static buffers too), and a non-last stage's
graph writes both instead of final hidden states (the caller stacks them into a fresh tensor
to send, so the next replay may overwrite the buffers).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from shardserve.forward_context import AttentionMetadata, set_forward_context
from shardserve.models.pipeline import IntermediateTensors, StageLayout

logger = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 stage: StageLayout | None = None) -> None:
        self.model = model
        self.is_first = stage is None or stage.is_first
        self.is_last = stage is None or stage.is_last
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.max_model_len = max_model_len
        n = self.max_batch_size
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.output = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        # Pipeline stages: what comes in from the stage before, what goes to the next one.
        hidden = lambda: torch.zeros(n, hidden_size, dtype=dtype, device=device)  # noqa: E731
        self.in_hidden = self.in_residual = self.out_residual = None
        if not self.is_first:
            self.in_hidden, self.in_residual = hidden(), hidden()
        if not self.is_last:
            self.out_residual = hidden()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[self.max_model_len] * bs)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        for bs in reversed(self.sizes):
            md = self._metadata(bs)
            received = None
            if not self.is_first:
                received = IntermediateTensors(self.in_hidden[:bs], self.in_residual[:bs])
            with set_forward_context(md):
                for _ in range(2):  # warm up: Triton autotuning and lazy init stay out of the graph
                    self.model(self.input_ids[:bs], self.positions[:bs], received)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.model(self.input_ids[:bs], self.positions[:bs], received)
                    if self.is_last:
                        self.output[:bs].copy_(out)
                    else:
                        self.output[:bs].copy_(out.hidden_states)
                        self.out_residual[:bs].copy_(out.residual)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        logger.info("Captured %d CUDA graphs (decode batch sizes %d..%d) in %.1f s",
                    len(self.graphs), self.sizes[0], self.max_batch_size, seconds)
        return seconds

    def can_run(self, md: AttentionMetadata, num_tokens: int) -> bool:
        return md.max_query_len == 1 and num_tokens == md.num_reqs and num_tokens <= self.max_batch_size

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
            received: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        n = input_ids.shape[0]
        if received is not None:
            self.in_hidden[:n].copy_(received.hidden_states, non_blocking=True)
            self.in_residual[:n].copy_(received.residual, non_blocking=True)
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(md.seq_lens, non_blocking=True)
        width = md.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(md.block_tables, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        if self.is_last:
            return self.output[:n]
        return IntermediateTensors(self.output[:n], self.out_residual[:n])
