"""The msgpack wire format: our dataclasses round-trip exactly, nothing else is built."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest

from shardserve.engine.core_messages import (AbortRequests, CoreStats, CoreStepOutputs,
                                             EngineCoreRequest, make_serializer)
from shardserve.engine.outputs import EngineCoreOutput, TokenLogprobs
from shardserve.engine.scheduler import SchedulerStats
from shardserve.engine.serial import Serializer
from shardserve.sampling_params import SamplingParams


def test_round_trip_nested_dataclasses():
    s = make_serializer()
    params = SamplingParams(n=2, temperature=0.5, stop=["\n"], seed=7, logprobs=3)
    request = EngineCoreRequest("r1", [1, 2, 3], params, [2], 12.5, 16)
    out = CoreStepOutputs(
        [EngineCoreOutput("r1", [5], [TokenLogprobs([5, 6], [-0.1, -2.0], [1, 2])],
                          finish_reason="stop", stop_reason="\n")],
        {"r1": 3.25}, CoreStats(SchedulerStats(1, 2, 0.5, 10, 4, 0), {0: 100}, {0: 200}), 9.0)
    for message in (request, out, AbortRequests(["a", "b"])):
        assert s.decode(s.encode(message)) == message
    assert s.decode(s.encode({"x": {1, 2}, "t": (1, 2)})) == {"x": {1, 2}, "t": [1, 2]}


def test_decoding_skips_init_validation():
    # The sender validated; the receiver must not re-run (or be able to trigger) __post_init__.
    s = make_serializer()
    params = s.decode(s.encode(SamplingParams(top_k=-1)))
    assert isinstance(params, SamplingParams) and params.top_k == 0


def test_every_kind_of_dataclass_is_rebuilt_field_for_field():
    """Frozen and slots classes, and one with a field __init__ does not take (so it cannot be
    built through __init__), come back equal, whichever way the decoder builds them."""
    @dataclass(frozen=True, slots=True)
    class Frozen:
        a: int
        b: list

    @dataclass
    class Derived:
        a: int
        b: int = field(init=False, default=0)

    derived = Derived(1)
    derived.b = 5
    s = Serializer([Frozen, Derived])
    assert s.decode(s.encode([Frozen(1, [2]), derived])) == [Frozen(1, [2]), derived]
    assert s.decode(s.encode(derived)).b == 5


def test_unregistered_classes_are_refused_both_ways():
    @dataclass
    class Evil:
        x: int

    s = make_serializer()
    with pytest.raises(TypeError, match="register"):
        s.encode(Evil(1))
    other = Serializer([Evil])
    with pytest.raises(ValueError, match="unknown class"):
        s.decode(other.encode(Evil(1)))
    with pytest.raises(ValueError):
        s.decode(msgpack.packb(msgpack.ExtType(42, b"")))


def test_field_count_mismatch_is_an_error():
    s = make_serializer()
    data = s.encode(AbortRequests(["a"]))
    broken = msgpack.packb([msgpack.ExtType(1, b"AbortRequests"), ["a"], "extra"])
    assert s.decode(data) == AbortRequests(["a"])
    with pytest.raises(ValueError, match="fields"):
        s.decode(broken)
