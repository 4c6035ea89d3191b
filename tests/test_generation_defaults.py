"""generation_config.json -> SamplingParams defaults (vLLM's --generation-config)."""

from __future__ import annotations

import json

import pytest

from shardserve.errors import InvalidRequestError, ModelLoadError
from shardserve.generation_defaults import load_generation_defaults


def _write(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_auto_reads_the_sampling_keys_of_the_model_folder(tmp_path):
    folder = _write(tmp_path / "m", temperature=0.6, top_p=0.95, top_k=20, min_p=None,
                    repetition_penalty=1.1, max_new_tokens=128, do_sample=True, eos_token_id=2)
    assert load_generation_defaults("auto", folder) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1,
        "max_tokens": 128}


def test_auto_without_a_file_and_vllm_give_none(tmp_path):
    assert load_generation_defaults("auto", tmp_path) == {}
    assert load_generation_defaults("auto", None) == {}
    assert load_generation_defaults("vllm", _write(tmp_path / "m", temperature=0.6)) == {}


def test_a_folder_of_its_own(tmp_path):
    other = _write(tmp_path / "other", temperature=0.3)
    assert load_generation_defaults(str(other), tmp_path / "model") == {"temperature": 0.3}
    with pytest.raises(InvalidRequestError, match="holds no generation_config.json"):
        load_generation_defaults(str(tmp_path / "missing"), None)
    with pytest.raises(InvalidRequestError, match="generation_config must be"):
        load_generation_defaults("", None)


def test_unreadable_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Cannot read"):
        load_generation_defaults("auto", tmp_path)


def test_overrides_win_over_the_file_and_stand_alone_with_vllm(tmp_path):
    _write(tmp_path, temperature=0.6, top_p=0.95, top_k=20)
    merged = load_generation_defaults("auto", tmp_path, {"temperature": 0.5, "max_new_tokens": 64})
    assert merged == {"temperature": 0.5, "top_p": 0.95, "top_k": 20, "max_tokens": 64}
    assert load_generation_defaults("vllm", tmp_path, {"top_k": 5}) == {"top_k": 5}
    assert load_generation_defaults("auto", tmp_path, {}) == {"temperature": 0.6, "top_p": 0.95,
                                                              "top_k": 20}


def test_an_override_field_that_cannot_be_set_is_named(tmp_path):
    with pytest.raises(InvalidRequestError, match="temprature cannot be set; the fields are"):
        load_generation_defaults("vllm", tmp_path, {"temprature": 0.5})


def test_the_flag_parses_json_objects_only():
    import argparse

    from shardserve.engine_args import add_engine_args, engine_config_from_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--override-generation-config", '{"temperature": 0.5}'])
    assert engine_config_from_args(args).model_config.override_generation_config == {
        "temperature": 0.5}
    for bad in ("temperature=0.5", "[1, 2]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--override-generation-config", bad])
