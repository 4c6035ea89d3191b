"""shardserve/loader/source.py: what a --model value names, and what to do when it names nothing."""

import pytest

from shardserve.errors import ModelLoadError
from shardserve.loader.source import resolve_model_source


def test_a_hub_id_says_there_is_no_download_and_how_to_fetch_it():
    # `vllm serve ORG/NAME` downloads; with no hub here the message must say what to do instead.
    with pytest.raises(ModelLoadError, match="does not download from the Hugging Face Hub") as err:
        resolve_model_source("meta-llama/Llama-3.1-8B-Instruct")
    assert "huggingface-cli download meta-llama/Llama-3.1-8B-Instruct" in str(err.value)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing/dir", "missing"])
def test_a_missing_path_is_not_taken_for_a_hub_id(path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        resolve_model_source(path)
    assert "Hub" not in str(err.value)
