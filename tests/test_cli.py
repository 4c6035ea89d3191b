"""shardserve/cli.py: the command line itself."""

import pytest

from shardserve.cli import build_parser


def test_log_level_is_accepted_after_the_command_too():
    parser = build_parser()
    assert parser.parse_args(["serve", "--log-level", "info"]).log_level == "info"
    assert parser.parse_args(["--log-level", "debug", "serve"]).log_level == "debug"
    assert parser.parse_args(["serve"]).log_level == "WARNING"


def test_random_model_keeps_the_preset_dtype_and_can_skip_weights(tmp_path):
    import json

    from shardserve.cli import main
    assert main(["random-model", "--preset", "llama-3-70b", "--no-weights",
                 "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert config["num_hidden_layers"] == 80
    assert not list((tmp_path / "m").glob("*.safetensors"))


def test_serve_takes_the_model_as_a_positional_argument_as_vllm_does():
    parser = build_parser()
    assert parser.parse_args(["serve", "/models/m", "--port", "9000"]).model_tag == "/models/m"
    assert parser.parse_args(["serve", "--port", "9000"]).model_tag is None


@pytest.mark.parametrize("command", ["serve", "router"])
@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_a_usage_error_before_anything_loads(command, port, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--port", port])
    assert exc.value.code == 2 and "argument --port" in capsys.readouterr().err


def test_serve_refuses_two_different_models(capsys):
    from shardserve.cli import main
    assert main(["serve", "/models/a", "--model", "/models/b"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_serve_positional_model_reaches_the_engine(capsys):
    # The positional is the model the engine loads: a missing one fails as --model would.
    from shardserve.cli import main
    assert main(["serve", "/no/such/model", "--port", "0"]) == 2
    assert "'/no/such/model' does not exist" in capsys.readouterr().err


def test_a_vllm_only_flag_says_what_shardserve_does_instead(capsys):
    from shardserve.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--cpu-offload-gb", "4", "--max-model-len", "512"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: shardserve serve" in err  # the command's usage, not the top level's
    assert "--cpu-offload-gb 4 is a vLLM flag shardserve cannot honour" in err
    assert "unrecognized arguments: 4" not in err  # its value is not a second complaint


def _serve_args(monkeypatch, argv: list[str]):
    """main(["serve", *argv]) up to the point where the server would start: the namespace
    cmd_serve gets, with the positional model taken."""
    import shardserve.cli as cli

    seen = []

    def fake_serve(args):
        cli._take_positional_model(args)
        seen.append(args)
        return 0
    monkeypatch.setattr(cli, "cmd_serve", fake_serve)
    assert cli.main(["serve", *argv]) == 0
    return seen[0]


@pytest.mark.parametrize("flags", [
    # what shardserve does anyway: accepted without a word (Kubernetes manifests carry these)
    ["--disable-log-requests", "--disable-log-stats", "--swap-space", "4",
     "--distributed-executor-backend", "mp", "--tokenizer-mode", "auto", "--response-role",
     "assistant", "--disable-uvicorn-access-log", "--max-logprobs", "20", "--task", "generate"],
])
def test_vllm_flags_that_ask_for_what_shardserve_does_are_accepted(monkeypatch, caplog, flags):
    args = _serve_args(monkeypatch, ["/models/m", *flags, "--max-model-len", "64"])
    assert (args.model, args.max_model_len) == ("/models/m", 64)
    assert not [k for k in vars(args) if k.startswith("vllm_only")]  # none reaches the engine
    assert "Ignoring" not in caplog.text


def test_vllm_tuning_flags_are_ignored_with_a_warning(monkeypatch, caplog):
    # Each consumes its own value: the model after them is still the positional MODEL.
    args = _serve_args(monkeypatch, ["--swap-space", "16", "-O3", "--api-server-count", "2",
                                     "--cuda-graph-sizes", "8", "16", "--enable-log-requests",
                                     "/models/m"])
    assert args.model == "/models/m"
    for shown in ("--swap-space 16", "--compilation-config 3", "--api-server-count 2",
                  "--cuda-graph-sizes 8 16", "--enable-log-requests"):
        assert f"Ignoring the vLLM flag {shown}: " in caplog.text


def test_compilation_config_cuda_graph_keys_reach_the_engine(monkeypatch, caplog):
    args = _serve_args(monkeypatch, ["-O", '{"cudagraph_mode": "FULL_DECODE_ONLY", "level": 3, '
                                     '"max_cudagraph_capture_size": 128}', "/models/m"])
    assert args.model == "/models/m"
    assert args.mixed_cuda_graphs is False and args.max_cuda_graph_batch_size == 128
    assert "Ignoring -O/--compilation-config's level: " in caplog.text


@pytest.mark.parametrize("flags,shown", [
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], "--enable-auto-tool-choice"),
    (["--tool-call-parser", "hermes"], "--tool-call-parser hermes"),
    (["--reasoning-parser", "deepseek_r1"], "--reasoning-parser deepseek_r1"),
    (["--revision", "main"], "--revision main"),
    (["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"], "--ssl-keyfile k.pem"),
    (["--data-parallel-address", "10.0.0.1"], "--data-parallel-address 10.0.0.1"),
    (["--enable-lora", "--lora-modules", "a=/l"], "--enable-lora"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral"),
])
def test_vllm_flags_that_would_change_results_are_refused_in_one_line(capsys, flags, shown):
    from shardserve.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "/models/m", *flags])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"shardserve serve: error: {shown} is a vLLM flag shardserve "
                           "cannot honour: ") and last.endswith("; drop it.")


def test_vllm_spellings_of_engine_flags(monkeypatch):
    """vLLM's parser takes underscores for dashes, --no- forms of every switch, and
    --max-cudagraph-capture-size for our --max-cuda-graph-batch-size."""
    args = _serve_args(monkeypatch, ["/models/m", "--max_model_len", "64",
                                     "--tensor_parallel_size=2", "--no-enforce-eager",
                                     "--no-trust-remote-code", "--no-enable-prefix-caching",
                                     "--max-cudagraph-capture-size", "128"])
    assert (args.max_model_len, args.tensor_parallel_size) == (64, 2)
    assert (args.enforce_eager, args.trust_remote_code, args.enable_prefix_caching) == (
        False, False, False)
    assert args.max_cuda_graph_batch_size == 128


def test_serve_reads_flags_from_a_vllm_config_file(monkeypatch, tmp_path):
    """vllm serve --config FILE: long flag names (dashes or underscores) to values; the command
    line wins, its positional MODEL included; false switches are their --no- form."""
    config = tmp_path / "config.yaml"
    config.write_text("model: /models/from-config\nport: 6379\nmax_model_len: 2048\n"
                      "enable-prefix-caching: false\nenforce-eager: true\n"
                      "served-model-name: [a, b]\ndisable-log-requests: true\n")
    args = _serve_args(monkeypatch, ["--config", str(config)])
    assert (args.model, args.port, args.max_model_len) == ("/models/from-config", 6379, 2048)
    assert (args.enable_prefix_caching, args.enforce_eager) == (False, True)
    assert args.served_model_name == ["a", "b"]
    assert "--model" in args.argv and "--config" not in args.argv  # what -dp replicas re-read
    args = _serve_args(monkeypatch, ["/models/cli", "--config", str(config), "--port", "9000"])
    assert (args.model, args.port, args.served_model_name) == ("/models/cli", 9000, ["a", "b"])


@pytest.mark.parametrize("text,message", [
    (None, "cannot read it"), ("- a\n- b\n", "expected a mapping"), ("a: [\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    from shardserve.cli import main
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_headless_runs_the_ranks_of_nodes_after_the_first(monkeypatch, capsys):
    """vLLM's multi-node lines end in --headless on nodes 1..: that is shardserve's worker.
    On node 0, which always runs the server, it is refused."""
    import shardserve.cli as cli

    monkeypatch.delenv("LWS_WORKER_INDEX", raising=False)
    ran = []
    monkeypatch.setattr(cli, "cmd_worker", lambda args: ran.append(args.node_rank) or 0)
    assert cli.main(["serve", "/models/m", "--nnodes", "2", "--node-rank", "1",
                     "--master-addr", "10.0.0.1", "--headless"]) == 0
    assert ran == [1]
    assert cli.main(["serve", "/models/m", "--headless"]) == 2
    assert "--headless is for nodes 1.." in capsys.readouterr().err


def test_a_mistyped_flag_gets_the_nearest_one(capsys):
    import pytest

    from shardserve.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--batchsize", "3"])
    err = capsys.readouterr().err
    assert "usage: shardserve bench latency" in err
    assert "did you mean --batch-size?" in err


def test_an_on_off_flag_before_the_model_does_not_take_it_as_its_value():
    from shardserve.cli_config import pin_optional_switches
    parser = build_parser()

    def parse(*argv):
        return parser.parse_args(pin_optional_switches(list(argv), parser))
    args = parse("serve", "--enable-prefix-caching", "/models/m", "--port", "9000")
    assert args.model_tag == "/models/m" and args.enable_prefix_caching is True
    args = parse("serve", "--enable-chunked-prefill", "false", "/models/m")
    assert args.model_tag == "/models/m" and args.enable_chunked_prefill is False
    args = parse("serve", "/models/m", "--async-scheduling")
    assert args.async_scheduling is True
    assert parse("serve", "--enable-prefix-caching=off", "/m").enable_prefix_caching is False
