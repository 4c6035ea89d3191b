"""linear(x, weight, bias): F.linear, except that a single half-precision row on a CUDA device
(batch-1 decode) takes the Triton GEMV (kernels/gemv.py) for the shapes where it is faster.

The choice is measured per shape, not assumed: the first single-row call of an
(N, K, dtype, bias, device) made outside CUDA-graph capture (the graph runner's warm-up
forwards come before each capture) times F.linear and every GEMV configuration on scratch
weights of that shape, with enough copies to overflow the L2 cache so that each read comes
from HBM as in a real step, each replayed as a CUDA graph so that only GPU time counts, and
keeps the fastest. A call during capture before its shape was timed takes F.linear: nothing
can be timed inside a capture.

    SHARDSERVE_GEMV=auto (default) | triton | cublas     force one side (benchmarks, debugging)

Everything else (CPU, float32, several rows) is F.linear, untouched.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

GEMV_ENV = "SHARDSERVE_GEMV"
_HALF = (torch.bfloat16, torch.float16)
SCRATCH_BYTES = 256 << 20  # > 2x the L2 of an H100/H200 (50/60 MB)
TIMING_ROUNDS = 3

# (N, K, dtype, has_bias, device index) -> GemvConfig, or None for F.linear
_choices: dict[tuple, object] = {}


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if (not x.is_cuda or x.dtype not in _HALF or x.numel() != x.shape[-1]
            or weight.dtype != x.dtype or weight.stride(1) != 1):
        return F.linear(x, weight, bias)
    config = _choice(x, weight, bias)
    if config is None:
        return F.linear(x, weight, bias)
    from shardserve.kernels.gemv import gemv
    return gemv(x, weight, bias, config)


def gemv_mode() -> str:
    mode = os.environ.get(GEMV_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "cublas"):
        raise ValueError(f"{GEMV_ENV}={mode!r}: use auto, triton or cublas.")
    return mode


def _choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    n, k = weight.shape
    key = (n, k, x.dtype, bias is not None, x.device.index)
    if key in _choices:
        return _choices[key]
    mode = gemv_mode()
    if mode == "cublas":
        return _choices.setdefault(key, None)
    from shardserve.kernels.gemv import DEFAULT_CONFIG
    if mode == "triton":
        return _choices.setdefault(key, DEFAULT_CONFIG)
    if torch.cuda.is_current_stream_capturing():
        return None  # not kept: timed at the next call outside a capture
    timings = time_candidates(n, k, x.dtype, bias is not None, x.device)
    _choices[key] = choice = min(timings, key=lambda t: t[1])[0] if timings else None
    if timings:
        logger.debug("GEMV [1, %d] x [%d, %d]^T %s: F.linear %.1f us, best Triton %.1f us -> %s",
                     k, n, k, x.dtype, timings[0][1], min(t for _, t in timings[1:]),
                     choice or "F.linear")
    return choice


def time_candidates(n: int, k: int, dtype: torch.dtype, has_bias: bool,
                    device: torch.device) -> list[tuple[object, float]] | None:
    """[(None: F.linear, or a GemvConfig), microseconds a call] for one row against [n, k],
    reading from HBM; None when there is no memory to time it in."""
    from shardserve.kernels.gemv import GEMV_CONFIGS, gemv
    per_copy = n * k * torch.tensor([], dtype=dtype).element_size()
    copies = max(2, min(64, -(-SCRATCH_BYTES // per_copy)))
    try:
        weights = torch.empty(copies, n, k, dtype=dtype, device=device).normal_(0, 0.02)
    except torch.OutOfMemoryError:
        logger.debug("No scratch memory to time the GEMV for [%d, %d]: F.linear", n, k)
        return None
    x = torch.randn(1, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if has_bias else None
    out = torch.empty(1, n, dtype=dtype, device=device)
    candidates = [None, *GEMV_CONFIGS]

    def run(config, w):
        if config is None:
            return F.linear(x, w, b)
        return gemv(x, w, b, config, out)

    for config in candidates:  # compile, and first-touch everything
        run(config, weights[0])
    torch.cuda.synchronize(device)
    # Each candidate's calls over every copy, replayed as one CUDA graph: the GPU time alone,
    # as in a decode graph (timing eager launches would measure the host's launch cost).
    graphs = []
    try:
        for config in candidates:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in weights:
                    run(config, w)
            graphs.append(graph)
    except RuntimeError as err:  # no graphs here (e.g. an unsupported driver): keep cuBLAS
        logger.warning("Could not time the GEMV for [%d, %d] in a CUDA graph (%s): F.linear",
                       n, k, err)
        return None
    totals = [0.0] * len(candidates)
    for round_ in range(TIMING_ROUNDS + 1):
        for i, graph in enumerate(graphs):  # interleaved, so drift hits all alike
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            if round_:  # the first round warms the graphs up
                totals[i] += start.elapsed_time(end)
    del graphs, weights
    scale = 1e3 / (TIMING_ROUNDS * copies)  # ms per round of copies -> us a call
    return [(config, total * scale) for config, total in zip(candidates, totals)]


def chosen() -> dict[tuple, object]:
    """What was picked so far (benchmarks print it)."""
    return dict(_choices)
