"""Triton kernel: a one-shot sum-all-reduce over symmetric memory, fused with the residual add
and the RMSNorm that follow it in every tensor-parallel decoder layer.

Why: at TP 2 a batch-1 decode step of Llama-3-8B runs 64 all-reduces of one 8 KB row, each
followed by an add + RMSNorm kernel. Both kernels are tiny; the step pays their launch gaps and
the all-reduce's cross-GPU barriers. One kernel does all of it:

    program b (rows b, b + G, b + 2G, ...):
        my_buf[rows] = x[rows]                     this rank's partial sum, into its buffer
        barrier(b, "in")                           every rank's program b has written
        s = sum over ranks p = 0..W-1 of buf_p[rows]   float32, rounded to the input dtype
        s = s + residual[rows]                     rounded; stored as the next residual
        out[rows] = weight * rmsnorm(s)            as kernels/rms_norm.py
        barrier(b, "out")                          peers are done reading my buffer

Every rank sums the peers' buffers in the same order (rank 0 first), so every rank gets the same
bits: the residual stream must stay identical across the group. The sum is rounded before the
residual add, exactly as the unfused all-reduce + rms_norm does: fused and unfused results are
bit for bit the same.

The barriers count calls instead of flipping flags, so a signal is one store to the peer and
never a round trip. Program b keeps its call count e in its own signal pad; at each barrier it
writes e into slot [b * W + r] of every peer's pad for that barrier (release, system scope,
not waited for) and spins on its own slots [b * W + p] until each holds e (acquire). Counts
advance together on every rank because every rank makes the same calls with the same grid;
a peer cannot be a call ahead at a barrier, as it would first have to pass the "out" barrier
of this call, which waits for this program. int32 counts wrap on both sides alike (only
equality is tested). `tl.debug_barrier()` orders the program's threads around the signals, and
peer buffers are read with `volatile` loads so a line cached by an earlier call is never used.

Where it lives in the symmetric memory (distributed/custom_all_reduce.py): its own region at
the end of the buffer, which torch's all-reduce kernels (staging their messages from offset 0)
never touch, and the upper half of the signal pad, whose lower slots torch's kernels use.

Reference: `GroupCoordinator.all_reduce` followed by `kernels.rms_norm.rms_norm(x, weight, eps,
residual)`; tests/gpu/test_all_reduce_rms_norm.py checks bit equality on two GPUs, eagerly and
replayed from CUDA graphs. GPU only (inline PTX and peer memory have no interpreter form).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.rms_norm import _inv

# Programs per call at most (each owns rows b, b + G, ...): small enough that all of them are
# resident at once on every GPU, so no program spins on a peer program that cannot start.
MAX_PROGRAMS = 64


@triton.jit
def _store_release(addresses, values):
    """st.release.sys of int32 `values` at the int64 `addresses` (one store per element; a
    replicated element is stored by several threads, with the same value)."""
    return tl.inline_asm_elementwise(
        "mov.u32 $0, 0; st.release.sys.global.u32 [$1], $2;", "=r,l,r", [addresses, values],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_acquire(addresses):
    """ld.acquire.sys of the int32 at each int64 address."""
    return tl.inline_asm_elementwise(
        "ld.acquire.sys.global.u32 $0, [$1];", "=r,l", [addresses],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _signal_barrier(pad_ptrs, my_pad, slot, rank, epoch, WORLD: tl.constexpr):
    """Program-wide barrier with the same program of every rank (see the module doc): one
    release store per peer, all peers at once, then a spin on this rank's own slots."""
    peers = tl.arange(0, WORLD)
    tl.debug_barrier()  # every thread's buffer writes (or reads) come before the signal
    _store_release(tl.load(pad_ptrs + peers) + (slot + rank) * 4,
                   tl.full((WORLD,), 0, tl.int32) + epoch)
    mine = my_pad + (slot + peers) * 4
    while tl.min((_load_acquire(mine) == epoch).to(tl.int32), 0) == 0:
        pass
    tl.debug_barrier()


@triton.jit
def _all_reduce_rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
                                buf_ptrs, buf_offset, pad_ptrs, rank, slot_base, num_rows, hidden,
                                inv_hidden, eps,
                                WORLD: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
                                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    # The symmetric buffers and the region offset are 16-byte aligned: say so, or every
    # access to them is split into 2-byte ones.
    my_buf = tl.multiple_of((tl.load(buf_ptrs + rank) + buf_offset).to(tl.pointer_type(dtype)),
                            16)
    my_pad = tl.load(pad_ptrs + rank)  # an int64 address: the barrier computes slot addresses
    # slots: [in barrier: MAX_PROGRAMS x WORLD][out barrier: same][call counts: MAX_PROGRAMS]
    in_slot = slot_base + pid * WORLD
    out_slot = in_slot + MAX_PROGRAMS * WORLD
    count_ptr = (my_pad.to(tl.pointer_type(tl.int32)) + slot_base + 2 * MAX_PROGRAMS * WORLD
                 + pid)
    epoch = tl.load(count_ptr, volatile=True) + 1
    tl.store(count_ptr, epoch)

    for row in range(pid, num_rows, num_programs):
        offs = row.to(tl.int64) * hidden + cols
        tl.store(my_buf + offs, tl.load(x_ptr + offs, mask=mask, other=0.0), mask=mask)
    _signal_barrier(pad_ptrs, my_pad, in_slot, rank, epoch, WORLD)

    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):
        offs = row.to(tl.int64) * hidden + cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            peer_buf = tl.multiple_of(
                (tl.load(buf_ptrs + p) + buf_offset).to(tl.pointer_type(dtype)), 16)
            acc += tl.load(peer_buf + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        r = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        s = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)
        variance = tl.sum(sf * sf, 0) * inv_hidden
        y = (sf * tl.math.rsqrt(variance + eps)).to(dtype)
        tl.store(out_ptr + offs, (w * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    _signal_barrier(pad_ptrs, my_pad, out_slot, rank, epoch, WORLD)


def num_signal_slots(world_size: int) -> int:
    """int32 signal-pad slots the kernel uses (from slot_base on)."""
    return (2 * world_size + 1) * MAX_PROGRAMS


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, buffer_ptrs: torch.Tensor, buffer_offset: int,
                        signal_pad_ptrs: torch.Tensor, rank: int, world_size: int,
                        slot_base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) for contiguous
    [tokens, hidden] x and residual. buffer_ptrs / signal_pad_ptrs: int64 CUDA tensors of every
    rank's symmetric buffer / signal pad address, in group-rank order; the buffer must hold x
    from buffer_offset (bytes) on, and slots [slot_base, slot_base + num_signal_slots) of the
    pads are this kernel's. Every rank of the group must call this with the same shapes (it
    waits for the others)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden)
    assert x2.is_contiguous() and r2.is_contiguous() and weight.is_contiguous()
    num_rows = x2.shape[0]
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x2)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _all_reduce_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
            out, residual_out, x2, r2, weight, buffer_ptrs, buffer_offset, signal_pad_ptrs, rank,
            slot_base, num_rows, hidden, _inv(hidden), eps,
            WORLD=world_size, MAX_PROGRAMS=MAX_PROGRAMS, BLOCK=block,
            num_warps=min(max(block // 512, 1), 16))
    return out.view(x.shape), residual_out.view(x.shape)
