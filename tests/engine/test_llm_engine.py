"""LLMEngine (the offline front end): settings it cannot honour are said out loud."""

from __future__ import annotations

import logging


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
