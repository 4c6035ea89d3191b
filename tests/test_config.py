"""EngineConfig.from_kwargs: engine arguments of the wrong type are named up front."""

from __future__ import annotations

import pytest

from shardserve.config import EngineConfig
from shardserve.errors import InvalidRequestError


@pytest.mark.parametrize("kwargs,param", [
    ({"max_model_len": 2.5}, "max_model_len"),
    ({"block_size": "16"}, "block_size"),
    ({"max_num_seqs": True}, "max_num_seqs"),
    ({"enable_prefix_caching": "no"}, "enable_prefix_caching"),
    ({"gpu_memory_utilization": "0.5"}, "gpu_memory_utilization"),
    ({"tensor_parallel_size": "two"}, "tensor_parallel_size"),
])
def test_wrong_types_are_named(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as err:
        EngineConfig.from_kwargs(**kwargs)
    assert err.value.param == param


def test_right_types_pass():
    config = EngineConfig.from_kwargs(max_model_len=None, block_size=8, gpu_memory_utilization=1,
                                      enable_prefix_caching=False, tensor_parallel_size="auto",
                                      async_scheduling=None)
    assert config.cache_config.block_size == 8 and config.cache_config.gpu_memory_utilization == 1
    assert config.parallel_config.tensor_parallel_size == "auto"


def test_trust_remote_code_is_accepted_and_unknown_names_still_refused(tmp_path):
    """vLLM users pass trust_remote_code=True by habit: a documented no-op here (shardserve
    runs only its own model code), while a misspelt argument is still an error."""
    from shardserve import LLM
    from shardserve.errors import ModelLoadError

    assert EngineConfig.from_kwargs(trust_remote_code=True).model_config.trust_remote_code
    with pytest.raises(TypeError, match="trust_remote_cod\\b"):
        EngineConfig.from_kwargs(trust_remote_cod=True)
    # Through LLM(...) too: it gets as far as looking for the model.
    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path / "missing"), device="cpu", trust_remote_code=True)


@pytest.mark.parametrize("value,names", [
    (None, None),  # the model path
    ("org/model", ["org/model"]),
    (["org/model", "alias"], ["org/model", "alias"]),
    (("a", "b"), ["a", "b"]),
])
def test_served_model_names(tiny_model_dirs, value, names):
    model = tiny_model_dirs["llama"]
    mc = EngineConfig.from_kwargs(model=model, device="cpu",
                                  served_model_name=value).resolve().model_config
    assert mc.served_model_names == (names or [model])
    if isinstance(value, str):  # a single name stays a plain string for Python callers
        assert mc.served_model_name == value


@pytest.mark.parametrize("value", [["a", ""], ["a", "a"], [1], 5, ""])
def test_bad_served_model_names(tiny_model_dirs, value):
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      served_model_name=value)
    with pytest.raises(InvalidRequestError) as err:
        config.resolve()
    assert err.value.param == "served_model_name"


def test_negative_max_waiting_requests_is_refused(tiny_model_dirs):
    # It made the server answer 503 with free slots left; 0 (no waiting at all) stays valid.
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_waiting_requests=-1)
    with pytest.raises(InvalidRequestError, match="must not be negative, got -1") as err:
        config.resolve()
    assert err.value.param == "max_waiting_requests"
    EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                             max_waiting_requests=0).resolve()


def test_cuda_graph_size_below_one_is_refused(tiny_model_dirs):
    # 0 built a runner with no decode sizes (an IndexError at start-up on a GPU).
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_cuda_graph_batch_size=0)
    with pytest.raises(InvalidRequestError, match="--enforce-eager") as err:
        config.resolve()
    assert err.value.param == "max_cuda_graph_batch_size"


