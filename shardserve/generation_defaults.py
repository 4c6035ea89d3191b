"""The sampling defaults a model's creator recommends in its generation_config.json (vLLM's
`--generation-config auto`, its default): they fill what a request leaves unset, so
`LLM.generate(prompts)` samples as the model card says (e.g. Qwen3's temperature 0.6, top_p
0.95, top_k 20), as it does under vLLM. `--generation-config vllm` ignores the file.
`--override-generation-config '{"temperature": 0.5}'` sets fields over the file's (or alone,
with `vllm`), as vLLM's flag of that name does."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shardserve.errors import InvalidRequestError, ModelLoadError

logger = logging.getLogger(__name__)

# generation_config.json's keys that become SamplingParams defaults (vLLM's list);
# max_new_tokens is Hugging Face's name for max_tokens.
_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def load_generation_defaults(generation_config: str, model_folder: Path | None,
                             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams keyword arguments from generation_config.json: 'auto' reads the model's
    folder, 'vllm' gives none, anything else is a folder holding the file; `overrides` (the
    same keys) win over the file's."""
    defaults = _file_defaults(generation_config, model_folder)
    if overrides:
        if not isinstance(overrides, dict):
            raise InvalidRequestError("override_generation_config must be a JSON object such as "
                                      f'{{"temperature": 0.5}}; got {overrides!r}.',
                                      "override_generation_config")
        unknown = sorted(set(overrides) - set(_KEYS))
        if unknown:
            # vLLM drops them silently; a typo should not pass unnoticed.
            raise InvalidRequestError(f"override_generation_config: {', '.join(unknown)} "
                                      f"cannot be set; the fields are {', '.join(_KEYS)}.",
                                      "override_generation_config")
        picked = {k: v for k, v in overrides.items() if v is not None}
        if "max_new_tokens" in picked:
            picked["max_tokens"] = picked.pop("max_new_tokens")
        defaults.update(picked)
        logger.warning("Sampling defaults overridden (--override-generation-config): %s",
                       ", ".join(f"{k}={v}" for k, v in picked.items()))
    return defaults


def _file_defaults(generation_config: str, model_folder: Path | None) -> dict[str, Any]:
    if not isinstance(generation_config, str) or not generation_config:
        raise InvalidRequestError("generation_config must be 'auto', 'vllm' or a folder holding "
                                  f"a generation_config.json; got {generation_config!r}.",
                                  "generation_config")
    if generation_config == "vllm":
        return {}
    if generation_config == "auto":
        if model_folder is None:
            return {}
        file = Path(model_folder) / "generation_config.json"
        if not file.is_file():
            return {}
    else:
        file = Path(generation_config).expanduser() / "generation_config.json"
        if not file.is_file():
            raise InvalidRequestError(f"generation_config={generation_config!r} holds no "
                                      "generation_config.json; pass 'auto' (the model's), "
                                      "'vllm' (none) or a folder that has one.",
                                      "generation_config")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot read {file}: {err}") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object.")
    defaults = {key: data[key] for key in _KEYS if data.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    if defaults:
        logger.warning("Sampling defaults come from %s: %s. Requests that leave these unset get "
                       "them; pass --generation-config vllm to use vLLM's own defaults instead.",
                       file, ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults
