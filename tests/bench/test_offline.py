"""bench latency's percentiles are interpolated as vLLM's, and bench throughput refuses vLLM
datasets it does not have in one line."""

from __future__ import annotations

import json
import types

import pytest

from shardserve.bench import offline
from shardserve.cli import main


class _FakeEngine:
    """Each batch takes one step per output token; batch k's steps are slower for larger k."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.pending, self.batches = clock, 0, 0

    def add_request(self, prompt, params) -> None:
        if self.pending == 0:
            self.batches += 1
        self.pending = params.max_tokens

    def has_unfinished_requests(self) -> bool:
        return self.pending > 0

    def step(self) -> None:
        self.clock[0] += self.batches  # seconds: batch k lasts k * output_len
        self.pending -= 1


def test_latency_percentiles_interpolate(monkeypatch, tmp_path):
    clock = [0.0]
    engine = _FakeEngine(clock)
    llm = types.SimpleNamespace(engine=engine, config=types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(vocab_size=5000))))
    monkeypatch.setattr(offline, "_make_llm", lambda args: llm)
    monkeypatch.setattr(offline.time, "perf_counter", lambda: clock[0])
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--num-iters-warmup", "0", "--num-iters", "5",
                 "--output-len", "1", "--batch-size", "1", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["latencies"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # numpy.percentile's: P10 of 1..5 is 1.4 and P90 4.6, not the slowest batch (5).
    assert result["percentiles"]["10"] == pytest.approx(1.4)
    assert result["percentiles"]["90"] == pytest.approx(4.6)
    assert result["percentiles"]["50"] == 3.0
    # One step a batch here: each is all prompt step, all beyond the (absent) decode steps.
    assert result["median_prompt_step_ms"] == pytest.approx(3000.0)
    assert result["median_time_beyond_decode_ms"] == pytest.approx(3000.0)


def test_throughput_refuses_other_datasets(capsys):
    assert main(["bench", "throughput", "--dataset-name", "sharegpt"]) == 2
    assert ("--dataset-name sharegpt: bench throughput uses random token-id prompts only"
            in capsys.readouterr().err)
