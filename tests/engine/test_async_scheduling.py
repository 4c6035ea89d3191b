"""Async scheduling: step N+1 is scheduled before step N's tokens are back.

Scheduler level (hand-made outputs): output placeholders, no step past max_tokens, requests
with penalties wait for their token, preemption drops what is in flight. Engine level (tiny
model, CPU): the same outputs as lock-step scheduling for a mixed batch, every block freed.
"""

from __future__ import annotations

import pytest

from shardserve import SamplingParams
from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from tests.device import make_llm

EOS = 2


def make_scheduler(num_blocks=64, budget=32, max_model_len=64) -> Scheduler:
    config = EngineConfig(
        model_config=ModelConfig(max_model_len=max_model_len),
        cache_config=CacheConfig(block_size=4, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                         async_scheduling=True))
    return Scheduler(config, num_blocks)


def req(rid, n_prompt, **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(**params),
                   frozenset({EOS}), max_tokens=params["max_tokens"])


def samples(out: SchedulerOutput, sched: Scheduler) -> list[str]:
    """The requests whose scheduled chunk reaches their last token, placeholders included."""
    return [rid for rid in out.num_scheduled_tokens
            if sched.requests[rid].num_computed_tokens
            == sched.requests[rid].num_tokens + sched.requests[rid].num_output_placeholders - 1]


def test_next_step_is_scheduled_on_placeholders():
    sched = make_scheduler()
    sched.add_request(req("a", 5))
    first = sched.schedule()
    assert first.num_scheduled_tokens == {"a": 5}
    a = sched.requests["a"]
    assert a.num_output_placeholders == 1 and a.num_computed_tokens == 5
    # Step 1 is still running: step 2 already decodes a's (unknown) sixth token.
    second = sched.schedule()
    assert second.num_scheduled_tokens == {"a": 1}
    assert a.num_output_placeholders == 2 and a.num_computed_tokens == 6
    # No token ids are sent for the placeholder: the worker reads it on its device.
    assert second.scheduled_cached_reqs[0].new_token_ids == []
    sched.update_from_output(first, ModelRunnerOutput(["a"], [7]))
    assert a.num_output_placeholders == 1 and a.all_token_ids[-1] == 7
    third = sched.schedule()
    assert third.scheduled_cached_reqs[0].new_token_ids == [7]


def test_never_scheduled_past_max_tokens():
    sched = make_scheduler()
    sched.add_request(req("a", 3, max_tokens=2))
    s1 = sched.schedule()
    s2 = sched.schedule()  # samples token 2 of 2
    assert s2.num_scheduled_tokens == {"a": 1}
    s3 = sched.schedule()  # both in flight reach max_tokens: nothing more to run
    assert s3.num_scheduled_tokens == {}
    out = sched.update_from_output(s1, ModelRunnerOutput(["a"], [7]))
    out += sched.update_from_output(s2, ModelRunnerOutput(["a"], [8]))
    assert [o.new_token_ids for o in out] == [[7], [8]]
    assert out[-1].finish_reason == "length"
    assert sched.kv_cache.num_free_blocks == 64


def test_stop_token_discards_the_step_in_flight():
    sched = make_scheduler()
    sched.add_request(req("a", 3, max_tokens=10))
    s1 = sched.schedule()
    s2 = sched.schedule()
    out = sched.update_from_output(s1, ModelRunnerOutput(["a"], [EOS]))
    assert out[0].finish_reason == "stop"
    # The step in flight sampled one more token for a finished request: dropped.
    assert sched.update_from_output(s2, ModelRunnerOutput(["a"], [9])) == []
    assert sched.kv_cache.num_free_blocks == 64
    assert "a" in sched.schedule().finished_req_ids


def test_penalties_wait_for_the_previous_token():
    sched = make_scheduler()
    sched.add_request(req("p", 3, repetition_penalty=1.3))
    sched.add_request(req("g", 3))
    s1 = sched.schedule()
    s2 = sched.schedule()
    assert set(s2.num_scheduled_tokens) == {"g"}  # p's penalties need its token first
    sched.update_from_output(s1, ModelRunnerOutput(["p", "g"], [7, 7]))
    s3 = sched.schedule()
    assert set(s3.num_scheduled_tokens) == {"p", "g"}
    assert samples(s3, sched) == ["p", "g"]


def test_bad_words_of_several_tokens_wait_for_the_previous_token():
    """Whether a word's last token is banned depends on the token before it, so such a request
    waits like one with penalties; one-token words ban regardless and do not."""
    sched = make_scheduler()
    sched.add_request(req("w", 3, _bad_words_token_ids=[[7, 8]]))
    sched.add_request(req("g", 3, _bad_words_token_ids=[[9]]))
    s1 = sched.schedule()
    assert set(sched.schedule().num_scheduled_tokens) == {"g"}
    sched.update_from_output(s1, ModelRunnerOutput(["w", "g"], [7, 7]))
    assert set(sched.schedule().num_scheduled_tokens) == {"w", "g"}


