"""The scheduler under pipeline parallelism: several steps in flight before their results."""

from shardserve.engine.outputs import ModelRunnerOutput
from tests.engine.test_scheduler import make_scheduler, req


def test_in_flight_requests_are_skipped_and_micro_batches_are_capped():
    sched = make_scheduler()
    for i in range(4):
        sched.add_request(req(f"r{i}", 3, start=10 * (i + 1)))
    first = sched.schedule(max_num_reqs=2)
    second = sched.schedule(max_num_reqs=2)
    assert list(first.num_scheduled_tokens) == ["r0", "r1"]
    assert list(second.num_scheduled_tokens) == ["r2", "r3"]
    assert sched.schedule(max_num_reqs=2).is_empty  # everything is in flight
    sched.update_from_output(first, ModelRunnerOutput(["r0", "r1"], [7, 7]))
    assert list(sched.schedule(max_num_reqs=2).num_scheduled_tokens) == ["r0", "r1"]


def test_output_of_a_step_before_a_preemption_is_dropped():
    """r0 is preempted while its step is in flight and resumed before that step returns: the
    stale token must not be appended to its new run."""
    sched = make_scheduler()
    sched.add_request(req("r0", 3))
    stale = sched.schedule()
    victim = sched.running.pop()
    sched._preempt(victim)  # as a later micro-batch's schedule() would
    resumed = sched.schedule()
    assert resumed.scheduled_new_reqs[0].req_id == "r0"
    assert sched.update_from_output(stale, ModelRunnerOutput(["r0"], [7])) == []
    assert sched.requests["r0"].output_token_ids == []
    outs = sched.update_from_output(resumed, ModelRunnerOutput(["r0"], [9]))
    assert [o.new_token_ids for o in outs] == [[9]]


def test_deferred_finished_ids_ride_on_the_next_step():
    sched = make_scheduler()
    sched.defer_finished({"gone"})
    sched.add_request(req("r0", 3))
    assert sched.schedule().finished_req_ids == {"gone"}
