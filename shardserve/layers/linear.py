"""Tensor-parallel linear layers (Megatron-LM / vLLM names and sharding).

    ColumnParallelLinear   W [out, in] split by rows (output features): rank r holds
                           W[r*out/tp:(r+1)*out/tp]; the output stays split unless gather_output.
    RowParallelLinear      W split by columns (input features); each rank's partial product is
                           summed with all_reduce, so the output is whole on every rank.

A column layer followed by a row layer (qkv -> o, gate_up -> down) needs one all_reduce and no
gather. Every parameter carries `weight_loader(param, loaded_weight[, shard_id])`, which narrows
the checkpoint tensor to this rank's part before reading it (see weight_utils).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_tp_group
from shardserve.layers.linear_op import linear
from shardserve.layers.quantization import Fp8Linear, current_quantization
from shardserve.layers.weight_utils import (LoadedWeight, check_full_size, copy_weight,
                                            default_weight_loader, narrow_weight,
                                            set_weight_attrs)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by tensor parallel size "
                         f"{denominator}.")
    return numerator // denominator


class LinearBase(nn.Module):
    """Holds `weight` [output_size_per_partition, input_size_per_partition] and optional bias."""

    def __init__(self, input_size: int, output_size: int, bias: bool,
                 params_dtype: torch.dtype | None, input_size_per_partition: int,
                 output_size_per_partition: int, shard_output: bool, shard_input: bool,
                 quantizable: bool = False) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        dtype = params_dtype or torch.get_default_dtype()
        # --quantization fp8 (layers/quantization.py): FP8 weight and per-row group scales.
        self.quant = Fp8Linear() if quantizable and current_quantization() == "fp8" else None
        if self.quant is not None:
            self.quant.create_weights(self, output_size_per_partition, input_size_per_partition)
        else:
            # Inference only: no grads, and no init since the loader overwrites every value.
            self.weight = nn.Parameter(
                torch.empty(output_size_per_partition, input_size_per_partition, dtype=dtype),
                requires_grad=False)
        weight_attrs: dict[str, Any] = {"weight_loader": self.weight_loader}
        if shard_output:
            weight_attrs["output_dim"] = 0
        if shard_input:
            weight_attrs["input_dim"] = 1
        set_weight_attrs(self.weight, weight_attrs)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size_per_partition, dtype=dtype),
                                     requires_grad=False)
            bias_attrs: dict[str, Any] = {"weight_loader": self.weight_loader}
            if shard_output:
                bias_attrs["output_dim"] = 0
            set_weight_attrs(self.bias, bias_attrs)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        if self.quant is not None and param is self.weight:
            self.quant.load(self, 0, param.shape[0], loaded_weight, 0, 0)
        else:
            default_weight_loader(param, loaded_weight)

    def apply_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x, bias)
        return linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
                f"bias={self.bias is not None}, tp_size={self.tp_size}"
                f"{', fp8' if self.quant is not None else ''}")


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: torch.dtype | None = None, quantizable: bool = False) -> None:
        super().__init__(input_size, output_size, bias, params_dtype, input_size, output_size,
                         shard_output=False, shard_input=False, quantizable=quantizable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_linear(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Y = XA + b with A split along its output features; Y is split too unless gather_output."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: torch.dtype | None = None,
                 output_size_per_partition: int | None = None, quantizable: bool = False) -> None:
        tp_size = get_tp_group().world_size
        if output_size_per_partition is None:
            output_size_per_partition = divide(output_size, tp_size, "output_size")
        super().__init__(input_size, output_size, bias, params_dtype, input_size,
                         output_size_per_partition, shard_output=True, shard_input=False,
                         quantizable=quantizable)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        check_full_size(loaded_weight, 0, self.output_size)
        size = param.shape[0]
        self._load_rows(param, loaded_weight, 0, size, self.tp_rank * size)

    def _load_rows(self, param: nn.Parameter, loaded_weight: LoadedWeight, dst_start: int,
                   size: int, src_start: int) -> None:
        """param[dst_start:+size] = checkpoint[src_start:+size] (rows, i.e. output features)."""
        if self.quant is not None and param is self.weight:
            self.quant.load(self, dst_start, size, loaded_weight, src_start, 0)
            return
        copy_weight(param.data.narrow(0, dst_start, size),
                    narrow_weight(loaded_weight, 0, src_start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.apply_linear(x, self.bias)
        if self.gather_output:
            out = get_tp_group().all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices with the same input, stored stacked (gate and up).

    Each rank holds its slice of every part, in order:
        weight rows [gate_r | up_r]      with gate_r = gate[r*g/tp:(r+1)*g/tp]
    The checkpoint stores them apart, so `weight_loader` takes a shard_id (0, 1, ...);
    shard_id None loads a checkpoint tensor that is already stacked.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 params_dtype: torch.dtype | None = None, quantizable: bool = False) -> None:
        tp_size = get_tp_group().world_size
        self.output_sizes = list(output_sizes)
        self.shard_sizes = [divide(size, tp_size, "output_size") for size in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, False, params_dtype,
                         output_size_per_partition=sum(self.shard_sizes),
                         quantizable=quantizable)

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: int | None = None) -> None:
        shard_ids = range(len(self.output_sizes)) if shard_id is None else [shard_id]
        check_full_size(loaded_weight, 0, sum(self.output_sizes) if shard_id is None
                        else self.output_sizes[shard_id])
        for i in shard_ids:
            # A stacked checkpoint tensor holds the whole of parts 0..i-1 before part i.
            src_base = sum(self.output_sizes[:i]) if shard_id is None else 0
            size = self.shard_sizes[i]
            self._load_rows(param, loaded_weight, sum(self.shard_sizes[:i]), size,
                            src_base + self.tp_rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k, v projection, split by attention heads.

        weight rows on rank r:  [q heads of r | k heads of r | v heads of r]

    Query heads split evenly. KV heads split evenly while tp_size <= num_kv_heads; beyond,
    each KV head is replicated on tp_size // num_kv_heads consecutive ranks, so rank r holds
    KV head r // (tp_size // num_kv_heads) (the query heads of a group stay with their KV head).
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True,
                 params_dtype: torch.dtype | None = None, quantizable: bool = False) -> None:
        tp_size = get_tp_group().world_size
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads,
                                               "(num_key_value_heads divides) tp size")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        super().__init__(hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_size,
                         bias, False, params_dtype,
                         output_size_per_partition=self.q_size + 2 * self.kv_size,
                         quantizable=quantizable)

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: str | None = None) -> None:
        total_q = self.total_num_heads * self.head_size
        total_kv = self.total_num_kv_heads * self.head_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        # shard -> (offset on this rank, size, start in its own checkpoint tensor,
        #           start of that tensor inside a fused qkv checkpoint tensor)
        layout = {
            "q": (0, self.q_size, self.tp_rank * self.q_size, 0),
            "k": (self.q_size, self.kv_size, kv_rank * self.kv_size, total_q),
            "v": (self.q_size + self.kv_size, self.kv_size, kv_rank * self.kv_size,
                  total_q + total_kv),
        }
        if shard_id is not None and shard_id not in layout:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}.")
        check_full_size(loaded_weight, 0, {"q": total_q, "k": total_kv, "v": total_kv,
                                           None: total_q + 2 * total_kv}[shard_id])
        for sid in ([shard_id] if shard_id is not None else ["q", "k", "v"]):
            dst_start, size, src_start, fused_base = layout[sid]
            if shard_id is None:
                src_start += fused_base
            self._load_rows(param, loaded_weight, dst_start, size, src_start)


class RowParallelLinear(LinearBase):
    """Y = XA + b with A split along its input features; partial products are all-reduced.

    input_is_parallel: X arrives already split (the output of a column-parallel layer);
    otherwise each rank takes its slice. The bias is added once, after the reduce. With
    reduce_results=False the caller reduces later, so only TP rank 0 adds the bias.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True,
                 params_dtype: torch.dtype | None = None, quantizable: bool = False) -> None:
        tp_size = get_tp_group().world_size
        super().__init__(input_size, output_size, bias, params_dtype,
                         divide(input_size, tp_size, "input_size"), output_size,
                         shard_output=False, shard_input=True, quantizable=quantizable)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        input_dim = getattr(param, "input_dim", None)
        if input_dim is None:  # the bias: whole on every rank
            default_weight_loader(param, loaded_weight)
            return
        check_full_size(loaded_weight, input_dim, self.input_size)
        size = param.shape[input_dim]
        if self.quant is not None:
            self.quant.load(self, 0, param.shape[0], loaded_weight, 0, self.tp_rank * size)
            return
        copy_weight(param.data, narrow_weight(loaded_weight, input_dim, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            size = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * size, size)
        if self.tp_size == 1:
            return self.apply_linear(x, self.bias)
        out = self.apply_linear(x, None)
        if self.reduce_results:
            out = get_tp_group().all_reduce(out)
            if self.bias is not None:
                out = out + self.bias
        elif self.bias is not None and self.tp_rank == 0:
            out = out + self.bias
        return out
