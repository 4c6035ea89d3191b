"""shardserve/cli.py: the command line itself."""

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
