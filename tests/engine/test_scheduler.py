"""Scheduler on CPU with hand-made model outputs: budgets, chunking, preemption, stops, aborts."""

import pytest

from shardserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shardserve.engine.request import Request, RequestStatus
from shardserve.engine.scheduler import Scheduler
from shardserve.sampling_params import SamplingParams

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=64,
                   prefix=True, chunked=True) -> Scheduler:
    config = EngineConfig(
        model_config=ModelConfig(max_model_len=max_model_len),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
        scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                         enable_chunked_prefill=chunked))
    return Scheduler(config, num_blocks)


def req(rid, n_prompt, start=10, **params) -> Request:
    params.setdefault("max_tokens", 8)
    params.setdefault("ignore_eos", False)
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(**params),
                   frozenset({EOS}), max_tokens=params["max_tokens"], primary_eos_token_id=EOS)


def fake_run(out: SchedulerOutput, sched: Scheduler, token=7) -> ModelRunnerOutput:
    """Sample `token` for every request whose scheduled chunk reaches its last token."""
    ids = [rid for rid in out.num_scheduled_tokens
           if sched.requests[rid].num_computed_tokens == sched.requests[rid].num_tokens]
    return ModelRunnerOutput(ids, [token] * len(ids))


def run_to_completion(sched: Scheduler, token=7, max_steps=200):
    outputs, steps = [], []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        steps.append(out)
        outputs.extend(sched.update_from_output(out, fake_run(out, sched, token)))
    return outputs, steps


def test_budget_and_chunked_prefill_mix_prefill_with_decode():
    sched = make_scheduler(budget=16)
    sched.add_request(req("a", 10))
    sched.add_request(req("b", 20, start=100))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 10, "b": 6}  # b's prompt is chunked
    assert out.total_num_scheduled_tokens == 16
    res = sched.update_from_output(out, fake_run(out, sched))
    assert [o.req_id for o in res] == ["a"]
    out = sched.schedule()
    # a decodes one token while b's prefill continues in the same step.
    assert out.num_scheduled_tokens == {"a": 1, "b": 14}
    assert out.scheduled_cached_reqs[0].new_token_ids == [7]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(req(str(i), 3))
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"0", "1"}
    assert len(sched.waiting) == 2


def test_no_chunking_waits_for_budget():
    sched = make_scheduler(budget=16, chunked=False)
    sched.add_request(req("a", 10))
    sched.add_request(req("b", 12, start=100))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 10}


def test_stops_and_every_block_free_at_the_end():
    sched = make_scheduler()
    sched.add_request(req("len", 5, max_tokens=3))
    sched.add_request(req("eos", 5, start=30, max_tokens=10))
    sched.add_request(req("stopid", 5, start=50, max_tokens=10, stop_token_ids=[7]))
    sched.add_request(req("minlen", 5, start=70, max_tokens=10, stop_token_ids=[7], min_tokens=2))
    # Samples 7 everywhere: stopid stops at once; minlen after 2; len after 3 (length).
    outputs, _ = run_to_completion(sched, token=7)
    finals = {o.req_id: o for o in outputs if o.finish_reason}
    assert finals["stopid"].finish_reason == "stop" and finals["stopid"].stop_reason == 7
    assert finals["len"].finish_reason == "length"
    assert finals["minlen"].finish_reason == "stop"
    assert sum(len(o.new_token_ids) for o in outputs if o.req_id == "minlen") == 2
    assert finals["eos"].finish_reason == "length"  # never saw EOS
    assert sched.kv_cache.num_free_blocks == 64
    assert not sched.requests


def test_eos_stops_unless_ignored():
    sched = make_scheduler()
    sched.add_request(req("a", 5, max_tokens=4))
    sched.add_request(req("b", 5, start=40, max_tokens=4, ignore_eos=True))
    outputs, _ = run_to_completion(sched, token=EOS)
    counts = {rid: sum(len(o.new_token_ids) for o in outputs if o.req_id == rid) for rid in "ab"}
    assert counts == {"a": 1, "b": 4}