def test_preemption_drops_placeholders():
    sched = make_scheduler(num_blocks=5, budget=32, max_model_len=20)
    sched.add_request(req("a", 8, max_tokens=12))
    sched.add_request(req("b", 8, max_tokens=12))
    steps = []
    for _ in range(12):
        out = sched.schedule()
        steps.append(out)
        if len(steps) >= 2:
            old = steps[-2]
            sched.update_from_output(old, ModelRunnerOutput(samples_of(old), [7] * len(samples_of(old))))
        if sched.num_preemptions:
            break
    assert sched.num_preemptions > 0
    victim = next(r for r in sched.waiting)
    assert victim.status == RequestStatus.PREEMPTED and victim.num_output_placeholders == 0


def test_prompt_logprobs_of_a_step_in_flight_stay_with_their_request():
    """A request aborted while a step computed its prompt chunk, and a new one under the same id
    (a client's retry) admitted before that step's result is back: the old chunk's prompt
    logprobs used to go out as the new request's, which then skipped its own."""
    from shardserve.engine.outputs import TokenLogprobs

    def entries(first: int, num: int) -> list[TokenLogprobs]:
        return [TokenLogprobs([first + i], [-1.0], [1]) for i in range(num)]

    sched = make_scheduler(budget=8)
    sched.add_request(req("x", 12, prompt_logprobs=0))
    old = sched.schedule()  # chunk [0, 8): scores prompt tokens 1..8
    sched.finish_requests(["x"], RequestStatus.FINISHED_ABORTED)
    sched.add_request(Request("x", list(range(500, 512)), SamplingParams(prompt_logprobs=0),
                              frozenset({EOS}), max_tokens=8))
    new = sched.schedule()
    assert new.scheduled_new_reqs[0].req_id == "x"
    assert sched.update_from_output(old, ModelRunnerOutput([], [], None, {"x": entries(11, 8)})) == []
    outs = sched.update_from_output(new, ModelRunnerOutput([], [], None, {"x": entries(501, 8)}))
    assert [e.token_ids[0] for e in outs[0].new_prompt_logprobs] == list(range(501, 509))


def samples_of(out: SchedulerOutput) -> list[str]:
    # Test helper state: which requests each step samples, recorded when it was scheduled.
    return out._samples


@pytest.fixture(autouse=True)
def _record_samples(monkeypatch):
    """Record, at schedule time, which requests each step samples for (as a worker would)."""
    real = Scheduler.schedule

    def schedule(self, *args, **kwargs):
        before = {rid: r.num_output_placeholders for rid, r in self.requests.items()}
        out = real(self, *args, **kwargs)
        out._samples = [rid for rid in out.num_scheduled_tokens
                        if self.requests[rid].num_output_placeholders > before.get(rid, 0)]
        return out
    monkeypatch.setattr(Scheduler, "schedule", schedule)


# ---- whole engine, CPU -------------------------------------------------------------------

PROMPTS = [[5, 17, 300, 42, 9, 1200, 77], [8, 9], list(range(100, 160)), [3] * 20,
           [400, 401, 402], list(range(700, 760))]


def _params(stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                       frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4, stop_token_ids=[stop_id],
                       logprobs=2, prompt_logprobs=1),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
    ]


def _run(model_dir: str, async_scheduling: bool, **kwargs):
    llm = make_llm(model_dir, dtype="float32", max_model_len=128,
                   async_scheduling=async_scheduling, **kwargs)
    probe = llm.generate({"prompt_token_ids": PROMPTS[1]},
                         SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _params(probe[3]),
                        use_tqdm=False)
    core = llm.engine.core
    assert core.scheduler.kv_cache.num_free_blocks == llm.config.cache_config.num_blocks
    result = [[(c.token_ids, c.finish_reason, c.stop_reason,
                [sorted((t, round(lp.logprob, 4)) for t, lp in e.items()) for e in (c.logprobs or [])])
               for c in o.outputs] for o in outs]
    return result, (core.executor.worker.runner.num_placeholder_tokens, core.scheduler.num_preemptions)


@pytest.fixture(scope="module")
def lockstep_reference(tiny_model_dirs):
    return _run(tiny_model_dirs["llama"], False)[0]


@pytest.mark.parametrize("variant", [{}, {"num_gpu_blocks_override": 16, "block_size": 8,
                                          "max_num_batched_tokens": 24,
                                          "enable_prefix_caching": False}])
def test_engine_outputs_match_lockstep(tiny_model_dirs, lockstep_reference, variant):
    overlapped, (fed, preemptions) = _run(tiny_model_dirs["llama"], True, **variant)
    assert fed > 0
    assert (preemptions > 0) == bool(variant)  # the small cache really preempts
    # Preemption changes neither: a resumed seeded request replays its generator's draws.
    assert overlapped == lockstep_reference
    if variant:
        assert _run(tiny_model_dirs["llama"], False, **variant)[0] == lockstep_reference
    # The stop token really ended one request early (a step in flight was discarded).
    assert lockstep_reference[1][0][1] == "stop"
