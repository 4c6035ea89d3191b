"""Seeded random workloads through a real LLMEngine (tiny random Llama, float32, CPU): prompts
sharing long prefixes or ending on block boundaries, n in {1, 2, 3}, greedy and seeded
sampling, stop strings and stop token ids, logprobs and prompt logprobs, requests arriving and
aborted at random steps, on a KV cache so small that requests are preempted and recomputed
all the time, with a small token budget (chunked prefill), with and without prefix caching and
async scheduling. Every request that is not aborted must come out exactly as it does alone in
a fresh engine (an aborted one's tokens are a prefix of that), and afterwards every block is
free and nothing is left in the engine. The same at tensor and pipeline parallel 2 (gloo
ranks), where every rank must also drop each request it is told is gone.
tests/engine/test_scheduler_fuzz.py runs many more workloads through the scheduler alone,
with a fake worker."""

from __future__ import annotations

import math
import random

import pytest

from shardserve import LLM
from shardserve.sampling_params import SamplingParams
from tests.device import TEST_DEVICE, make_llm

MAX_MODEL_LEN = 40
BLOCK_SIZE = 4
# One max_model_len sequence needs 10 blocks; 13 make the engine preempt constantly.
SMALL = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
             num_gpu_blocks_override=13, max_num_batched_tokens=10, max_num_seqs=4)
VARIANTS = {
    "prefix": dict(enable_prefix_caching=True, async_scheduling=False),
    "prefix-async": dict(enable_prefix_caching=True, async_scheduling=True),
    "no-prefix-async": dict(enable_prefix_caching=False, async_scheduling=True),
}


def random_requests(rng: random.Random, num: int) -> list[dict]:
    bases = [[rng.randrange(100, 30000) for _ in range(MAX_MODEL_LEN)] for _ in range(2)]
    reqs = []
    for i in range(num):
        if rng.random() < 0.3:  # ends exactly on a block boundary
            length = BLOCK_SIZE * rng.randint(1, 7)
        else:
            length = rng.randint(1, 30)
        prompt = list(rng.choice(bases)[:length])
        if rng.random() < 0.5:  # a shared prefix with its own tail
            cut = rng.randint(0, length)
            prompt[cut:] = [rng.randrange(100, 30000) for _ in range(length - cut)]
        sampled = rng.random() < 0.5
        max_tokens = rng.randint(1, 10)
        params = dict(
            n=rng.choice([1, 2, 3]) if sampled else 1, max_tokens=max_tokens,
            temperature=0.9 if sampled else 0.0, seed=rng.randrange(1000) if sampled else None,
            ignore_eos=rng.random() < 0.5, min_tokens=min(max_tokens, rng.choice([0, 0, 2])),
            stop=rng.choice([None, None, ["e"], ["an", "o"]]),
            logprobs=rng.choice([None, None, 0, 2]),
            prompt_logprobs=rng.choice([None, None, None, 1]),
            top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 1.0, 0.8]),
            # Penalties make async scheduling wait for each token.
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
            presence_penalty=rng.choice([0.0, 0.0, 0.5]))
        if rng.random() < 0.1:
            params.update(max_tokens=None, min_tokens=0)  # what is left of max_model_len
        reqs.append(dict(rid=f"r{i}", key=f"r{i}", prompt=prompt, params=params,
                         stop_token=rng.random() < 0.25,  # filled from a run alone
                         arrive=rng.choice([0, 0, rng.randint(0, 12)]),
                         stream=rng.random() < 0.7,  # False: LLM.generate's final-only output
                         abort=rng.randint(1, 25) if rng.random() < 0.2 else None))
    for r in list(reqs):
        if r["abort"] is not None and r["abort"] > r["arrive"] and rng.random() < 0.5:
            # The id comes back as a new request the moment it is aborted (a client's retry),
            # while steps holding the old one may still be in flight.
            r["params"]["prompt_logprobs"] = 1
            prompt = [rng.randrange(100, 30000) for _ in range(rng.randint(2, 12))]
            reqs.append(dict(r, key=r["rid"] + "'", prompt=prompt, arrive=r["abort"], abort=None,
                             stop_token=False, params=dict(r["params"], stop_token_ids=[])))
    return reqs


def summary(output) -> list:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in output.outputs]


def drive(engine, reqs: list[dict], max_steps: int = 3000) -> dict:
    """Add, step and abort as the workload says; the last RequestOutput of each request."""
    last: dict[str, object] = {}  # by key: an id aborted may come back as another request
    key_of: dict[str, str] = {}
    pending = sorted(reqs, key=lambda r: r["arrive"])
    for step in range(max_steps):
        for r in reqs:
            if (r["abort"] == step and r["arrive"] < step
                    and engine.output_processor.has_request(r["rid"])):
                engine.abort_request([r["rid"]])
                r["aborted"] = True
        while pending and pending[0]["arrive"] <= step:
            r = pending.pop(0)
            processed = engine.input_processor.process_prompt({"prompt_token_ids": r["prompt"]})
            engine.add_processed(processed, SamplingParams(**r["params"]), r["rid"], r["stream"])
            key_of[r["rid"]] = r["key"]
        if not pending and not engine.has_unfinished_requests():
            return last
        for out in engine.step():
            last[key_of[out.request_id]] = out
    raise AssertionError(f"not finished after {max_steps} steps")


