"""Seeded random workloads through the scheduler and KV-cache manager (pure Python, fast), with a
fake worker that keeps a real KV cache: every computed position writes a digest of the
sequence up to it into its slot, chained from the previous slot's content, and every sample
reads the request's whole block table back. A block shared, evicted or reused wrongly shows
up as a stale slot (asserted where it is read) and as a sampled token different from the one
the request gets alone.

Each run mixes: prompts sharing long prefixes and prompts ending on block boundaries, EOS,
stop tokens, emulated stop strings (the front end finishing a request), prompt logprobs,
aborts at random steps, a pool small enough to preempt often, a small token budget (chunked
prefill), with or without prefix caching, and three engine loops: one step at a time, async
scheduling (two steps in flight) and pipeline micro-batches. After every step the block
pool's books must balance; at the end every block is free, nothing is stuck, and each
request's tokens, logprobs, prompt logprobs and finish reason equal its run alone (an aborted
request's are a prefix of them)."""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import pytest

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from shardserve.sampling_params import SamplingParams

VOCAB = 40  # small: EOS and stop tokens come up by themselves
EOS = 2


# Tuples of ints hash the same in every process (PYTHONHASHSEED salts str; None's hash is its
# address before Python 3.12), so a seed replays exactly.
def _digest(prev: int, token: int) -> int:
    return hash((prev, token))


def _sample(last_digest: int) -> int:
    return hash((last_digest, -1)) % VOCAB


@dataclass
class _WorkerState:
    tokens: list[int]  # what the scheduler has sent (prompt + known outputs)
    blocks: list[int]
    num_prompt: int
    params: SamplingParams
    own: dict[int, int] = field(default_factory=dict)  # position -> token this worker sampled


class FakeWorker:
    """A worker's request table from the scheduler's diffs, over a KV cache of digests."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)
        self.states: dict[str, _WorkerState] = {}

    def _slot(self, st: _WorkerState, pos: int) -> int:
        assert pos // self.bs < len(st.blocks), f"position {pos} has no block"
        return st.blocks[pos // self.bs] * self.bs + pos % self.bs

    def _token(self, st: _WorkerState, pos: int) -> int:
        if pos < len(st.tokens):
            return st.tokens[pos]
        # Async scheduling: at most one position, the last step's sample, is not known yet.
        assert pos == len(st.tokens) and pos in st.own, "ran on a token nobody sampled"
        return st.own[pos]

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.states.pop(rid, None)
        starts = {}
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states, "a live request was sent as new"
            self.states[new.req_id] = _WorkerState(
                list(new.prompt_token_ids) + list(new.output_token_ids), list(new.block_ids),
                len(new.prompt_token_ids), new.sampling_params)
            starts[new.req_id] = new.num_computed_tokens
        for c in out.scheduled_cached_reqs:
            st = self.states[c.req_id]
            for tok in c.new_token_ids:
                pos = len(st.tokens)
                assert st.own.get(pos, tok) == tok, "scheduler's token differs from the sample"
                st.tokens.append(tok)
            st.blocks.extend(c.new_block_ids)
            starts[c.req_id] = c.num_computed_tokens
        assert set(starts) == set(out.num_scheduled_tokens)
        req_ids, sampled, logprobs, prompt_lps = [], [], [], {}
        for rid, n in out.num_scheduled_tokens.items():
            st, start = self.states[rid], starts[rid]
            for pos in range(start, start + n):
                prev = self.kv[self._slot(st, pos - 1)] if pos else 0
                self.kv[self._slot(st, pos)] = _digest(prev, self._token(st, pos))
            end = start + n
            if st.params.prompt_logprobs is not None and start < st.num_prompt - 1:
                prompt_lps[rid] = [TokenLogprobs([st.tokens[p + 1]], [-(self._read(st, p) % 97)], [1])
                                   for p in range(start, min(end, st.num_prompt - 1))]
            if end >= len(st.tokens):
                last = self._read_all(st, end)
                tok = _sample(last)
                st.own[end] = tok
                req_ids.append(rid)
                sampled.append(tok)
                logprobs.append(TokenLogprobs([tok], [-(last % 89)], [1]))
        return ModelRunnerOutput(req_ids, sampled, logprobs, prompt_lps)

    def _expected(self, st: _WorkerState, upto: int) -> list[int]:
        d, out = 0, []
        for pos in range(upto):
            d = _digest(d, self._token(st, pos))
            out.append(d)
        return out

    def _read(self, st: _WorkerState, pos: int) -> int:
        return self._read_all(st, pos + 1)

    def _read_all(self, st: _WorkerState, length: int) -> int:
        """Attention over positions [0, length): every slot must hold this sequence's digest."""
        expected = self._expected(st, length)
        for pos, want in enumerate(expected):
            got = self.kv[self._slot(st, pos)]
            assert got == want, (f"stale KV at position {pos} (block "
                                 f"{st.blocks[pos // self.bs]})")
        return expected[-1]


