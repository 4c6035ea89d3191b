"""Engine flags: --async-scheduling is a tri-state (unset: decided at start-up from the device
and the layout), and resolve() turns it on for CUDA without pipeline parallelism only."""

from __future__ import annotations

import argparse
import re

import pytest

from shardserve.config import EngineConfig
from shardserve.engine_args import add_engine_args


@pytest.mark.parametrize("argv,expected", [
    ([], None), (["--async-scheduling"], True), (["--async-scheduling", "false"], False),
    (["--no-async-scheduling"], False),
])
def test_async_scheduling_flag(argv, expected):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(argv).async_scheduling is expected


@pytest.mark.parametrize("argv,expected", [
    ([], None), (["--served-model-name", "org/m"], ["org/m"]),
    (["--served-model-name", "org/m", "m", "--max-model-len", "64"], ["org/m", "m"]),
    (["--served-model-name=org/m"], ["org/m"]),
])
def test_served_model_name_takes_several(argv, expected):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(argv).served_model_name == expected


def test_trust_remote_code_is_a_documented_no_op_flag():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--trust-remote-code"]).trust_remote_code is True
    assert parser.parse_args([]).trust_remote_code is False
    assert "ignored" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("kwargs,expected", [
    ({}, False),  # CPU: lock-step unless asked
    ({"async_scheduling": True}, True),
    ({"async_scheduling": True, "pipeline_parallel_size": 2}, False),  # micro-batches instead
])
def test_async_scheduling_resolves(tiny_model_dirs, kwargs, expected):
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu", **kwargs)
    assert config.resolve().scheduler_config.async_scheduling is expected


def test_tensor_parallel_size_that_does_not_split_the_model_is_refused_at_once(tmp_path):
    """SmolLM2-135M has 9 heads over 3 KV heads: TP 2 is refused while resolving the config,
    before any worker process starts, naming the sizes that fit."""
    import time

    from shardserve import LLM
    from shardserve.errors import InvalidRequestError

    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match=r"9 attention heads .*Sizes that fit: 1, 3\.") as err:
        LLM(None, tensor_parallel_size=2, device="cpu", dtype="float32")
    assert err.value.param == "tensor_parallel_size"
    assert time.monotonic() - start < 30


def test_expert_parallel_with_fewer_experts_than_ranks_is_refused_at_once(tmp_path):
    """Experts that do not divide over the expert-parallel ranks are split as vLLM splits them
    (6 over 4: 2, 2, 1, 1); fewer experts than ranks are refused while resolving the config
    (not by a worker after every process started), naming the flag and the sizes that fit.
    Without expert parallelism the same TP slices the experts' width and is fine."""
    from shardserve.errors import InvalidRequestError
    from shardserve.testing import write_random_model

    kwargs = dict(load_format="dummy", device="cpu", dtype="float32", tensor_parallel_size=4)
    six = write_random_model(tmp_path / "six", preset="tiny-deepseek-v2", weights=False,
                             n_routed_experts=6, n_group=1)
    EngineConfig.from_kwargs(model=str(six), enable_expert_parallel=True, **kwargs).resolve()
    two = write_random_model(tmp_path / "two", preset="tiny-deepseek-v2", weights=False,
                             n_routed_experts=2, n_group=1)
    with pytest.raises(InvalidRequestError,
                       match=r"2 experts cannot be spread over 4 .*--enable-expert-parallel.*"
                             r"Sizes that fit: 1, 2\.") as err:
        EngineConfig.from_kwargs(model=str(two), enable_expert_parallel=True, **kwargs).resolve()
    assert err.value.param == "tensor_parallel_size"
    EngineConfig.from_kwargs(model=str(two), **kwargs).resolve()


