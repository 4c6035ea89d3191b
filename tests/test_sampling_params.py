"""SamplingParams as a ported vLLM script builds it: from_optional, and vLLM's fields this
engine cannot honour refused by name (not a TypeError) without touching the wire format."""

from __future__ import annotations

import dataclasses

import pytest

from shardserve import SamplingParams
from shardserve.errors import InvalidRequestError


def test_from_optional_nones_mean_defaults_and_logit_bias_keys_are_converted():
    params = SamplingParams.from_optional(n=None, temperature=None, top_p=None,
                                          presence_penalty=None, frequency_penalty=None,
                                          repetition_penalty=None, max_tokens=None,
                                          logit_bias={"5": 300, 6: -1})
    assert (params.n, params.temperature, params.top_p, params.repetition_penalty) == (1, 1.0, 1.0, 1.0)
    assert params.max_tokens is None  # not one of the None-means-default fields: no limit
    assert params.logit_bias == {5: 100.0, 6: -1.0}  # JSON-style keys, clipped as vLLM does
    with pytest.raises(InvalidRequestError, match="logit_bias keys") as err:
        SamplingParams.from_optional(logit_bias={"five": 1.0})
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams.from_optional(temperature=-1.0)  # validated like the constructor


@pytest.mark.parametrize("name", ["structured_outputs", "guided_decoding"])
def test_structured_outputs_are_refused_by_name(name):
    with pytest.raises(InvalidRequestError, match=name) as err:
        SamplingParams(**{name: {"json": {"type": "object"}}})
    assert err.value.param == name and isinstance(err.value, ValueError)  # vLLM raises ValueError
    params = SamplingParams(**{name: None}, seed=1, n=2)
    # Not stored: the params that cross the process boundary keep their fields, and a child's
    # copy (dataclasses.replace) still builds.
    assert name not in {f.name for f in dataclasses.fields(SamplingParams)}
    assert params.for_child(1).seed == 2 and params.clone() == params
