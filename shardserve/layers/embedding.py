"""Vocabulary-parallel token embedding and LM head (Megatron-LM / vLLM names).

The vocabulary is padded to a multiple of `padding_size` and split into tp_size equal row
ranges; rank r holds rows [r*V/tp, (r+1)*V/tp) of the padded table:

    padded vocab  |  rank 0 rows  |  rank 1 rows  |...|  last rank rows ... padding |

Rows past the real vocabulary are zero and their logits are cut off before anyone sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.layers.linear_op import linear
from shardserve.layers.weight_utils import (LoadedWeight, copy_weight, narrow_weight,
                                            set_weight_attrs, weight_shape)

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, padding_size: int = DEFAULT_VOCAB_PADDING_SIZE) -> int:
    return -(-vocab_size // padding_size) * padding_size


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; a token's vector comes from the one rank
    that holds its row (the others contribute zeros to the all_reduce)."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.num_embeddings = num_embeddings  # the real vocabulary
        self.embedding_dim = embedding_dim
        # Pad to padding_size * tp_size so every rank's range is equal and aligned.
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype),
            requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader, "output_dim": 0})

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        rows = weight_shape(loaded_weight)[0]
        if rows > self.num_embeddings_padded:
            raise ValueError(f"Checkpoint vocabulary {rows} is larger than the model's "
                             f"{self.num_embeddings} (padded {self.num_embeddings_padded}).")
        if rows < self.num_embeddings:
            # The missing rows would be zero vectors: tokens the model silently cannot see.
            raise ValueError(f"Checkpoint vocabulary {rows} is smaller than the model's "
                             f"vocab_size {self.num_embeddings}.")
        num_real = max(0, min(self.vocab_end_index, rows) - self.vocab_start_index)
        with torch.no_grad():
            param.data[num_real:].zero_()
        if num_real:
            copy_weight(param.data[:num_real],
                        narrow_weight(loaded_weight, 0, self.vocab_start_index, num_real))

    @property
    def returns_partial_sum(self) -> bool:
        """Under TP, forward(ids, reduce=False) is this rank's partial sum (models/pipeline.py
        lets the first layer's norm reduce it, models/decoder_layer.py)."""
        return self.tp_size > 1

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The embeddings of input_ids; under TP with reduce=False only the rows this rank
        holds (zeros for the others), to be all-reduced by the caller."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        if input_ids.is_cuda:
            # One kernel instead of torch's six (kernels/vocab_embedding.py).
            from shardserve.kernels.vocab_embedding import vocab_embedding
            out = vocab_embedding(input_ids, self.weight, self.vocab_start_index)
        else:
            in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index) * in_range
            out = F.embedding(local_ids, self.weight)
            out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out) if reduce else out

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings}, padded={self.num_embeddings_padded}, "
                f"per_partition={self.num_embeddings_per_partition}, dim={self.embedding_dim}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to the vocabulary, split like the embedding. `compute_logits`
    turns hidden states into full-vocabulary logits; it is not a forward()."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: torch.dtype | None = None,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, padding_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition,
                                                 dtype=self.weight.dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader, "output_dim": 0})
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share the embedding's table (tie_word_embeddings): same sharding, one parameter."""
        if embed_tokens.weight.shape != self.weight.shape:
            raise ValueError("Tied LM head and embedding must have the same shape and padding.")
        self.weight = embed_tokens.weight
        return self

    def compute_logits(self, hidden_states: torch.Tensor,
                       gather_all: bool = True) -> torch.Tensor | None:
        """[T, hidden] -> [T, vocab] float32 logits over the whole vocabulary.

        gather_all: every TP rank gets them (an all_gather). False: only TP rank 0 does (a
        gather; the others get None), which is all serving needs, as one rank samples.
        Every TP rank must call it either way: it is a collective.
        """
        logits, _, _ = self.compute_logits_shard(hidden_states)
        tp = get_tp_group()
        logits = tp.all_gather(logits, dim=-1) if gather_all else tp.gather(logits, 0, dim=-1)
        if logits is None:
            return None
        return logits[..., :self.num_embeddings].float()

    def compute_logits_shard(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """This rank's logits [T, per_partition] in the model's dtype, not gathered (for
        sampling from shards, layers/sampler.py), with the global id of its first token and
        how many of its columns are real tokens (the rest is vocabulary padding)."""
        logits = linear(hidden_states, self.weight, self.bias)
        num_valid = max(0, min(self.num_embeddings - self.vocab_start_index,
                               self.num_embeddings_per_partition))
        return logits, self.vocab_start_index, num_valid

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead has no forward(); call compute_logits(hidden_states).")