def test_max_model_len_past_trained_positions(tiny_model_dirs, monkeypatch):
    """As vLLM: a max_model_len past max_position_embeddings (no RoPE scaling) is refused with
    the way out, unless SHARDSERVE_/VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 says run it anyway."""
    from transformers import AutoConfig
    model = tiny_model_dirs["llama"]
    trained = AutoConfig.from_pretrained(model).max_position_embeddings
    for name in ("SHARDSERVE_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        monkeypatch.delenv(name, raising=False)
    config = EngineConfig.from_kwargs(model=model, device="cpu", max_model_len=trained + 1)
    with pytest.raises(InvalidRequestError, match=f"beyond the model's max_position_embeddings "
                                                  f"{trained}.*ALLOW_LONG_MAX_MODEL_LEN=1") as err:
        config.resolve()
    assert err.value.param == "max_model_len"
    assert EngineConfig.from_kwargs(model=model, device="cpu", max_model_len=trained
                                    ).resolve().model_config.max_model_len == trained
    for name in ("SHARDSERVE_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        monkeypatch.setenv(name, "1")
        mc = EngineConfig.from_kwargs(model=model, device="cpu", max_model_len=trained + 1
                                      ).resolve().model_config
        assert mc.max_model_len == trained + 1
        monkeypatch.delenv(name)


@pytest.mark.parametrize("rope, expected", [
    (None, 128),
    # Qwen2.5/Qwen3 model cards add YaRN this way and vLLM serves factor x original tokens
    # (here 4 x 64); it used to default to max_position_embeddings and take any length above.
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    ({"rope_type": "linear", "factor": 2.0}, 256),
    ({"rope_type": "dynamic", "factor": 2.0}, 256),
    # llama3's max_position_embeddings already counts its factor.
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, 128),
])
def test_max_model_len_follows_rope_scaling_as_vllm(tmp_path, monkeypatch, rope, expected):
    import json

    from shardserve.planner.shape import shape_from_config

    for name in ("SHARDSERVE_ALLOW_LONG_MAX_MODEL_LEN", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        monkeypatch.delenv(name, raising=False)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 500,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rope_theta": 10000.0, **({"rope_scaling": rope} if rope else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))

    def resolved(**kwargs):
        return EngineConfig.from_kwargs(model=str(tmp_path), device="cpu", load_format="dummy",
                                        **kwargs).resolve().model_config

    assert resolved().max_model_len == expected
    assert shape_from_config(config).default_max_model_len == expected  # what `plan` assumes
    with pytest.raises(InvalidRequestError, match=f"max_model_len {expected + 1} is beyond the "
                                                  "model's .*ALLOW_LONG_MAX_MODEL_LEN=1"):
        resolved(max_model_len=expected + 1)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert resolved(max_model_len=expected + 1).max_model_len == expected + 1


@pytest.mark.parametrize("value,expected", [([1, 1], "1,1"), ((1, 1), "1,1"), ("1,1", "1,1")])
def test_pp_layer_partition_as_a_list(tiny_model_dirs, value, expected):
    # A Python caller writes the counts as a list; it crashed with AttributeError ('split').
    pc = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                  pipeline_parallel_size=2,
                                  pp_layer_partition=value).resolve().parallel_config
    assert pc.pp_layer_partition == expected


@pytest.mark.parametrize("value", [[1.5, 0.5], 2, ["1", "1"], [True, True]])
def test_bad_pp_layer_partition_type_is_named(tiny_model_dirs, value):
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      pipeline_parallel_size=2, pp_layer_partition=value)
    with pytest.raises(InvalidRequestError, match="layer counts per stage") as err:
        config.resolve()
    assert err.value.param == "pp_layer_partition"


@pytest.mark.parametrize("port", [0, 65532, 99999, -1])
def test_master_port_out_of_range_is_refused(port):
    # ZMQ bound 99999 as 34463 silently: node 0 then waited out the rendezvous timeout.
    config = EngineConfig.from_kwargs(tensor_parallel_size=2, nnodes=2, master_port=port)
    with pytest.raises(InvalidRequestError, match="master_port must be in") as err:
        config.parallel_config.resolve(environ={})
    assert err.value.param == "master_port"
    EngineConfig.from_kwargs(tensor_parallel_size=2, nnodes=2,
                             master_port=65531).parallel_config.resolve(environ={})


@pytest.mark.parametrize("environ,flags,param,message", [
    # A ValueError traceback from int() used to be all a bad variable gave.
    ({"LWS_GROUP_SIZE": "two"}, {}, "nnodes", r"\$LWS_GROUP_SIZE='two' is not an integer"),
    ({"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1st"}, {}, "node_rank",
     r"\$LWS_WORKER_INDEX='1st' is not an integer"),
    # A value the user never passed is named with the variable it came from.
    ({"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "3"}, {}, "node_rank",
     r"got 3 \(from \$LWS_WORKER_INDEX\)\.$"),
    ({"LWS_WORKER_INDEX": "1"}, {"nnodes": 1}, "node_rank",
     r"got 1 \(from \$LWS_WORKER_INDEX\)\.$"),
    ({"LWS_GROUP_SIZE": "3"}, {}, "nnodes", r"nnodes=3 \(from \$LWS_GROUP_SIZE\)\.$"),
    ({"LWS_WORKER_INDEX": "1"}, {"nnodes": 2, "node_rank": 2}, "node_rank", r"got 2\.$"),
])
def test_bad_or_inconsistent_lws_variables_are_named(environ, flags, param, message):
    config = EngineConfig.from_kwargs(tensor_parallel_size=2, **flags)
    with pytest.raises(InvalidRequestError, match=message) as err:
        config.parallel_config.resolve(environ=environ)
    assert err.value.param == param


def test_seed_none_is_vllms_zero(tiny_model_dirs):
    """LLM(seed=None), which vLLM scripts pass, resolves to seed 0 as in vLLM's V1 engine."""
    model = tiny_model_dirs["llama"]
    config = EngineConfig.from_kwargs(model=model, device="cpu", seed=None).resolve()
    assert config.model_config.seed == 0
    with pytest.raises(InvalidRequestError, match="seed"):
        EngineConfig.from_kwargs(model=model, device="cpu", seed="1")

