"""Programmatic dependent launch (PDL) for the kernels of a small decode step, on Hopper and
later GPUs.

A batch-1 decode step is ~10 kernels a layer, most of them a few microseconds long. Launched
the ordinary way, each one starts only after the one before has finished and drained, and
between the weight-streaming GEMVs the GPU's memory sits idle while the small kernels run
(RMSNorm or the fused all-reduce, RoPE and the KV store, attention, SiLU-and-mul). With PDL a
kernel may be scheduled while its predecessor still runs (CUDA keeps the relation as a
programmatic edge when a CUDA graph is captured); it must then wait (griddepcontrol.wait)
before it touches anything the predecessor writes or reads. The kernels here follow one
protocol (`pdl_release_and_wait`, `pdl_wait_and_release`):

    small kernels   release their successor, then wait, then work
    GEMVs           load their first tiles of weights, wait, release, work

so the chain of small kernels after a GEMV is scheduled at once, each waiting its turn, up to
the next GEMV, whose programs have their first read-only weight tiles in flight before the
kernel ahead of them is done. A GEMV releases only after its own wait, so no more than one GEMV
is ever ahead. Every kernel launched with PDL waits before its first access to data another
kernel touches, and so finishes after its predecessor: the order of the kernels' effects is
the stream's, as without PDL.

    SHARDSERVE_PDL=auto (default: on for compute capability 9.0 and up) | 1 | 0

Kernels launched without PDL (cuBLAS, torch) keep ordinary stream order around these.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL_ENV = "SHARDSERVE_PDL"


def pdl_mode() -> str:
    return _parse_mode(os.environ.get(PDL_ENV, "auto"))


def _parse_mode(setting: str) -> str:
    mode = setting.strip().lower() or "auto"
    if mode in ("1", "true", "on"):
        return "on"
    if mode in ("0", "false", "off"):
        return "off"
    if mode != "auto":
        raise ValueError(f"{PDL_ENV}={mode!r}: use auto, 1 or 0.")
    return mode


@functools.cache
def _device_supports_pdl(device_index: int) -> bool:
    if torch.version.hip is not None:  # a ROCm build: no grid dependency control
        return False
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    try:  # Triton 3.3 and later expose grid dependency control
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (a CUDA device of compute capability 9.0 or
    later, a Triton that has it, and SHARDSERVE_PDL not 0). Asked at every eager launch, so
    the answer is cached by the settings it depends on."""
    if device.type != "cuda":
        return False
    return _pdl_on(os.environ.get(PDL_ENV, "auto"), os.environ.get("TRITON_INTERPRET"),
                   device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_on(setting: str, interpret: str | None, device_index: int) -> bool:
    if interpret == "1" or _parse_mode(setting) == "off":
        return False
    return _device_supports_pdl(device_index)


def launch_options(pdl: bool) -> dict:
    """Keyword arguments for a Triton launch: launch_pdl where PDL is on (none otherwise, so
    the interpreter and older Tritons never see the option)."""
    return {"launch_pdl": True} if pdl else {}


def pdl_launch(device: torch.device) -> dict:
    """The launch keywords of a kernel taking USE_PDL, on `device`: the flag, and
    launch_options."""
    pdl = use_pdl(device)
    return {"USE_PDL": pdl, **launch_options(pdl)}


@triton.jit
def pdl_release_and_wait(USE_PDL: tl.constexpr):
    """A small kernel's first statement: let the next kernel be scheduled, then wait until
    the previous one has finished and its writes are visible. No-op without PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_wait_and_release(USE_PDL: tl.constexpr):
    """A weight-streaming kernel's, after its first weight loads: wait for the previous kernel,
    then let the next be scheduled (releasing before the wait would let every later kernel,
    and every later GEMV's loads, start at once)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
