"""shardserve: serve LLMs on one GPU, many GPUs of a node, or many nodes."""

from shardserve.inputs import PromptType, TextPrompt, TokensPrompt
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

# vLLM's top-level names that mean something here, so `from vllm import ...` lines port as-is.
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "PromptType", "TextPrompt", "TokensPrompt", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from shardserve.llm import LLM
        return LLM
    raise AttributeError(name)
