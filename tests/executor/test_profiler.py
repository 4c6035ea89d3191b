"""LLM.start_profile / stop_profile: every rank records itself and writes its own files."""

from __future__ import annotations

import json

import pytest

from shardserve import SamplingParams
from shardserve.executor.profiler import PROFILER_DIR_ENV, profiler_dir
from tests.device import make_llm

PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [6, 7, 8]}]
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def _check_rank_files(summaries: list[dict], ranks: list[int]) -> None:
    assert [s["rank"] for s in summaries] == ranks
    for s in summaries:
        with open(s["trace"]) as fh:
            trace = json.load(fh)
        assert trace["traceEvents"], s["trace"]  # something was recorded on that rank
        with open(s["summary"]) as fh:
            table = fh.read()
        assert table.startswith(f"rank {s['rank']}: top") and s["top"]
        assert all(row["total_us"] > 0 for row in s["top"])


def test_one_process_profile(tiny_model_dirs, tmp_path):
    llm = make_llm(tiny_model_dirs["llama"], kv_cache_memory_bytes=32 << 20)
    with pytest.raises(RuntimeError, match="start_profile"):
        llm.stop_profile()
    llm.start_profile(str(tmp_path / "prof"))
    with pytest.raises(RuntimeError, match="Already profiling"):
        llm.start_profile(str(tmp_path / "prof"))
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    _check_rank_files(llm.stop_profile(), [0])
    # The engine still serves after profiling.
    assert len(llm.generate(PROMPTS, PARAMS, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_every_tp_rank_writes_its_own_trace(tiny_model_dirs, tmp_path):
    llm = make_llm(tiny_model_dirs["llama"], tensor_parallel_size=2,
                   kv_cache_memory_bytes=32 << 20)
    try:
        llm.start_profile(str(tmp_path / "tp"))
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        summaries = llm.stop_profile()
        _check_rank_files(summaries, [0, 1])
        assert {p.name for p in (tmp_path / "tp").iterdir()} == {
            "trace_rank0.json", "trace_rank1.json", "kernels_rank0.txt", "kernels_rank1.txt"}
    finally:
        llm.shutdown()


def test_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path / "env"))
    assert profiler_dir(None) == str(tmp_path / "env")
    monkeypatch.delenv(PROFILER_DIR_ENV)
    with pytest.raises(ValueError, match=PROFILER_DIR_ENV):
        profiler_dir(None)
