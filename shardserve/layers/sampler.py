"""Batched sampling: logits [R, V] of the rows that finish a step -> one token id per row.

Order (vLLM's):

    raw logits ─▶ log_softmax ─▶ logprobs (sampled token + top-k, ranks)      only if asked
        │
        ├─ allowed_token_ids: every other id -> -inf
        ├─ banned this step: EOS / stop ids (min_tokens), bad words' last tokens -> -inf
        ├─ logit_bias: added per (row, token id)
        ├─ repetition penalty (prompt + output tokens), frequency + presence (output tokens)
        ├─ greedy rows: argmax
        └─ random rows: / temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ softmax ─▶ argmax(p / q)

`q ~ Exp(1)` makes argmax(p / q) an exact draw from p (the "exponential race") without a
cumulative sum, and lets a seeded row draw its noise from its own generator: its tokens then
depend only on its seed, never on what else is in the batch.

On a GPU, plain temperature sampling (no seeded row, no top-k/top-p/min-p; greedy rows mixed
in) skips all of that and runs kernels/sampling.py: the same race in one pass over the logits.
Greedy batches on a GPU take that kernel's argmax too (a single row's vocabulary split over
many programs, where torch's argmax reduces it in one).

Under tensor parallelism such batches are sampled from the LM head's vocabulary shards where
they are (`sample_vocab_shards`): each rank keys its own shard's best token and one all-reduce
MAX of the keys gives every rank the winner. The logits are never gathered, and no rank waits
for another's choice to be broadcast. `vocab_parallel_ok` says which batches qualify; it reads
only the requests' SamplingParams, which every rank holds alike, so all ranks take the same
path (one rank in the gather and another in the all-reduce would wait forever).

Everything stays on the logits' device; the only device-to-host copy is the logprobs at the end
(the caller copies the sampled ids), so a CUDA step needs no per-request synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shardserve.engine.outputs import TokenLogprobs
from shardserve.layers.sampling_metadata import SamplingMetadata
from shardserve.sampling_params import SamplingParams

@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [R] int64, on the logits' device
    # One per row when any row asked (rows that did not ask get only their sampled token).
    logprobs: list[TokenLogprobs] | None = None
    # The host copy made alongside the logprobs, so tolist() need not copy again.
    _host_token_ids: list[int] | None = field(default=None, repr=False)

    def tolist(self) -> list[int]:
        if self._host_token_ids is None:
            self._host_token_ids = self.sampled_token_ids.tolist()
        return self._host_token_ids


class Sampler(nn.Module):
    """Picks one token per row. May modify `logits` in place (the caller's tensor is consumed).

    `generator` (on the logits' device) draws the noise of rows without a seed of their own;
    None: torch's default generator. The engine passes its own, seeded with its seed, so what
    it samples does not depend on who else draws from the process's default generator (the
    caller of an in-process LLM, another engine, a GEMV autotune)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        md = metadata
        # Logprobs describe the model, not the sampling settings: raw logits, before anything.
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        if (md.allowed_rows is not None or md.banned_rows is not None
                or md.logit_bias_rows is not None or not md.no_penalties):
            logits = logits.float()
            if md.allowed_rows is not None:
                logits[md.allowed_rows] = logits[md.allowed_rows].masked_fill_(md.allowed_mask,
                                                                               -math.inf)
            if md.banned_rows is not None:
                logits[md.banned_rows, md.banned_token_ids] = -math.inf
            if md.logit_bias_rows is not None:
                logits.index_put_((md.logit_bias_rows, md.logit_bias_token_ids),
                                  md.logit_bias_values, accumulate=True)
            if not md.no_penalties:
                logits = apply_penalties(logits, md)

        # Greedy and the one-pass kernel read the logits in their own dtype (argmax of a
        # half-precision row is that of its float32 copy); the torch race needs float32.
        if md.all_greedy:
            sampled = _argmax(logits)
        elif _fused_sampling(logits, md):
            sampled = _fused_sample(logits, md, self.generator)
        elif md.all_random:
            sampled = self._sample_random(logits.float(), md)
        else:
            logits = logits.float()
            # Before the random path, which edits logits in place.
            greedy_ids = logits.argmax(dim=-1)
            sampled = torch.where(md.greedy_mask, greedy_ids, self._sample_random(logits, md))
        if raw_logprobs is None:
            return SamplerOutput(sampled)
        entries, host_ids = _logprob_entries(raw_logprobs, sampled, md.max_num_logprobs,
                                             md.num_logprobs)
        return SamplerOutput(sampled, entries, host_ids)

    def _sample_random(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        logits = logits.div_(md.temperature.unsqueeze(1))
        if not md.no_top_p_top_k:
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p)
        if not md.no_min_p:
            logits = apply_min_p(logits, md.min_p)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs)
        if len(md.generators) < probs.shape[0]:
            q.exponential_(generator=self.generator)
        for row, generator in md.generators.items():
            # One draw of V numbers per step: the generator advances the same in any batch.
            q[row].exponential_(generator=generator)
        # exponential_ may return exactly 0 (p / 0 = inf, 0 / 0 = nan would win the argmax).
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    if logits.is_cuda:
        from shardserve.kernels.sampling import argmax
        return argmax(logits)
    return logits.argmax(dim=-1)


