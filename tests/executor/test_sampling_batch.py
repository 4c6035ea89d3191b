"""SamplingBatch: the rows' metadata is kept while the rows are the same requests, and each
step's penalties and min_tokens masks are exactly what SamplingMetadata.build gives."""

from __future__ import annotations

import torch

from shardserve.executor.request_state import CachedRequestState
from shardserve.executor.sampling_batch import SamplingBatch
from shardserve.layers.sampling_metadata import SamplingMetadata, min_tokens_stop_ids
from shardserve.sampling_params import SamplingParams

VOCAB = 50
EOS = 2


def state(rid: str, params: SamplingParams, prompt: list[int], outputs: list[int],
          seed: int | None = None) -> CachedRequestState:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return CachedRequestState(rid, len(prompt), prompt + outputs, params, 0, len(prompt),
                              [EOS], gen)


def reference(states: list[CachedRequestState], num_outputs: list[int]) -> SamplingMetadata:
    return SamplingMetadata.build(
        [s.sampling_params for s in states], [s.output_token_ids for s in states],
        [s.prompt_token_ids for s in states], [s.generator for s in states],
        [min_tokens_stop_ids(s.sampling_params, n, s.eos_token_ids)
         for s, n in zip(states, num_outputs)], VOCAB, "cpu")


def assert_same(got: SamplingMetadata, want: SamplingMetadata) -> None:
    for name in SamplingMetadata.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert a is not None and b is not None, name
            assert torch.equal(a, b), name
        else:
            assert a == b, name


def test_rows_kept_while_the_batch_is_unchanged() -> None:
    states = [state("a", SamplingParams(temperature=0.7, top_p=0.9), [5, 6], [7]),
              state("b", SamplingParams(temperature=0.0), [8], []),
              state("c", SamplingParams(temperature=1.0, seed=3), [9], [1, 1], seed=3)]
    batch = SamplingBatch(torch.device("cpu"))
    first = batch.metadata(states, [1, 0, 2], VOCAB)
    assert_same(first, reference(states, [1, 0, 2]))
    assert batch.metadata(states, [2, 1, 3], VOCAB) is first  # nothing per step: reused
    assert batch.num_rebuilds == 1
    assert set(first.generators) == {2} and first.generators[2] is states[2].generator
    # A different request in a row (or a resumed one: a new state object) rebuilds.
    resumed = state("b", SamplingParams(temperature=0.0), [8], [])
    batch.metadata([states[0], resumed, states[2]], [1, 0, 2], VOCAB)
    assert batch.num_rebuilds == 2
    batch.metadata(states[:2], [1, 0], VOCAB)
    assert batch.num_rebuilds == 3


def test_penalties_and_min_tokens_follow_each_step() -> None:
    pen = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4)
    mt = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[11])
    plain = SamplingParams(temperature=1.0)
    states = [state("p", pen, [3, 4, 5], [6]), state("m", mt, [3], [20]),
              state("x", plain, [1], [])]
    batch = SamplingBatch(torch.device("cpu"))
    for step in range(4):
        num_outputs = [len(s.output_token_ids) for s in states]
        got = batch.metadata(states, num_outputs, VOCAB)
        assert_same(got, reference(states, num_outputs))
        for s in states:
            s.token_ids.append(10 + step)
    assert batch.num_rebuilds == 1
    # Once "m" has its min_tokens, nothing is masked any more.
    assert got.banned_rows is None


def test_bad_words_bans_follow_each_step() -> None:
    """A bad word's last token is banned while its start ends the outputs (never the prompt);
    a one-token word always; rows without bad words get nothing."""
    words = SamplingParams(temperature=0.0, _bad_words_token_ids=[[12, 13], [40]])
    states = [state("w", words, [12], []), state("x", SamplingParams(temperature=1.0), [1], [])]
    batch = SamplingBatch(torch.device("cpu"))
    want = [[40], [13, 40], [40]]
    for step, next_token in enumerate([12, 5, 6]):
        got = batch.metadata(states, [len(s.output_token_ids) for s in states], VOCAB)
        assert got.banned_rows.tolist() == [0] * len(want[step])
        assert got.banned_token_ids.tolist() == want[step]
        for s in states:
            s.token_ids.append(next_token)
    assert batch.num_rebuilds == 1