def test_expert_parallel_without_experts_is_ignored_with_a_warning(tiny_model_dirs, caplog):
    """As vLLM: a dense model has no experts to place, so the flag does nothing, but the
    user is told (it is often copied from a MoE command line)."""
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      enable_expert_parallel=True)
    with caplog.at_level("WARNING", logger="shardserve.config"):
        config.resolve()
    assert "LlamaForCausalLM has no experts (drop --enable-expert-parallel)" in caplog.text


@pytest.mark.parametrize("tp,dp,says", [
    (1, 2, r"no effect with tensor_parallel_size=1: .* every GPU holds all 8; the 2 "
           r"data-parallel replicas do not share experts"),
    (2, 2, r"splits the 8 experts over each replica's 2 tensor-parallel ranks \(4 per GPU\); "
           r"the 2 data-parallel replicas do not share experts"),
    (1, 1, r"no effect with tensor_parallel_size=1: .* every GPU holds all 8\. To spread")])
def test_expert_parallel_over_one_rank_or_replicas_says_where_the_experts_are(
        tp, dp, says, tmp_path, caplog):
    """vLLM's expert-parallel group spans TP x DP ranks; ours is one engine's TP ranks, as data
    parallel replicas are separate engines. `-dp 2 --enable-expert-parallel` (vLLM's DeepSeek
    recipe) therefore keeps every expert on every replica: said at once, with the flag that
    does spread them (and nothing said when EP splits the experts over one engine's ranks)."""
    from shardserve.testing import write_random_model

    model = write_random_model(tmp_path, preset="tiny-deepseek-v2", weights=False)
    config = EngineConfig.from_kwargs(model=str(model), load_format="dummy", device="cpu",
                                      tensor_parallel_size=tp, data_parallel_size=dp,
                                      enable_expert_parallel=True)
    with caplog.at_level("WARNING", logger="shardserve.config"):
        config.resolve()
    assert re.search(says, caplog.text), caplog.text
    assert "-tp N --enable-expert-parallel" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shardserve.config"):
        EngineConfig.from_kwargs(model=str(model), load_format="dummy", device="cpu",
                                 tensor_parallel_size=2, enable_expert_parallel=True).resolve()
    assert "enable_expert_parallel" not in caplog.text


def test_more_pipeline_stages_than_layers_is_refused_naming_the_flag(tiny_model_dirs):
    from shardserve.errors import InvalidRequestError

    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      pipeline_parallel_size=3)  # 2 layers
    with pytest.raises(InvalidRequestError, match=r"pipeline_parallel_size=3 exceeds this "
                       r"model's 2 layers.*--pipeline-parallel-size 2 or less") as err:
        config.resolve()
    assert err.value.param == "pipeline_parallel_size"


def test_layer_partition_without_pipeline_stages_is_refused():
    from shardserve import LLM
    from shardserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="pipeline_parallel_size is 1") as err:
        LLM(None, pp_layer_partition="10,20", device="cpu", dtype="float32")
    assert err.value.param == "pp_layer_partition"


def test_parallel_size_environment_variables(monkeypatch, capsys):
    """TENSOR_PARALLEL_SIZE is the default of -tp; a bad value is a usage error (exit 2) of a
    command that reads it, not a traceback while the parsers of every command are built."""
    from shardserve.cli import build_parser

    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "2")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).tensor_parallel_size == 2
    assert parser.parse_args(["-tp", "4"]).tensor_parallel_size == 4
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "abc")
    cli = build_parser()  # `plan` and every other command still parse
    assert cli.parse_args(["plan", "--model", "m", "--gpus", "1", "--gpu-memory", "1GiB"]).gpus == 1
    assert cli.parse_args(["serve", "-tp", "4"]).tensor_parallel_size == 4
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["serve"])
    assert exit_.value.code == 2
    # The variable is named, not only the flag the user never typed.
    assert "from $TENSOR_PARALLEL_SIZE='abc': fix or unset it" in capsys.readouterr().err


