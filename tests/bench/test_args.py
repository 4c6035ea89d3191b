"""The bench commands refuse bad arguments at once: before a model loads or a server takes
any load, with one line naming the flag (these were tracebacks, empty runs, or results lost
after the whole run)."""

import socket

import pytest

from shardserve.cli import main


@pytest.mark.parametrize("argv,message", [
    (["throughput", "--num-prompts", "0"], "argument --num-prompts: must be at least 1, got 0"),
    (["throughput", "--input-len", "-5"], "argument --input-len: must be at least 1"),
    (["latency", "--num-iters", "0"], "argument --num-iters: must be at least 1"),
    (["latency", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["latency", "--num-iters-warmup", "-1"], "argument --num-iters-warmup: must not be negative"),
    (["serve", "--max-concurrency", "-1"], "argument --max-concurrency: must be at least 1"),
    (["serve", "--num-prompts", "0"], "argument --num-prompts: must be at least 1"),
])
def test_sizes_below_one_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["throughput", "--output-json", "/no/such/dir/r.json", "--model", "/no/such/model"],
    ["latency", "--output-json", "/no/such/dir/r.json", "--model", "/no/such/model"],
    ["serve", "--save-result", "/no/such/dir/r.json", "--base-url", "http://127.0.0.1:1"],
])
def test_an_output_file_in_a_missing_folder_fails_before_the_run(argv, capsys):
    # Checked before the model path (which does not exist either) and before any request.
    assert main(["bench", *argv]) == 2
    assert "its folder /no/such/dir does not exist" in capsys.readouterr().err


def test_bench_serve_without_a_server_says_so(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot read http://127.0.0.1:{port}/v1/models (ConnectError" in err
    assert "Traceback" not in err
