"""prompt_step's measurement (a fresh prompt's step per length, after a warm-up) and its
table, on a tiny CPU model."""

from __future__ import annotations

from benchmarks.prompt_step import host_profile, measure, table


def test_measure_each_length_and_profile_the_host(tiny_model_dirs):
    from tests.device import make_llm
    llm = make_llm(tiny_model_dirs["llama"], max_model_len=64)
    try:
        medians = measure(llm, [4, 9], repeats=2)
        assert set(medians) == {4, 9} and all(ms > 0 for ms in medians.values())
        profile = host_profile(llm, 9, 2, top=5)
        # Which functions lead depends on the device; the profile is of the engine's own code.
        assert "tottime" in profile and "shardserve" in profile
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_table_marks_missing_lengths():
    text = table([("TP 1", {"32": 5.81, "128": 6.3}), ("TP 2", {"32": 4.9})], [32, 128])
    assert text.splitlines()[2] == "| TP 1 | 5.8 | 6.3 |"
    assert text.splitlines()[3] == "| TP 2 | 4.9 | - |"