def check_pool(sched: Scheduler) -> None:
    """The pool's books: reference counts equal the requests holding each block, the free
    queue holds exactly the unreferenced blocks, the hash map points at blocks with that hash."""
    kv = sched.kv_cache
    pool = kv.pool
    held = Counter(b.block_id for blocks in kv.req_to_blocks.values() for b in blocks)
    for block in pool.blocks:
        assert block.ref_cnt == held[block.block_id], f"block {block.block_id} ref count"
        assert (block.ref_cnt == 0) == (block.block_id in pool._free)
    for block_hash, block in pool._cached.items():
        assert block.block_hash == block_hash
    for rid, blocks in kv.req_to_blocks.items():
        assert len(set(map(id, blocks))) == len(blocks), f"{rid} holds a block twice"
        req = sched.requests[rid]
        assert req.status == RequestStatus.RUNNING, f"{rid} holds blocks while {req.status.name}"
        assert len(blocks) * kv.block_size >= req.num_computed_tokens
    assert set(kv.req_to_blocks) == {r.request_id for r in sched.running}
    assert set(sched.requests) == {r.request_id for r in sched.running} | {
        r.request_id for r in sched.waiting}
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in sched.waiting)
    assert len(sched.running) <= sched.max_num_seqs


@dataclass
class Spec:
    key: str  # an aborted request's id may come back as another request
    rid: str
    prompt: list[int]
    params: SamplingParams
    stop_string_token: int | None  # emulates a stop string: the front end ends the request
    arrive_step: int
    abort_step: int | None


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def make_scheduler(cfg: dict, num_blocks: int) -> Scheduler:
    config = EngineConfig(
        model_config=ModelConfig(max_model_len=cfg["max_model_len"]),
        cache_config=CacheConfig(block_size=cfg["block_size"],
                                 enable_prefix_caching=cfg["prefix"]),
        scheduler_config=SchedulerConfig(max_num_seqs=cfg["max_num_seqs"],
                                         max_num_batched_tokens=cfg["budget"],
                                         enable_chunked_prefill=cfg["chunked"],
                                         async_scheduling=cfg["loop"] == "async"))
    return Scheduler(config, num_blocks)


