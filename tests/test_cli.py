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
    import pytest

    from shardserve.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--swap-space", "4", "--max-model-len", "512"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: shardserve serve" in err  # the command's usage, not the top level's
    assert "--swap-space is a vLLM flag shardserve does not take" in err
    assert "unrecognized arguments: 4" not in err  # its value is not a second complaint


def test_a_mistyped_flag_gets_the_nearest_one(capsys):
    import pytest

    from shardserve.cli import main
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--batchsize", "3"])
    err = capsys.readouterr().err
    assert "usage: shardserve bench latency" in err
    assert "did you mean --batch-size?" in err
