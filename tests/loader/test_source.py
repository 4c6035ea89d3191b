"""shardserve/loader/source.py: what a --model value names, and what to do when it names nothing."""

import pytest

from shardserve.errors import ModelLoadError
from shardserve.loader.source import resolve_model_source


def test_a_hub_id_says_there_is_no_download_and_how_to_fetch_it():
    # `vllm serve ORG/NAME` downloads; with no hub here the message must say what to do instead.
    with pytest.raises(ModelLoadError, match="does not download from the Hugging Face Hub") as err:
        resolve_model_source("meta-llama/Llama-3.1-8B-Instruct")
    assert "hf download meta-llama/Llama-3.1-8B-Instruct" in str(err.value)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing/dir", "missing"])
def test_a_missing_path_is_not_taken_for_a_hub_id(path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        resolve_model_source(path)
    assert "Hub" not in str(err.value)


def test_a_gguf_folder_with_a_config_json_serves_the_gguf(tmp_path):
    # GGUF repositories often carry the original config.json but no safetensors.
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    source = resolve_model_source(tmp_path)
    assert (source.kind, source.path.name) == ("gguf", "model.Q4_K_M.gguf")
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="several .gguf files.*pass the one to serve"):
        resolve_model_source(tmp_path)
    # Safetensors beside them: the Hugging Face folder, as before.
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_model_source(tmp_path).kind == "hf"


def test_a_bin_only_folder_says_how_to_convert(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors.*save_pretrained"):
        resolve_model_source(tmp_path)
    assert resolve_model_source(tmp_path, weights_needed=False).kind == "hf"


def test_a_hugging_face_cache_folder_names_its_snapshots(tmp_path):
    # huggingface-cli download without --local-dir leaves models--ORG--NAME/snapshots/REV/.
    cache = tmp_path / "models--Qwen--Qwen3-0.6B"
    snapshot = cache / "snapshots" / "c1899de289a04d12100db370d81485cdf75e47ca"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen3"}')
    (snapshot / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="Hugging Face cache folder; pass one of its "
                                             f"snapshots: {snapshot}"):
        resolve_model_source(cache)
    assert resolve_model_source(snapshot).kind == "hf"