def vocab_parallel_ok(params_list: Sequence[SamplingParams], on_gpu: bool,
                      vocab_size: int) -> bool:
    """Whether a batch of rows with these params can be sampled from vocabulary shards
    (`sample_vocab_shards`): nothing that needs the whole row of logits (logprobs, allowed
    ids, logit bias, penalties, min_tokens, bad words) and, on a GPU, plain or greedy
    temperature sampling as kernels/sampling.py draws it (no seed, top-k, top-p or min-p); on
    a CPU greedy rows only. A function of the params alone: every rank answers alike."""
    if not params_list:
        return False
    any_random = False
    for p in params_list:
        if (p.logprobs is not None or p.allowed_token_ids or p.logit_bias
                or p.min_tokens > 0 or p._bad_words_token_ids or p.bad_words
                or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                or p.repetition_penalty != 1.0):
            return False
        if not p.greedy and not (on_gpu and p.seed is None and p.top_p >= 1.0
                                 and p.top_k <= 0 and p.min_p <= 0.0):
            return False
        any_random = any_random or not p.greedy
    if any_random:
        from shardserve.kernels.sampling import fits
        return fits(len(params_list), vocab_size)
    return True


def sample_vocab_shards(shard: torch.Tensor, vocab_start: int, vocab_size: int, num_valid: int,
                        md: SamplingMetadata, group,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [R] (int64), the same on every rank of `group`, for a batch that
    `vocab_parallel_ok` accepted: shard [R, >= num_valid] holds this rank's logits of tokens
    [vocab_start, vocab_start + num_valid) of vocab_size; the ranks' shards tile the
    vocabulary. Greedy rows get the argmax over the whole vocabulary and random rows an exact
    draw, as `Sampler` would give from the gathered logits."""
    if shard.is_cuda:
        from shardserve.kernels.sampling import keys_to_ids, sample_keys
        if md.all_greedy:
            keys = sample_keys(shard, None, None, None, vocab_start, vocab_size, num_valid)
        else:
            keys = sample_keys(shard, md.temperature, md.greedy_mask,
                               _device_seed(shard.device, generator),
                               vocab_start, vocab_size, num_valid)
        return keys_to_ids(group.all_reduce_max(keys))
    from shardserve.kernels.sampling import NO_KEY, pack_keys, unpack_ids
    assert md.all_greedy, "on a CPU only greedy batches are sampled from shards"
    if num_valid:
        best, index = shard[:, :num_valid].max(dim=-1)  # the first of equal maxima, as argmax
        keys = pack_keys(best, index + vocab_start)
    else:  # a shard of padding only (a tiny vocabulary over many ranks)
        keys = torch.full((shard.shape[0],), NO_KEY, dtype=torch.int64)
    keys = group.all_reduce_max(keys)
    return unpack_ids(keys)


def _fused_sampling(logits: torch.Tensor, md: SamplingMetadata) -> bool:
    """Whether kernels/sampling.py can draw this batch in one pass: on a GPU, plain
    temperature sampling (greedy rows mixed in), no seeded request (a seeded row's draws come
    from its own torch generator, `_sample_random`), no top-k, top-p or min-p."""
    if not (logits.is_cuda and not md.generators and md.no_top_p_top_k and md.no_min_p):
        return False
    from shardserve.kernels.sampling import fits
    return fits(*logits.shape)


def _fused_sample(logits: torch.Tensor, md: SamplingMetadata,
                  generator: torch.Generator | None) -> torch.Tensor:
    from shardserve.kernels.sampling import sample

    return sample(logits, md.temperature, md.greedy_mask, _device_seed(logits.device, generator))


def _device_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """The kernels' Philox seed for one step: drawn from `generator` (the engine's, seeded
    with its seed; None: the device's default one), on the device, so no host sync."""
    return torch.randint(2**31 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def advance_generator(generator: torch.Generator, num_steps: int, vocab_size: int,
                      device: torch.device | str) -> None:
    """Move a seeded row's generator past `num_steps` sampling steps: the same draws as
    `_sample_random` makes (one exponential_ over a float32 row of vocab_size per step), since
    how far one call moves a generator depends on its size and, on CUDA, its launch shape."""
    row = torch.empty(vocab_size, dtype=torch.float32, device=device)
    for _ in range(num_steps):
        row.exponential_(generator=generator)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF/vLLM: prompt + output tokens; positive logits divided, negative
    multiplied) then frequency and presence (OpenAI: output tokens, subtracted)."""
    num_rows, vocab_size = logits.shape
    assert md.output_token_ids is not None
    # One spare column takes the padding (id == vocab_size) and is dropped.
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, md.output_token_ids, torch.ones_like(md.output_token_ids, dtype=logits.dtype))
    counts = counts[:, :vocab_size]
    seen = counts > 0
    if md.prompt_token_ids is not None:
        in_prompt = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, md.prompt_token_ids, True)
        rep = md.repetition_penalties.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen | in_prompt[:, :vocab_size], penalized, logits)
    logits = logits - md.frequency_penalties.unsqueeze(1) * counts
    return logits - md.presence_penalties.unsqueeze(1) * seen.to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set everything outside each row's top-k and top-p nucleus to -inf (top_k 0 and top_p 1
    are no-ops). The nucleus always keeps the most likely token."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    # The k-th largest value; ties with it stay in.
    kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth, -math.inf)
    probs_sorted = sorted_logits.softmax(dim=-1)
    # Ascending order: drop the low tail whose total mass is at most 1 - p.
    tail_mass = probs_sorted.cumsum(dim=-1)
    drop = tail_mass <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, -math.inf)
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max. In logit space, no softmax needed:
    p_i / p_max = exp(l_i - l_max)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, -math.inf)


def compute_prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor,
                            num_logprobs: int) -> list[TokenLogprobs]:
    """Logprobs of each prompt position's actual next token (with its rank), then the top-k;
    log-softmax of the raw logits [N, V]."""
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    entries, _ = _logprob_entries(logprobs, next_token_ids.to(logprobs.device), num_logprobs,
                                  [num_logprobs] * logits.shape[0])
    return entries


def _logprob_entries(logprobs: torch.Tensor, token_ids: torch.Tensor, max_k: int,
                     ks: Sequence[int | None]) -> tuple[list[TokenLogprobs], list[int]]:
    """Gathers on the device, copies once, and cuts each row to its own k on the host."""
    token_ids = token_ids.long()
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_vals, top_ids = logprobs.topk(max_k, dim=-1) if max_k > 0 else (
        logprobs[:, :0], token_ids.new_empty(logprobs.shape[0], 0))
    ids_h, ranks_h, chosen_h, top_vals_h, top_ids_h = _to_host(
        token_ids, ranks, chosen.squeeze(1), top_vals, top_ids)
    ids_l, ranks_l, chosen_l = ids_h.tolist(), ranks_h.tolist(), chosen_h.tolist()
    top_vals_l, top_ids_l = top_vals_h.tolist(), top_ids_h.tolist()
    entries = []
    for row, k in enumerate(ks):
        k = k or 0
        entries.append(TokenLogprobs(
            token_ids=[ids_l[row]] + top_ids_l[row][:k],
            logprobs=[chosen_l[row]] + top_vals_l[row][:k],
            ranks=[ranks_l[row]] + list(range(1, k + 1))))
    return entries, ids_l


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Start every copy, then wait once (non_blocking device-to-host lands in pinned memory)."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return out
