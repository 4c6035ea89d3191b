"""shardserve/cli.py: the command line itself."""

from shardserve.cli import build_parser


def test_log_level_is_accepted_after_the_command_too():
    parser = build_parser()
    assert parser.parse_args(["serve", "--log-level", "info"]).log_level == "info"
    assert parser.parse_args(["--log-level", "debug", "serve"]).log_level == "debug"
    assert parser.parse_args(["serve"]).log_level == "WARNING"