def test_kv_cache_dtype_flag_takes_vllm_names():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).kv_cache_dtype == "auto"
    assert parser.parse_args(["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_fp8_kv_cache_is_refused_for_latent_attention(tmp_path):
    """DeepSeek's MLA caches one compressed latent per token, which the fp8 path does not cover:
    refused while resolving, naming the setting."""
    from shardserve.errors import InvalidRequestError
    from tests.models.deepseek_checkpoints import save_tiny_deepseek

    save_tiny_deepseek("v2_lite", tmp_path, with_tokenizer=True)
    config = EngineConfig.from_kwargs(model=str(tmp_path), device="cpu", kv_cache_dtype="fp8")
    with pytest.raises(InvalidRequestError, match="multi-head latent") as err:
        config.resolve()
    assert err.value.param == "kv_cache_dtype"


class _FakeGpu:
    def __init__(self, name: str, gib: int):
        self.name, self.total_memory = name, gib * 2**30


@pytest.mark.parametrize("usage,device,gpu,tokens,seqs", [
    # vLLM's offline token budget there; rows stop at the CUDA-graph ladder's top (512)
    ("llm", "cuda", _FakeGpu("NVIDIA H200", 141), 16384, 512),
    ("server", "cuda", _FakeGpu("NVIDIA H200", 141), 8192, 256),
    ("llm", "cuda", _FakeGpu("NVIDIA A100-SXM4-80GB", 80), 8192, 256),  # vLLM measured it slower
    ("llm", "cuda", _FakeGpu("NVIDIA L4", 23), 8192, 256),
    ("llm", "cpu", None, 8192, 256),
])
def test_batch_defaults_follow_usage_context_and_gpu(monkeypatch, usage, device, gpu, tokens,
                                                     seqs):
    import torch

    from shardserve.config_defaults import (DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE,
                                            default_max_num_batched_tokens, default_max_num_seqs)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    assert default_max_num_batched_tokens(usage, device) == tokens
    assert default_max_num_seqs(usage, device) == seqs <= DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE


def test_usage_context_is_set_by_the_entry_point_not_a_flag(tiny_model_dirs):
    """The offline LLM class says "llm", a config from flags (the server) "server"; an
    explicit --max-num-batched-tokens always wins. Not a flag, and not sent to other nodes
    (they get the resolved budget)."""
    from shardserve import LLM

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert "usage_context" not in vars(parser.parse_args([]))
    assert EngineConfig.from_kwargs().scheduler_config.usage_context == "server"
    llm = LLM(tiny_model_dirs["llama"], device="cpu", max_num_batched_tokens=333,
              kv_cache_memory_bytes=2**20)
    sc = llm.config.scheduler_config
    assert (sc.usage_context, sc.max_num_batched_tokens) == ("llm", 333)
    assert sc.max_num_seqs == 256  # the CPU's default, resolved before any reader sees it
    assert "usage_context" not in llm.config.to_kwargs()
    with pytest.raises(Exception, match="usage_context must be"):
        EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                 usage_context="batch").resolve()


def test_every_engine_flag_has_written_help():
    """`serve --help` explains each flag: none falls back to its field name ('max model len')."""
    import dataclasses

    from shardserve.config import DERIVED_FIELDS
    from shardserve.engine_args import _HELP, _SECTIONS

    fields = [f.name for s in _SECTIONS for f in dataclasses.fields(s)
              if f.name not in DERIVED_FIELDS]
    assert [name for name in fields if name not in _HELP] == []


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("32k", 32000), ("32K", 32768), ("25.6k", 25600), ("1.1k", 1100), ("1M", 2**20),
    ("auto", None), ("1.5", None), ("0.5K", 512),
])
def test_max_model_len_takes_vllm_human_readable_counts(text, expected, capsys):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    if expected is None:
        with pytest.raises(SystemExit):
            parser.parse_args(["--max-model-len", text])
        assert "argument --max-model-len: not a" in capsys.readouterr().err
    else:
        assert parser.parse_args(["--max-model-len", text]).max_model_len == expected
