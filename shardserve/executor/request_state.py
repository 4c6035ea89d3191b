"""What a worker remembers about each request between steps (it only receives diffs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shardserve.engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from shardserve.executor.block_table import BlockTable
from shardserve.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    num_prompt_tokens: int
    token_ids: list[int]  # prompt + outputs known so far
    sampling_params: SamplingParams
    block_row: int  # its row of RequestStates.block_table
    num_computed_tokens: int
    eos_token_ids: list[int]
    generator: torch.Generator | None = None  # per-request seed: same output in any batch

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class RequestStates:
    """The worker's table of live requests, updated from each SchedulerOutput."""

    device: torch.device
    states: dict[str, CachedRequestState] = field(default_factory=dict)
    vocab_size: int = 0  # the sampler's row width: what one seeded draw consumes
    block_table: BlockTable = field(default_factory=BlockTable)

    def update(self, out: SchedulerOutput) -> None:
        for rid in out.finished_req_ids:
            self._remove(rid)
        for new in out.scheduled_new_reqs:
            self._add(new)
        for cached in out.scheduled_cached_reqs:
            self._advance(cached)

    def _add(self, new: NewRequestData) -> None:
        params = new.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
            if new.output_token_ids:
                # Resumed after preemption: replay the draws its earlier tokens took, so the
                # rest of its tokens are the ones an uninterrupted run would sample.
                from shardserve.layers.sampler import advance_generator
                advance_generator(generator, len(new.output_token_ids), self.vocab_size,
                                  self.device)
        self._remove(new.req_id)  # not expected: the scheduler drops it first
        self.states[new.req_id] = CachedRequestState(
            new.req_id, len(new.prompt_token_ids), new.prompt_token_ids + new.output_token_ids,
            params, self.block_table.add(new.block_ids), new.num_computed_tokens,
            list(new.eos_token_ids), generator)

    def _advance(self, cached: CachedRequestData) -> None:
        state = self.states[cached.req_id]
        if cached.new_token_ids:
            state.token_ids.extend(cached.new_token_ids)
        if cached.new_block_ids:
            self.block_table.append(state.block_row, cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens

    def _remove(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self.block_table.free(state.block_row)
