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

The two sides round differently, so a choice that flipped between runs on a near tie would
change bf16 outputs across restarts of the same server. Each choice is therefore kept in
gemv_choices.json under the cache directory (shardserve/cache_dir.py), keyed by GPU, torch,
Triton and shardserve versions and shape, and later processes on the machine take it from there
instead of timing again. Delete the file to time afresh.

Everything else (CPU, float32, several rows) is F.linear, untouched.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch
import torch.nn.functional as F

from shardserve.cache_dir import cache_dir

logger = logging.getLogger(__name__)

GEMV_ENV = "SHARDSERVE_GEMV"
_HALF = (torch.bfloat16, torch.float16)
SCRATCH_BYTES = 256 << 20  # > 2x the L2 of an H100/H200 (50/60 MB)
TIMING_ROUNDS = 3

CHOICES_FILE = "gemv_choices.json"

# (N, K, dtype, has_bias, device index) -> GemvConfig, or None for F.linear
_choices: dict[tuple, object] = {}
_MISSING = object()  # nothing stored for a shape (or a configuration this version lacks)


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
    stored_key = _stored_key(n, k, x.dtype, bias is not None, x.device)
    choice = _load_choice(stored_key)
    if choice is _MISSING:
        timings = time_candidates(n, k, x.dtype, bias is not None, x.device)
        choice = min(timings, key=lambda t: t[1])[0] if timings else None
        if timings:  # no scratch memory to time in: F.linear this time, nothing kept
            _store_choice(stored_key, choice)
            logger.debug("GEMV [1, %d] x [%d, %d]^T %s: %s -> %s", k, n, k, x.dtype,
                         ", ".join(f"{_config_name(c)} {us:.1f} us" for c, us in timings),
                         _config_name(choice))
    _choices[key] = choice
    return choice


def _config_name(config) -> str:
    if config is None:
        return "F.linear"
    return (f"gemv {config.block_n}x{config.block_k} warps {config.num_warps} "
            f"stages {config.num_stages}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _stored_key(n: int, k: int, dtype: torch.dtype, has_bias: bool,
                device: torch.device) -> str:
    import triton

    import shardserve
    return (f"{_device_name(device)} | torch {torch.__version__} | triton {triton.__version__} "
            f"| shardserve {shardserve.__version__} | [{n}, {k}] {dtype} bias={has_bias}")


def _choices_path():
    return cache_dir() / CHOICES_FILE


def _read_stored() -> dict[str, str]:
    try:
        with open(_choices_path()) as f:
            stored = json.load(f)
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or damaged: time afresh
        return {}


def _load_choice(stored_key: str):
    """The kept choice for a shape (a GemvConfig or None), or _MISSING."""
    from shardserve.kernels.gemv import GEMV_CONFIGS
    name = _read_stored().get(stored_key)
    for config in (None, *GEMV_CONFIGS):
        if name == _config_name(config):
            return config
    return _MISSING


def _store_choice(stored_key: str, config) -> None:
    """Add one choice to the file: read afresh (other processes, e.g. TP ranks, add theirs),
    then write a copy and rename it into place, so no reader sees half a file. Two writers at
    once can drop each other's new entry; that shape is timed again next time."""
    path = _choices_path()
    stored = _read_stored()
    stored[stored_key] = _config_name(config)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=CHOICES_FILE + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:  # e.g. a read-only home: the choice holds for this process only
        logger.debug("Could not keep the GEMV choice in %s: %s", path, err)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


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
