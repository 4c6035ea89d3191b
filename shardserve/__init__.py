"""shardserve: serve LLMs on one GPU, many GPUs of a node, or many nodes."""

from shardserve.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from shardserve.llm import LLM
        return LLM
    raise AttributeError(name)
