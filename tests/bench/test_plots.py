"""`bench serve --plot` and `bench throughput --plot` write PNGs of the documented sizes."""

from __future__ import annotations

import random

import pytest

from shardserve.bench import plots
from shardserve.bench.serve import RequestResult
from shardserve.bench.serve_report import BenchConfig, summarize
from tests.bench.png import png_size

pytest.importorskip("matplotlib")


def _pixels(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * plots.DPI), round(size[1] * plots.DPI)


def _fake_run(rate: float, seed: int) -> tuple[list[RequestResult], dict]:
    """Made-up timings for 20 requests of 8 tokens over about 4 s."""
    rng = random.Random(seed)
    results = []
    for i in range(20):
        start = i * 0.2
        ttft = rng.uniform(0.05, 0.3)
        itl = [rng.uniform(0.01, 0.05) for _ in range(7)]
        times = [start + ttft]
        for gap in itl:
            times.append(times[-1] + gap)
        results.append(RequestResult(True, 16, 8, start, ttft, times[-1] - start, itl, times))
    config = BenchConfig("http://x", "m", rate, 4, 20, 16, 8, seed)
    return results, summarize(results, 4.0 + 0.5, config)


def test_serve_plot_one_rate_and_several(tmp_path):
    one, several = tmp_path / "one.png", tmp_path / "several.png"
    assert plots.save_serve_plot([_fake_run(4.0, 0)], str(one))
    assert png_size(one) == _pixels(plots.SERVE_SIZE) == (1500, 450)
    runs = [_fake_run(rate, k) for k, rate in enumerate([1.0, 4.0, float("inf")])]
    assert plots.save_serve_plot(runs, str(several))
    assert png_size(several) == _pixels(plots.SERVE_RATES_SIZE) == (1500, 900)


def _failed_run(rate: float) -> tuple[list[RequestResult], dict]:
    results = [RequestResult(False, 16, 0, i * 0.2, error="HTTP 500") for i in range(5)]
    return results, summarize(results, 1.0, BenchConfig("http://x", "m", rate, None, 5, 16, 8, 0))


@pytest.mark.parametrize("rates", [[4.0], [1.0, 4.0]])
def test_serve_plot_when_every_request_failed(tmp_path, rates):
    """No latencies: the panels say so, and no matplotlib warning (log axis of nothing, legend
    of nothing) reaches the user's terminal; a rate that did succeed is still drawn."""
    import warnings

    for name, runs in (("failed", [_failed_run(r) for r in rates]),
                       ("mixed", [_failed_run(rates[0]), _fake_run(8.0, 1)])):
        png = tmp_path / f"{name}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert plots.save_serve_plot(runs, str(png))
        several = len(runs) > 1
        assert png_size(png) == _pixels(plots.SERVE_RATES_SIZE if several else plots.SERVE_SIZE)


def test_bench_throughput_plot(tiny_model_dirs, tmp_path, capsys):
    from shardserve.cli import main

    png, result = tmp_path / "throughput.png", tmp_path / "throughput.json"
    rc = main(["bench", "throughput", "--model", tiny_model_dirs["llama"], "--device", "cpu",
               "--max-model-len", "128", "--kv-cache-memory", "16MiB", "--num-prompts", "6",
               "--input-len", "16", "--output-len", "6", "--plot", str(png),
               "--output-json", str(result)])
    assert rc == 0
    assert f"Saved {png}" in capsys.readouterr().out
    assert png_size(png) == _pixels(plots.THROUGHPUT_SIZE) == (1200, 450)


def test_spread_keeps_every_token():
    bins = [0.0] * 10
    plots._spread(bins, 0.5, first=0.2, last=3.7, n=8)
    assert sum(bins) == pytest.approx(8)
    assert bins[0] >= 1 and bins[8] == 0 and bins[9] == 0
