"""Compile the Triton kernels of prompt steps at start-up, not during the first requests.

Triton compiles a kernel the first time it meets a new set of constexprs: the prefill kernel
with and without decode rows beside it (SKIP_DECODES), the decode kernel with and without key
splits (SPLIT), an fp8 cache's variants. The profiling forward runs without a KV cache (no
attention) and CUDA graphs capture only decode steps, so until this ran at start-up a fresh
process compiled them inside its first prompt steps: its first requests waited seconds, after
/health already said ready (on an H200, `bench throughput` 1000 x (1000 in / 1000 out) finished
its first 256 requests about 5 s later than the next 256; BENCHMARKS.md, session 7).

Three eager forwards over made-up metadata reach those variants:

    step                      query tokens   context   max_seq_len (host)   kernels
    a prompt alone            17             17        17                   prefill
    a prompt and a decode     16 + 1         16, 1     16                   prefill skipping decodes, decode
    one decode, long bound    1              1         max_model_len        decode with key splits

Every slot is -1, so nothing is written to the cache; block tables point at block 0, which is
read and not changed. Under tensor parallelism every rank runs the same forwards (their
all-reduces pair up); a later pipeline stage starts from zeros, as the profiling forward does.
The integer arguments that vary from step to step (request counts, block-table widths, split
counts) are marked do_not_specialize in the kernels, so these compiles are the ones real steps
reuse.
"""

from __future__ import annotations

import time

import torch

from shardserve.forward_context import AttentionMetadata, set_forward_context
from shardserve.models.pipeline import IntermediateTensors, StageLayout

# (query tokens, context tokens) per request, and the max_seq_len the host passes.
_STEPS = (
    ([(17, 17)], None),
    ([(16, 16), (1, 1)], None),
    ([(1, 1)], "max_model_len"),
)


def warm_up_step_kernels(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                         hidden_size: int, block_size: int, max_model_len: int,
                         stage: StageLayout | None = None) -> float:
    """Run the steps above through the model (KV cache bound); returns the seconds taken."""
    start = time.perf_counter()
    with torch.inference_mode():
        for requests, bound in _STEPS:
            md = _metadata(requests, block_size,
                           max_model_len if bound else max(c for _, c in requests), device)
            num_tokens = md.query_start_loc_cpu[-1]
            ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
            positions = torch.cat([torch.arange(c - q, c, device=device) for q, c in requests])
            received = None
            if stage is not None and not stage.is_first:
                zeros = torch.zeros(num_tokens, hidden_size, dtype=dtype, device=device)
                received = IntermediateTensors(zeros, zeros.clone())
            with set_forward_context(md):
                model(ids, positions, received)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _metadata(requests: list[tuple[int, int]], block_size: int, max_seq_len: int,
              device: torch.device) -> AttentionMetadata:
    qsl = [0]
    for q, _ in requests:
        qsl.append(qsl[-1] + q)
    ctx = [c for _, c in requests]
    width = -(-max(ctx) // block_size)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return AttentionMetadata(
        query_start_loc=as_int32(qsl), seq_lens=as_int32(ctx),
        block_tables=torch.zeros(len(requests), width, dtype=torch.int32, device=device),
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.long, device=device),
        max_query_len=max(q for q, _ in requests), max_seq_len=max_seq_len,
        query_start_loc_cpu=qsl, seq_lens_cpu=ctx)
