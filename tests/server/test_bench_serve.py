"""`shardserve bench serve` against the test server: the summary table, JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardserve.bench.serve_report import parse_goodput, percentile
from tests.bench.png import png_size
from tests.server.conftest import API_KEY


def test_percentile_and_goodput_parsing():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    for bad in (["ttft"], ["speed:5"], ["ttft:fast"], ["e2el:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


@pytest.mark.parametrize("rate", ["inf", "20"])
def test_bench_serve_smoke(tiny_server, tmp_path, rate):
    result, plot = tmp_path / "result.json", tmp_path / "plot.png"
    cmd = [sys.executable, "-m", "shardserve.cli", "bench", "serve",
           "--base-url", tiny_server.base_url, "--api-key", API_KEY,
           "--request-rate", rate, "--max-concurrency", "2", "--num-prompts", "4",
           "--input-len", "16", "--output-len", "4", "--seed", "1",
           "--goodput", "ttft:600000", "tpot:600000", "--save-result", str(result),
           "--plot", str(plot)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for words in ("Serving Benchmark Result", "Successful requests:", "Median TTFT (ms):",
                  "P99 TPOT (ms):", "Mean ITL (ms):", "P90 E2EL (ms):", "Request goodput"):
        assert words in proc.stdout, proc.stdout
    data = json.loads(result.read_text())
    assert data["completed"] == 4 and data["failed"] == 0
    assert data["total_input_tokens"] == 16 * 4 and data["total_output_tokens"] == 4 * 4
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])
    assert data["median_ttft_ms"] > 0 and data["p99_itl_ms"] > 0 and len(data["itls"][0]) == 3
    assert png_size(plot) == (1500, 450)  # plots.SERVE_SIZE at plots.DPI


def test_bench_serve_several_rates(tiny_server, tmp_path):
    """Two rates one after another: one summary each, and a plot with the against-rate row."""
    result, plot = tmp_path / "result.json", tmp_path / "rates.png"
    cmd = [sys.executable, "-m", "shardserve.cli", "bench", "serve",
           "--base-url", tiny_server.base_url, "--api-key", API_KEY,
           "--request-rate", "50", "inf", "--num-prompts", "3", "--input-len", "8",
           "--output-len", "3", "--seed", "1", "--save-result", str(result), "--plot", str(plot)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("Serving Benchmark Result") == 2
    runs = json.loads(result.read_text())["runs"]
    assert [r["config_request_rate"] for r in runs] == [50.0, float("inf")]
    assert all(r["completed"] == 3 for r in runs)
    assert png_size(plot) == (1500, 900)  # plots.SERVE_RATES_SIZE at plots.DPI
