"""--load-format dummy: random weights from config.json alone (benchmarks of big shapes)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from shardserve import SamplingParams
from shardserve.config import EngineConfig
from shardserve.engine_args import add_engine_args, engine_config_from_args
from shardserve.errors import InvalidRequestError, ModelLoadError
from shardserve.loader.dummy import DUMMY_WEIGHT_RANGE, initialize_dummy_weights
from shardserve.models.llama import LlamaForCausalLM
from shardserve.testing import write_random_model
from tests.device import make_llm


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> str:
    return str(write_random_model(tmp_path_factory.mktemp("dummy") / "llama", preset="tiny",
                                  weights=False))


def test_folder_without_weights_has_config_and_tokenizer_only(config_only_dir):
    names = set(os.listdir(config_only_dir))
    assert {"config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith(".safetensors")]


def test_without_dummy_the_missing_weights_are_an_error_that_names_the_flag(config_only_dir):
    with pytest.raises(ModelLoadError, match="--load-format dummy"):
        EngineConfig.from_kwargs(model=config_only_dir, device="cpu").resolve()


def test_dummy_engine_generates_every_requested_token(config_only_dir):
    llm = make_llm(config_only_dir, load_format="dummy", kv_cache_memory_bytes=32 << 20)
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}, {"prompt_token_ids": [5, 6, 7]}],
                        params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]


def _tiny_model(config_only_dir: str) -> LlamaForCausalLM:
    cfg = EngineConfig.from_kwargs(model=config_only_dir, device="cpu",
                                   load_format="dummy").resolve()
    return LlamaForCausalLM(cfg.model_config.hf_config, dtype=torch.float32)


def test_values_norms_and_determinism(config_only_dir):
    model_a, model_b = _tiny_model(config_only_dir), _tiny_model(config_only_dir)
    names = initialize_dummy_weights(model_a, seed=3)
    initialize_dummy_weights(model_b, seed=3)
    assert names == {n for n, _ in model_a.named_parameters()}
    params_b = dict(model_b.named_parameters())
    for name, param in model_a.named_parameters():
        # Replicated parameters must agree across TP ranks: same name, same seed, same values.
        assert torch.equal(param, params_b[name]), name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1.0), name
        else:
            assert param.abs().max() <= DUMMY_WEIGHT_RANGE, name
            assert param.std() > DUMMY_WEIGHT_RANGE / 4, name  # really drawn, not zeros
    # Another seed, other values; two different parameters are not the same draw.
    model_c = _tiny_model(config_only_dir)
    initialize_dummy_weights(model_c, seed=4)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(dict(model_c.named_parameters())[qkv], params_b[qkv])
    a, b = params_b["model.layers.0.mlp.down_proj.weight"], params_b["model.layers.1.mlp.down_proj.weight"]
    assert not torch.equal(a, b)


def test_load_format_is_checked_against_the_path(config_only_dir, tiny_model_dirs):
    with pytest.raises(InvalidRequestError, match="load_format must be one of"):
        EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                 load_format="pt").resolve()
    with pytest.raises(InvalidRequestError, match="is a Hugging Face folder"):
        EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                 load_format="gguf").resolve()
    cfg = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                   load_format="safetensors").resolve()
    assert cfg.model_config.source.kind == "hf"


def test_cli_flag_has_vllm_name_and_choices(config_only_dir):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", config_only_dir, "--load-format", "dummy"])
    assert engine_config_from_args(args).model_config.load_format == "dummy"
    with pytest.raises(SystemExit):
        parser.parse_args(["--load-format", "npcache"])


def test_dummy_under_tensor_parallelism(config_only_dir):
    """Each rank fills its own shard; the replicated norms match, so the run is consistent."""
    llm = make_llm(config_only_dir, load_format="dummy", tensor_parallel_size=2,
                   kv_cache_memory_bytes=32 << 20)
    try:
        outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=6, ignore_eos=True))
        assert len(outs[0].outputs[0].token_ids) == 6
    finally:
        llm.shutdown()
