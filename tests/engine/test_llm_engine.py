"""LLMEngine (the offline front end): settings it cannot honour are said out loud, and so are
request ids already in use."""

from __future__ import annotations

import logging

import pytest


def test_data_parallel_size_is_not_silently_dropped(tiny_model_dirs, caplog):
    """The in-process engine is one replica: -dp 2 on `generate` or LLM(data_parallel_size=2)
    still works, with a warning pointing at `serve -dp`, which runs the replicas."""
    from shardserve import LLM, SamplingParams

    with caplog.at_level(logging.WARNING, logger="shardserve.engine.llm_engine"):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", max_model_len=64,
                  kv_cache_memory_bytes=1 << 20, data_parallel_size=2)
    try:
        assert "data_parallel_size=2 is ignored here" in caplog.text
        assert "shardserve serve -dp 2" in caplog.text
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        assert len(llm.generate({"prompt_token_ids": [1, 2, 3]}, params,
                                use_tqdm=False)[0].outputs[0].token_ids) == 2
    finally:
        llm.shutdown()


def test_request_id_in_use_is_refused(tiny_model_dirs):
    """A second request under a live id, or under an n > 1 sample's "id#i", used to reach the
    engine core as a duplicate and crash the next step; now it is refused and the first runs
    on."""
    from shardserve import SamplingParams
    from shardserve.errors import InvalidRequestError
    from tests.device import make_llm

    engine = make_llm(tiny_model_dirs["llama"], dtype="float32", max_model_len=64,
                      block_size=4, num_gpu_blocks_override=32).engine
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8, 9]}, greedy, "x")
    engine.add_request({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3), "y")
    engine.step()
    for rid in ("x", "y#1"):
        with pytest.raises(InvalidRequestError, match=f"Request id '{rid}' is already in use"):
            engine.add_request({"prompt_token_ids": [11, 12, 13]}, greedy, rid)
    engine.add_request({"prompt_token_ids": [11, 12]}, greedy, "z#1")
    with pytest.raises(InvalidRequestError, match="Request id 'z#1' is already in use"):
        # Its second sample would be "z#1" too.
        engine.add_request({"prompt_token_ids": [11, 12]},
                           SamplingParams(n=2, temperature=1.0, max_tokens=2), "z")
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert len(finals["x"].outputs[0].token_ids) == 4
    assert [len(c.token_ids) for c in finals["y"].outputs] == [3, 3]
    assert len(finals["z#1"].outputs[0].token_ids) == 4
    assert engine.core.scheduler.kv_cache.num_free_blocks == 32
    # Finished ids are free again.
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8, 9]}, greedy, "x")
    while engine.has_unfinished_requests():
        engine.step()
