"""CUDA graphs: decode steps, and steps with prompt tokens ("mixed") of up to a few hundred.

At start-up the model's forward is captured on two ladders (executor/graph_sizes.py):

    decode   one new token per request, by batch size: 1, 2, 4, then every 8 up to
             max_cuda_graph_batch_size (capped by max_num_seqs)
    mixed    prefill chunks, with or without decode rows, by token count: 16, 32, 48, ...
             up to max_cuda_graph_batch_size (capped by max_num_batched_tokens); only where
             every attention layer runs the Triton paged kernels (not MLA), and not with
             mixed_cuda_graphs=False

A step pads to the next captured size of its kind and replays that graph: one launch instead
of hundreds. Eager, a decode step at batch 1 or a 128-token prompt step is bound by those
launches from Python, not by the GPU. Larger steps run eagerly.

Replay reads its inputs from static buffers, so the attention metadata a graph sees must be
tensors at fixed addresses plus host values fixed at capture time: max_seq_len is captured as
max_model_len (the decode kernel skips key partitions past each request's own length).

    static buffers                      decode graph, padded rows    mixed graph, padding
    input_ids, positions  [tokens]      token 0, position 0          stale (finite) values
    slot_mapping          [tokens]      -1: the KV write is skipped  -1
    seq_lens              [rows]        1: attends one garbage key   see below
    block_tables    [rows, max_blocks]  stale rows                   stale rows
    query_start_loc       [rows + 1]    arange (one token each)      mixed_query_start_loc

A mixed graph for T tokens has rows for every request a step of T tokens can hold, plus one:
the real requests come first, then the padding tokens replay as one more request (a prompt
of T - n tokens over stale block-table entries, never written to the cache: its output is
finite and discarded), then empty requests (no tokens, seq_len 0) that both attention
kernels skip. Both kernels are captured: the prefill kernel takes the requests of 2+ tokens,
the split-K decode kernel those of one.

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

from shardserve.executor.graph_sizes import (decode_capture_sizes, mixed_capture_sizes,
                                             mixed_rows)
from shardserve.forward_context import AttentionMetadata, set_forward_context
from shardserve.models.pipeline import IntermediateTensors, StageLayout

logger = logging.getLogger(__name__)

# A mixed graph's decode kernel splits each row's keys as if the step had this many decode
# rows. Its split count is fixed at capture, and sizing it for all of the graph's rows (up to
# max_num_seqs) gave one split: a long-context decode beside a new prompt then read its whole
# context with one program per KV head. Measured on an H200 (benchmarks/mixed_step.py, 8B
# shape, a 127-token prompt joining): 4 rows' worth (17 splits of 8 KV heads) adds 3.4 ms to
# a step with one row at 32K context against 4.9 ms for 8 rows' worth, and the same within
# noise at 8 rows x 8K and 64 rows x 2K; 2 rows' worth gains little more at 32K and costs
# 0.4 ms at 64 rows. More splits than a row needs cost only partial outputs of the keys it has
# (partitions are at least MIN_PARTITION keys) and idle programs.
MIXED_GRAPH_SPLIT_ROWS = 4


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_model_len: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 stage: StageLayout | None = None, max_mixed_tokens: int = 0,
                 max_num_seqs: int | None = None) -> None:
        """max_mixed_tokens: the largest step with prompt tokens to capture (0: none);
        max_num_seqs: the most requests such a step holds (default max_batch_size)."""
        self.model = model
        self.is_first = stage is None or stage.is_first
        self.is_last = stage is None or stage.is_last
        self.sizes = decode_capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs or max_batch_size
        self.mixed_sizes = mixed_capture_sizes(max_mixed_tokens, max_model_len, self.max_num_seqs)
        tokens = max([self.max_batch_size] + self.mixed_sizes)
        rows = max([self.max_batch_size] + [mixed_rows(t, self.max_num_seqs)
                                            for t in self.mixed_sizes])
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        # Decode graphs: one token per request, fixed. Mixed graphs: written every replay.
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.mixed_query_start_loc = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.output = torch.zeros(tokens, hidden_size, dtype=dtype, device=device)
        # Pipeline stages: what comes in from the stage before, what goes to the next one.
        hidden = lambda: torch.zeros(tokens, hidden_size, dtype=dtype, device=device)  # noqa: E731
        self.in_hidden = self.in_residual = self.out_residual = None
        if not self.is_first:
            self.in_hidden, self.in_residual = hidden(), hidden()
        if not self.is_last:
            self.out_residual = hidden()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.replays = {"decode": 0, "mixed": 0}  # steps replayed, by kind (tests, benchmarks)

    def _metadata(self, bs: int) -> AttentionMetadata:
        """A capture-time decode step of bs rows (a mixed capture may have left other values)."""
        self.seq_lens[:bs].fill_(1)
        self.slot_mapping[:bs].fill_(-1)
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[self.max_model_len] * bs)

    def _mixed_metadata(self, tokens: int, write: bool = True) -> AttentionMetadata:
        """A capture-time step of `tokens` tokens that launches both attention kernels: one
        prompt of tokens - 1, one decode row, then empty requests. Only the host values are
        fixed by the graph; replays write the device buffers (_stage_inputs). write=False:
        the same metadata over what the buffers hold now (tests read a replay's view)."""
        rows = mixed_rows(tokens, self.max_num_seqs)
        starts = [0, tokens - 1] + [tokens] * (rows - 1)
        lens = [tokens - 1, 1] + [0] * (rows - 2)
        if write:
            self.mixed_query_start_loc[:rows + 1].copy_(torch.tensor(starts, dtype=torch.int32))
            self.seq_lens[:rows].copy_(torch.tensor(lens, dtype=torch.int32))
            self.slot_mapping[:tokens].fill_(-1)
        return AttentionMetadata(
            query_start_loc=self.mixed_query_start_loc[:rows + 1], seq_lens=self.seq_lens[:rows],
            block_tables=self.block_tables[:rows], slot_mapping=self.slot_mapping[:tokens],
            max_query_len=tokens - 1, max_seq_len=self.max_model_len,
            query_start_loc_cpu=starts, seq_lens_cpu=lens,
            decode_split_rows=min(rows, MIXED_GRAPH_SPLIT_ROWS))

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size of both kinds, largest first so smaller graphs reuse the memory
        pool of the largest (a mixed graph before a decode graph of as many tokens: it also
        holds the prefill kernel's work)."""
        start = time.perf_counter()
        order = sorted([(t, True) for t in self.mixed_sizes] + [(bs, False) for bs in self.sizes],
                       reverse=True)
        for tokens, mixed in order:
            md = self._mixed_metadata(tokens) if mixed else self._metadata(tokens)
            graph = self._capture_one(tokens, md)
            (self.mixed_graphs if mixed else self.graphs)[tokens] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        mixed = (f"; steps with prompt tokens {self.mixed_sizes[0]}..{self.mixed_sizes[-1]} "
                 f"tokens" if self.mixed_sizes else "")
        logger.info("Captured %d CUDA graphs (decode batch sizes %d..%d%s) in %.1f s",
                    len(self.graphs) + len(self.mixed_graphs), self.sizes[0],
                    self.max_batch_size, mixed, seconds)
        return seconds

    def _capture_one(self, n: int, md: AttentionMetadata) -> torch.cuda.CUDAGraph:
        received = None
        if not self.is_first:
            received = IntermediateTensors(self.in_hidden[:n], self.in_residual[:n])
        with set_forward_context(md):
            for _ in range(2):  # warm up: Triton autotuning and lazy init stay out of the graph
                self.model(self.input_ids[:n], self.positions[:n], received)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(self.input_ids[:n], self.positions[:n], received)
                if self.is_last:
                    self.output[:n].copy_(out)
                else:
                    self.output[:n].copy_(out.hidden_states)
                    self.out_residual[:n].copy_(out.residual)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def _pick(self, md: AttentionMetadata, num_tokens: int) -> tuple[bool, int] | None:
        """The graph a step replays, (mixed, captured size), or None: it runs eagerly."""
        if md.max_query_len == 1 and num_tokens == md.num_reqs:
            i = bisect.bisect_left(self.sizes, num_tokens)
            return (False, self.sizes[i]) if i < len(self.sizes) else None
        i = bisect.bisect_left(self.mixed_sizes, num_tokens)
        if i == len(self.mixed_sizes):
            return None
        tokens = self.mixed_sizes[i]
        # Room for the real requests and the padding's own row (always, by mixed_rows).
        return (True, tokens) if md.num_reqs < mixed_rows(tokens, self.max_num_seqs) else None

    def can_run(self, md: AttentionMetadata, num_tokens: int) -> bool:
        return self._pick(md, num_tokens) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
            received: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        n = input_ids.shape[0]
        mixed, size = self._stage_inputs(input_ids, positions, md, received)
        (self.mixed_graphs if mixed else self.graphs)[size].replay()
        self.replays["mixed" if mixed else "decode"] += 1
        if self.is_last:
            return self.output[:n]
        return IntermediateTensors(self.output[:n], self.out_residual[:n])

    def _stage_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      md: AttentionMetadata, received: IntermediateTensors | None
                      ) -> tuple[bool, int]:
        """Copy the step into the static buffers, padded for the graph it replays ->
        (mixed, captured size)."""
        n = input_ids.shape[0]
        if received is not None:
            self.in_hidden[:n].copy_(received.hidden_states, non_blocking=True)
            self.in_residual[:n].copy_(received.residual, non_blocking=True)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(md.slot_mapping, non_blocking=True)
        reqs = md.num_reqs
        self.seq_lens[:reqs].copy_(md.seq_lens, non_blocking=True)
        width = md.block_tables.shape[1]
        self.block_tables[:reqs, :width].copy_(md.block_tables, non_blocking=True)
        mixed, size = self._pick(md, n)
        if not mixed:
            if size > n:
                self.slot_mapping[n:size].fill_(-1)
                self.seq_lens[n:size].fill_(1)
            return False, size
        tokens = size
        rows = mixed_rows(tokens, self.max_num_seqs)
        self.mixed_query_start_loc[:reqs + 1].copy_(md.query_start_loc, non_blocking=True)
        # The padding request (tokens n..T, maybe none) ends at T, and the empty ones after it.
        self.mixed_query_start_loc[reqs + 1:rows + 1].fill_(tokens)
        self.seq_lens[reqs].fill_(tokens - n)
        self.seq_lens[reqs + 1:rows].fill_(0)
        if tokens > n:
            self.slot_mapping[n:tokens].fill_(-1)
        return True, tokens