def check_empty(engine) -> None:
    sched = engine.core.scheduler
    kv = sched.kv_cache
    assert not sched.requests and not sched.running and not sched.waiting
    assert not kv.req_to_blocks and not kv._num_cached_blocks
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert engine.output_processor.num_unfinished == 0


def assert_logprobs_close(got, want, ctx) -> None:
    assert (got is None) == (want is None), ctx
    if got is None:
        return
    assert len(got) == len(want), ctx
    for g, w in zip(got, want):
        assert (g is None) == (w is None), ctx
        if g is None:
            continue
        assert set(g) == set(w), ctx
        for tid in g:
            assert math.isclose(g[tid].logprob, w[tid].logprob, abs_tol=1e-4), ctx


def _alone(model: str, **device):
    """Runs one request at a time with room to spare: what 'alone' means."""
    return make_llm(model, dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                    enable_prefix_caching=False, max_num_seqs=3, **device).engine


@pytest.fixture(scope="module")
def alone_engine(tiny_model_dirs):
    return _alone(tiny_model_dirs["llama"])


@pytest.fixture(scope="module")
def alone_engine_on_cpu(tiny_model_dirs, request):
    """The reference for the gloo layouts, which run on CPU whatever the test device: sampled
    tokens are compared, and a GPU's sampler draws other ones."""
    if TEST_DEVICE == "cpu":
        return request.getfixturevalue("alone_engine")  # the same engine, built once
    return _alone(tiny_model_dirs["llama"], device="cpu")


def run_alone(engine, r: dict):
    r = dict(r, arrive=0, abort=None, stream=True)
    out = drive(engine, [r])[r["key"]]
    check_empty(engine)
    return out


def fill_stop_tokens(alone_engine, reqs: list[dict]) -> None:
    """A stop token id the request really generates (random weights rarely hit a random one)."""
    for r in reqs:
        if r["stop_token"]:
            tokens = run_alone(alone_engine, r).outputs[0].token_ids
            r["params"]["stop_token_ids"] = [tokens[len(tokens) // 2]]


def fuzz_engine(engine, alone_engine, seed: int, num_requests: int) -> tuple[int, int]:
    """(preemptions, requests aborted mid-generation) of one workload, checked."""
    rng = random.Random(seed)
    reqs = random_requests(rng, num_requests)
    fill_stop_tokens(alone_engine, reqs)
    preemptions = engine.core.scheduler.num_preemptions
    got = drive(engine, reqs)
    check_empty(engine)
    for r in reqs:
        want = run_alone(alone_engine, r)
        ctx = f"seed {seed} request {r}"
        out = got.get(r["key"])
        if r.get("aborted"):
            for c, w in zip(out.outputs if out else (), want.outputs):
                assert c.token_ids == w.token_ids[:len(c.token_ids)], ctx
            continue
        assert out is not None and out.finished, ctx
        assert summary(out) == summary(want), ctx
        for c, w in zip(out.outputs, want.outputs):
            assert_logprobs_close(c.logprobs, w.logprobs, ctx)
            for s in (c, w):
                if s.finish_reason == "length":
                    assert len(s.token_ids) == r["params"]["max_tokens"] or (
                        len(r["prompt"]) + len(s.token_ids) == MAX_MODEL_LEN), ctx
        assert_logprobs_close(out.prompt_logprobs, want.prompt_logprobs, ctx)
        if r["params"]["prompt_logprobs"] is not None:
            assert len(out.prompt_logprobs) == len(r["prompt"]), ctx
    num_aborted = sum(1 for r in reqs if r.get("aborted"))
    return engine.core.scheduler.num_preemptions - preemptions, num_aborted


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_workloads_match_each_request_alone(tiny_model_dirs, alone_engine, variant):
    llm = make_llm(tiny_model_dirs["llama"], **SMALL, **VARIANTS[variant])
    preemptions = sum(fuzz_engine(llm.engine, alone_engine, seed, 8)[0] for seed in range(2))
    assert preemptions > 0  # the small cache really preempts


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_random_workload_across_ranks_matches_each_request_alone(tiny_model_dirs,
                                                                 alone_engine_on_cpu, layout):
    """The scheduler driving TP or PP ranks (gloo): steps in flight (async scheduling under TP,
    two micro-batches under PP) while requests are preempted, chunked, hit the prefix cache
    and are aborted; every rank drops every request it was told is gone."""
    llm = LLM(tiny_model_dirs["llama"], device="cpu", **SMALL, **VARIANTS["prefix-async"],
              **layout)
    try:
        # Seed 2: two requests aborted mid-generation, each id back as a new request at once,
        # and preemptions in both layouts.
        preemptions, num_aborted = fuzz_engine(llm.engine, alone_engine_on_cpu, 2, 8)
        assert preemptions > 0 and num_aborted > 0
        core = llm.engine.core
        assert core.num_overlapped_steps > 0
        # The last requests' ids ride on the next step; anything else held is a leak.
        for ids in core.executor.collective_rpc("live_request_ids"):
            assert set(ids) <= core.scheduler._finished_req_ids
    finally:
        llm.shutdown()