def run(cfg: dict, num_blocks: int, specs: list[Spec], max_steps: int = 3000) -> dict[str, Result]:
    """Drive the scheduler as EngineCore does (lockstep, or up to `in_flight` steps queued)."""
    sched = make_scheduler(cfg, num_blocks)
    worker = FakeWorker(num_blocks, cfg["block_size"])
    results = {s.key: Result() for s in specs}
    live: dict[str, Spec] = {}  # request id -> the spec it runs now
    in_flight = {"lockstep": 1, "async": 2, "pp": cfg.get("pp", 2)}[cfg["loop"]]
    queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    pending = sorted(specs, key=lambda s: s.arrive_step)

    def finish(rid: str, status: RequestStatus) -> None:
        for req in sched.finish_requests([rid], status):
            results[live[req.request_id].key].finish_reason = status.finish_reason

    for step in range(max_steps):
        for s in specs:
            if s.abort_step == step and live.get(s.rid) is s and s.rid in sched.requests:
                finish(s.rid, RequestStatus.FINISHED_ABORTED)
        while pending and pending[0].arrive_step <= step:
            s = pending.pop(0)
            assert s.rid not in sched.requests
            live[s.rid] = s
            sched.add_request(Request(s.rid, s.prompt, s.params, frozenset({EOS}),
                                      max_tokens=s.params.max_tokens, primary_eos_token_id=EOS))
        if not pending and not sched.has_unfinished_requests() and not queue:
            break
        scheduled = False
        if len(queue) < in_flight:
            cap = None
            if cfg["loop"] == "pp":
                cap = max(1, -(-(len(sched.running) + len(sched.waiting)) // in_flight))
            out = sched.schedule(cap)
            assert out.total_num_scheduled_tokens <= cfg["budget"]
            if out.is_empty:
                sched.defer_finished(out.finished_req_ids)
            else:
                queue.append((out, worker.execute(out)))
                scheduled = True
        check_pool(sched)
        if not queue:
            # Nothing ran and nothing is in flight: the next step would be the same (a hang).
            assert not sched.has_unfinished_requests(), f"stuck at step {step}: {sched.requests}"
            continue
        if scheduled and len(queue) < in_flight:
            continue
        out, runner_out = queue.popleft()
        for o in sched.update_from_output(out, runner_out):
            spec = live[o.req_id]
            res = results[spec.key]
            assert res.finish_reason is None, f"{o.req_id} got output after finishing"
            res.tokens.extend(o.new_token_ids)
            res.logprobs.extend(lp.logprobs[0] for lp in o.new_logprobs or ())
            res.prompt_logprobs.extend(lp.logprobs[0] for lp in o.new_prompt_logprobs or ())
            if o.finish_reason:
                res.finish_reason, res.stop_reason = o.finish_reason, o.stop_reason
            stop_tok = spec.stop_string_token
            if (res.finish_reason is None and stop_tok is not None
                    and stop_tok in o.new_token_ids):
                res.stop_reason = stop_tok
                finish(o.req_id, RequestStatus.FINISHED_STOPPED)
        check_pool(sched)
    else:
        raise AssertionError(f"not done after {max_steps} steps: {sched.requests}")
    kv = sched.kv_cache
    assert kv.num_free_blocks == num_blocks and not kv.req_to_blocks and not kv._num_cached_blocks
    assert all(r.finish_reason for r in results.values())
    return results


def random_workload(rng: random.Random, cfg: dict) -> list[Spec]:
    bs, max_len = cfg["block_size"], cfg["max_model_len"]
    bases = [[rng.randrange(3, VOCAB) for _ in range(max_len)] for _ in range(3)]
    specs = []
    for i in range(rng.randint(3, 14)):
        kind = rng.random()
        if kind < 0.3:  # a block boundary exactly
            length = bs * rng.randint(1, max(1, (max_len - 2) // bs))
        else:
            length = rng.randint(1, max_len - 1)
        length = min(length, max_len - 1)
        if kind < 0.7:  # a shared prefix, maybe a new tail
            prompt = list(rng.choice(bases)[:length])
            cut = rng.randint(0, length)
            prompt[cut:] = [rng.randrange(3, VOCAB) for _ in range(length - cut)]
        else:
            prompt = [rng.randrange(3, VOCAB) for _ in range(length)]
        stop_ids = [rng.randrange(3, VOCAB)] if rng.random() < 0.3 else []
        max_tokens = rng.randint(1, 24)
        params = SamplingParams(
            max_tokens=max_tokens, ignore_eos=rng.random() < 0.3, stop_token_ids=stop_ids,
            min_tokens=min(max_tokens, rng.choice([0, 0, 0, 2])),
            logprobs=1 if rng.random() < 0.3 else None,
            prompt_logprobs=1 if rng.random() < 0.25 else None)
        stop_string = rng.randrange(3, VOCAB) if rng.random() < 0.2 else None
        arrive = rng.choice([0, 0, rng.randint(0, 40)])
        abort = arrive + rng.randint(0, 30) if rng.random() < 0.2 else None
        copies = rng.choice([1, 1, 1, 2, 3])  # n > 1: children with the same prompt
        for c in range(copies):
            specs.append(Spec(f"{i}.{c}", f"{i}.{c}", prompt, params, stop_string, arrive, abort))
    for s in list(specs):
        if s.abort_step is not None and s.abort_step > s.arrive_step and rng.random() < 0.5:
            # The id comes back as a new request the moment it is aborted (a client's retry),
            # while steps holding the old one may still be in flight.
            s.params = replace(s.params, prompt_logprobs=1)
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, max_len - 1))]
            specs.append(Spec(s.key + "'", s.rid, prompt, s.params, None, s.abort_step, None))
    return specs


def random_config(rng: random.Random) -> dict:
    cfg = dict(block_size=rng.choice([1, 2, 4, 8]), max_model_len=rng.choice([16, 24, 40]),
               max_num_seqs=rng.randint(1, 6), prefix=rng.random() < 0.7,
               chunked=rng.random() < 0.8, loop=rng.choice(["lockstep", "async", "pp"]),
               pp=rng.choice([2, 3]))
    cfg["budget"] = (rng.choice([1, 3, 7, 16]) if cfg["chunked"]
                     else cfg["max_model_len"] + rng.choice([0, 8]))
    return cfg


def alone(cfg: dict, spec: Spec) -> Result:
    solo = dict(cfg, loop="lockstep", budget=4096, max_num_seqs=1, chunked=True)
    big = -(-cfg["max_model_len"] // cfg["block_size"]) + 1
    return run(solo, big, [Spec(spec.key, spec.rid, spec.prompt, spec.params,
                                spec.stop_string_token, 0, None)])[spec.key]


def fuzz_one(seed: int) -> None:
    rng = random.Random(seed)
    cfg = random_config(rng)
    specs = random_workload(rng, cfg)
    # Small enough to preempt, never smaller than one max_model_len sequence (the engine
    # refuses that at startup).
    min_blocks = -(-cfg["max_model_len"] // cfg["block_size"])
    num_blocks = min_blocks + rng.randint(0, min_blocks)
    results = run(cfg, num_blocks, specs)
    for spec in specs:
        got, want = results[spec.key], alone(cfg, spec)
        ctx = f"seed {seed} {cfg} blocks={num_blocks} request {spec.key}"
        if got.finish_reason == "abort":
            assert got.tokens == want.tokens[:len(got.tokens)], ctx
            assert got.logprobs == want.logprobs[:len(got.logprobs)], ctx
            continue
        assert (got.tokens, got.finish_reason, got.stop_reason) == (
            want.tokens, want.finish_reason, want.stop_reason), ctx
        assert got.logprobs == want.logprobs, ctx
        assert got.prompt_logprobs == want.prompt_logprobs, ctx
        if spec.params.prompt_logprobs is not None:
            assert len(got.prompt_logprobs) == len(spec.prompt) - 1, ctx


@pytest.mark.parametrize("first", range(0, 300, 50))
def test_random_workloads_match_each_request_alone(first):
    for seed in range(first, first + 50):
        fuzz_one(seed)