def test_max_model_len_caps_generation():
    sched = make_scheduler(max_model_len=12)
    r = req("a", 10, max_tokens=100)
    sched.add_request(r)
    outputs, _ = run_to_completion(sched)
    assert outputs[-1].finish_reason == "length"
    assert r.num_tokens == 12


def test_preemption_by_recompute_frees_and_resumes():
    # 6 blocks of 4 tokens: two requests of 9 prompt tokens (3 blocks each) fill the cache;
    # the first decode that needs a 4th block preempts the later request.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, prefix=False)
    a, b = req("a", 11, max_tokens=6), req("b", 11, start=40, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    outputs, steps = run_to_completion(sched)
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    # The preempted request was dropped by the workers and later sent whole again.
    dropped = [s for s in steps if "b" in s.finished_req_ids]
    assert dropped
    resent = [n for s in steps for n in s.scheduled_new_reqs if n.req_id == "b"]
    assert len(resent) == 2 and resent[1].output_token_ids
    finals = {o.req_id: o.finish_reason for o in outputs if o.finish_reason}
    assert finals == {"a": "length", "b": "length"}
    assert sched.kv_cache.num_free_blocks == 6


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(req("run", 6))
    sched.add_request(req("wait", 6))
    out = sched.schedule()
    sched.update_from_output(out, fake_run(out, sched))
    sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == 64
    assert sched.schedule().finished_req_ids == {"run", "wait"}


def test_prefix_hit_skips_cached_tokens():
    sched = make_scheduler(block_size=4)
    sched.add_request(req("a", 10))
    out = sched.schedule()
    sched.update_from_output(out, fake_run(out, sched))
    sched.add_request(req("b", 10))  # same prompt
    out = sched.schedule()
    new = out.scheduled_new_reqs[0]
    assert new.req_id == "b" and new.num_computed_tokens == 8
    assert out.num_scheduled_tokens["b"] == 2
    stats = sched.stats()
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_queries == 20


def test_a_request_waiting_for_memory_counts_once_in_the_hit_rate():
    """The head of the queue is looked up again every step while the pool is short; the
    prefix-cache stats count its prompt once, when it is admitted."""
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=24)
    sched.add_request(req("a", 20))  # 5 of the 6 blocks
    out = sched.schedule()
    sched.update_from_output(out, fake_run(out, sched))
    sched.add_request(req("b", 12, start=500))  # needs 3 blocks: waits
    for _ in range(3):
        out = sched.schedule()
        assert "b" not in out.num_scheduled_tokens
        sched.update_from_output(out, fake_run(out, sched))
    stats = sched.stats()
    assert stats.prefix_cache_queries == 20
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out = sched.schedule()
    assert "b" in out.num_scheduled_tokens
    assert sched.stats().prefix_cache_queries == 20 + 12


@pytest.mark.parametrize("budget", [3, 5, 64])
def test_every_step_respects_the_budget(budget):
    sched = make_scheduler(budget=budget)
    for i in range(5):
        sched.add_request(req(str(i), 7 + i, start=10 * i))
    _, steps = run_to_completion(sched, max_steps=500)
    assert all(0 < s.total_num_scheduled_tokens <= budget for s in steps if not s.is_empty)
    assert not sched.has_unfinished_requests()


def test_a_generation_config_eos_is_the_stop_reason_the_tokenizers_is_not():
    """As vLLM: the tokenizer's EOS ends a request with stop_reason None; the other EOS ids
    (generation_config's, e.g. Llama-3's <|end_of_text|> beside <|eot_id|>) act as stop
    token ids, so stop_reason names the one that ended it."""
    for token, reason in ((EOS, None), (9, 9)):
        sched = make_scheduler()
        request = req("r", 5, max_tokens=10)
        request.eos_token_ids = frozenset({EOS, 9})
        sched.add_request(request)
        outputs, _ = run_to_completion(sched, token=token)
        final = [o for o in outputs if o.finish_reason][0]
        assert (final.finish_reason, final.stop_reason) == ("stop", reason)
