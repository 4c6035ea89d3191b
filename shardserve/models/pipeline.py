"""Pipeline stages of a decoder model: which parts one stage builds, and what passes between
stages.

    stage 0            stage 1 ..            stage P-1
    embed_tokens  ─▶   layers [s1, e1)  ─▶   layers [sP, eP)
    layers [0, e0)                           norm, lm_head (compute_logits, sampling)
          └── hidden states + residual [T, hidden] (send/recv over get_pp_group()) ──┘

A stage builds only its own parts; the others are `PPMissingLayer` placeholders without
parameters, so their weights are never allocated nor loaded (`StageLayout.owns_weight` filters
the checkpoint) and the runner's KV cache, made from the attention layers it finds, holds only
this stage's layers. Layer indices stay global (`model.layers.17` is layer 17 on any stage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class PPMissingLayer(nn.Identity):
    """Stands in for a part another pipeline stage holds (no parameters, no buffers)."""


def stage_lm_head(hf_config: Any, dtype: torch.dtype | None, model: nn.Module,
                  tie_word_embeddings: bool) -> nn.Module:
    """The LM head on the last stage (sharing the embedding's table when the checkpoint ties
    them and this stage holds both), a stand-in on the others."""
    from shardserve.layers.embedding import ParallelLMHead

    if not model.stage.is_last:
        return PPMissingLayer()
    head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, params_dtype=dtype)
    if tie_word_embeddings and model.stage.is_first:
        head.tie_weights(model.embed_tokens)
    return head


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: its layer range [start_layer, end_layer) and whether it is the
    first (embedding) and/or the last (final norm, LM head)."""

    start_layer: int
    end_layer: int
    is_first: bool = True
    is_last: bool = True

    @classmethod
    def whole(cls, num_layers: int) -> "StageLayout":
        return cls(0, num_layers, True, True)

    def has_layer(self, index: int) -> bool:
        return self.start_layer <= index < self.end_layer

    def owns_weight(self, name: str, tied_embeddings: bool = False) -> bool:
        """Whether a checkpoint tensor (Hugging Face name) is this stage's to load. A tied LM
        head on a last stage that is not also the first is loaded from the embedding's name."""
        m = _LAYER.match(name)
        if m:
            return self.has_layer(int(m.group(1)))
        if name.startswith("model.embed_tokens."):
            return self.is_first or (self.is_last and tied_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.is_last
        return True


def make_layers(num_layers: int, stage: StageLayout,
                build: Callable[[int], nn.Module]) -> nn.ModuleList:
    """The decoder layers, built for this stage's range and placeholders elsewhere."""
    return nn.ModuleList(build(i) if stage.has_layer(i) else PPMissingLayer()
                         for i in range(num_layers))


@dataclass
class IntermediateTensors:
    """What a non-last stage hands on: hidden states and the residual stream, both
    [num_tokens, hidden_size] in the model's dtype."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


def run_stage(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
              intermediate: IntermediateTensors | None) -> torch.Tensor | IntermediateTensors:
    """The forward of a Llama-style decoder model (`embed_tokens`, `layers`, `norm`,
    `stage`) over its stage: the final hidden states on the last stage, else the
    IntermediateTensors for the next one."""
    stage: StageLayout = model.stage
    # Whether hidden_states is a TP partial sum the next norm all-reduces (decoder_layer.py).
    partial = False
    if stage.is_first:
        # Under TP the embedding's partial sum: the first layer's norm reduces it.
        partial = model.embed_tokens.returns_partial_sum
        hidden_states = model.embed_tokens(input_ids, reduce=not partial)
        residual: torch.Tensor | None = None
    else:
        assert intermediate is not None, "a non-first pipeline stage needs the previous one's output"
        hidden_states, residual = intermediate.hidden_states, intermediate.residual
    for layer in model.layers[stage.start_layer:stage.end_layer]:
        hidden_states, residual = layer(positions, hidden_states, residual, partial)
        partial = layer.output_is_partial
    if not stage.is_last:
        if partial:  # the next stage gets whole hidden states
            hidden_states = get_tp_group().all_reduce(hidden_states)
        return IntermediateTensors(hidden_states, residual)
    if residual is None:  # a stage of no layers
        if partial:
            hidden_states = get_tp_group().all_reduce(hidden_states)
        return model.norm(hidden_states)
    hidden_states, _ = model.norm(hidden_states, residual, reduce_partial=partial)
    return hidden_states


def tied_head_weight_name(name: str, stage: StageLayout, tied: bool) -> str | None:
    """Checkpoint-name routing for tied embeddings: on a stage holding the embedding the head
    shares it (lm_head.* is skipped: None); on a last stage without the embedding the head is
    its own parameter, loaded from the embedding's tensor. Other names pass unchanged."""
    if not tied:
        return name
    if name.startswith("lm_head."):
        return None
    if name.startswith("model.embed_tokens.") and not stage.is_first:
        return "lm_head." + name[len("model.embed_tokens."):]
    return name


def stage_of(kwargs_stage: Any, num_layers: int) -> StageLayout:
    return kwargs_stage if kwargs_stage is not None else StageLayout.whole(num_layers)


class StageDecoderModel(nn.Module):
    """Embedding (first stage only), this stage's decoder layers, final norm (last stage only):
    the body every supported family shares. `make_layer(i)` builds decoder layer i."""

    def __init__(self, config: Any, dtype: torch.dtype | None, stage: StageLayout | None,
                 make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        # Imported here: layers/ must not import models/, and this module is imported early.
        from shardserve.layers.embedding import VocabParallelEmbedding
        from shardserve.layers.layernorm import RMSNorm

        self.stage = stage = stage_of(stage, config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
                             if stage.is_first else PPMissingLayer())
        self.layers = make_layers(config.num_hidden_layers, stage, make_layer)
        self.start_layer, self.end_layer = stage.start_layer, stage.end_layer
        self.norm = (RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
                     if stage.is_last else PPMissingLayer())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None
                ) -> torch.Tensor | IntermediateTensors:
        return run_stage(self, input_ids, positions, intermediate)
