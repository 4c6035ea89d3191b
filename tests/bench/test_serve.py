"""bench serve takes vLLM's `vllm bench serve` command lines: the options it shares work the
same, the ones it cannot honour are refused in one line saying what to use."""

from __future__ import annotations

import argparse
import random
import statistics

import pytest

from shardserve.bench.serve import add_bench_serve_args, arrival_gap, random_requests, result_path
from shardserve.cli import main
from tests.ports import free_port


@pytest.mark.parametrize("argv,message", [
    (["--backend", "openai-chat"], "--backend openai-chat: bench serve streams /v1/completions"),
    (["--endpoint", "/v1/chat/completions"], "--endpoint /v1/chat/completions: bench serve "
                                             "streams /v1/completions only"),
    (["--dataset-name", "sharegpt", "--dataset-path", "x.json"],
     "--dataset-name sharegpt: bench serve sends random token-id prompts only; use "
     "--dataset-name random"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio must be at least 0 and below 1"),
    (["--burstiness", "0"], "--burstiness must be positive"),
    (["--percentile-metrics", "ttft,p99"], "--percentile-metrics: expected a comma-separated"),
    (["--metric-percentiles", "x"], "--metric-percentiles: expected comma-separated numbers"),
    (["--save-result", "--result-dir", "/no/such/dir"], "--result-dir /no/such/dir does not"),
])
def test_vllm_options_it_cannot_honour_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_vllm_command_line_parses_and_reaches_host_and_port(capsys):
    port = free_port()  # nobody listens there
    argv = ["bench", "serve", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(port),
            "--endpoint", "/v1/completions", "--dataset-name", "random",
            "--random-input-len", "8", "--random-output-len", "4", "--random-range-ratio", "0.5",
            "--num-prompts", "2", "--request-rate", "inf", "--burstiness", "1.0",
            "--max-concurrency", "2", "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--ignore-eos", "--seed", "1", "--goodput",
            "ttft:100", "--save-result", "--result-dir", "/tmp", "--disable-tqdm",
            "--tokenizer", "x", "--trust-remote-code"]
    assert main(argv) == 2  # no server there: the first request says where it looked
    assert f"Cannot read http://127.0.0.1:{port}/v1/models" in capsys.readouterr().err


def test_random_lengths_follow_the_range_ratio_after_a_shared_prefix():
    requests = random_requests(random.Random(0), 200, 100, 20, 0.5, 7, 50)
    prefixes = {tuple(p[:7]) for p, _ in requests}
    assert len(prefixes) == 1
    in_lens = [len(p) - 7 for p, _ in requests]
    out_lens = [n for _, n in requests]
    assert 50 <= min(in_lens) < 60 and 140 < max(in_lens) <= 150
    assert 10 <= min(out_lens) and max(out_lens) <= 30
    assert all(0 <= t < 50 for p, _ in requests for t in p)
    fixed = random_requests(random.Random(0), 5, 100, 20, 0.0, 0, 50)
    assert {(len(p), n) for p, n in fixed} == {(100, 20)}


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_average_one_over_the_rate(burstiness):
    rng = random.Random(0)
    gaps = [arrival_gap(rng, 4.0, burstiness) for _ in range(20000)]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    # Lower burstiness, more spread: the coefficient of variation is 1/sqrt(burstiness).
    assert statistics.pstdev(gaps) / 0.25 == pytest.approx(burstiness ** -0.5, rel=0.1)


def test_result_file_name_as_vllm():
    parser = argparse.ArgumentParser()
    add_bench_serve_args(parser)
    args = parser.parse_args(["--save-result", "--result-dir", "/tmp/r", "--max-concurrency",
                              "8"])
    path = result_path(args, "org/Model-7B", [4.0])
    assert path.startswith("/tmp/r/vllm-4qps-concurrency8-Model-7B-") and path.endswith(".json")
    args = parser.parse_args(["--save-result", "--result-filename", "x.json"])
    assert result_path(args, "m", [float("inf")]) == "./x.json"
    args = parser.parse_args(["--save-result", "out.json", "--result-dir", "/elsewhere"])
    assert result_path(args, "m", [1.0]) == "out.json"  # an explicit path wins, as before
