"""Triton kernel: a one-shot sum-all-reduce over symmetric memory, fused with the residual add
and the RMSNorm that follow it in every tensor-parallel decoder layer.

Why: at TP 2 a batch-1 decode step of Llama-3-8B runs 64 all-reduces of one 8 KB row, each
followed by an add + RMSNorm kernel. Both kernels are tiny; the step pays their launch gaps and
the all-reduce's cross-GPU round trips. One kernel does all of it, and each row crosses NVLink
once, one way:

    for each of this program's rows r (r = b, b + G, ...), with e = ++count[r]:
        every rank's buffer, slot [e % 2][my rank][r]  <-  x[r]      push: remote stores
    for each row r: every rank's flag [r][my rank]  <-  e            release, system scope
    for each row r:
        wait until my flags [r][p] have reached e for every rank p   acquire
        s = sum over p = 0..W-1 of my buffer [e % 2][p][r]           float32, rounded
        s = s + residual[r]                                           rounded; the next residual
        out[r] = weight * rmsnorm(s)                                  as kernels/rms_norm.py

Every rank sums the same values in the same order (rank 0 first), so every rank gets the same
bits: the residual stream must stay identical across the group. The sum is rounded before the
residual add, exactly as the unfused all-reduce + rms_norm does: fused and unfused results are
bit for bit the same.

Why one signal per row is enough (no second barrier): a row's count e advances by one in every
call that has the row, on every rank alike (same calls, same shapes), and its data alternates
between two slots by e's parity. A rank writes that slot again at count e + 2, in a later call
than the one with count e + 1. Every call has row 0, so in the call just before, this rank
waited for the peer's row-0 flag. The peer sent that flag only after its kernels of all earlier
calls had finished, including the one that read count e (launched early under PDL too: it
waits for the kernel before it first, kernels/pdl.py). For the same reason a peer's flag is
at most one call ahead, so the wait is "reached e", not "equals e". Counts wrap at 2^30 and are
compared modulo that. `tl.debug_barrier()` orders the program's threads around the signals,
and the buffer is read past L1 (.cg), where a line of an earlier call could linger.

The row layout must not change while peers may still read: the caller synchronizes the group
when the row width changes (distributed/custom_all_reduce.py); a serving process has one width.

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

from shardserve.kernels.pdl import pdl_launch, pdl_release_and_wait
from shardserve.kernels.rms_norm import _inv

# Programs per call at most (each owns rows b, b + G, ...): small enough that all of them are
# resident at once on every GPU, so no program spins on a peer program that cannot start.
MAX_PROGRAMS = 64
MAX_ROWS = 512  # rows of one call at most (a signal-pad slot per row and rank)
# Call counts wrap at 2^30: an even modulus, so the parity still alternates across the wrap.
COUNT_MASK: tl.constexpr = tl.constexpr((1 << 30) - 1)


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
def _all_reduce_rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
                                buf_ptrs, buf_offset, slab_elems, pad_ptrs, rank, slot_base,
                                max_rows, num_rows, hidden, inv_hidden, eps,
                                WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                USE_PDL: tl.constexpr):
    # Nothing of this call (counts, pushes, signals) may start before the previous kernel on
    # this GPU has finished: the no-second-barrier argument above counts on stream order.
    pdl_release_and_wait(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    peers = tl.arange(0, WORLD)
    dtype = x_ptr.dtype.element_ty
    # slots from slot_base: [count per row: max_rows][flags: max_rows x WORLD]
    my_pad = tl.load(pad_ptrs + rank)  # int64 addresses: flags are reached by address
    counts = my_pad.to(tl.pointer_type(tl.int32)) + slot_base
    flags = slot_base + max_rows
    # Slab (parity, rank) of a region holds rows of `hidden` elements; 16-byte aligned (say
    # so, or every access to them is split into 2-byte ones).
    my_region = tl.multiple_of(
        (tl.load(buf_ptrs + rank) + buf_offset).to(tl.pointer_type(dtype)), 16)

    for row in range(pid, num_rows, num_programs):
        # One atomic increment a row, its old value shared with every thread: a separate load
        # and store let a warp that read the count after another warp had stored it take the
        # next call's parity (seen as a rare wrong sum with several rows a program).
        epoch = (tl.atomic_add(counts + row, 1) + 1) & COUNT_MASK
        offs = row.to(tl.int64) * hidden + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        slot = ((epoch % 2) * WORLD + rank).to(tl.int64) * slab_elems + offs
        for p in tl.static_range(WORLD):
            region = tl.multiple_of(
                (tl.load(buf_ptrs + p) + buf_offset).to(tl.pointer_type(dtype)), 16)
            tl.store(region + slot, x, mask=mask)
    tl.debug_barrier()  # every thread's pushes before any signal (counts: see loop 1)
    for row in range(pid, num_rows, num_programs):
        epoch = tl.load(counts + row, volatile=True)
        _store_release(tl.load(pad_ptrs + peers) + (flags + row * WORLD + rank) * 4,
                       tl.full((WORLD,), 0, tl.int32) + epoch)

    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):
        epoch = tl.load(counts + row, volatile=True)
        mine = my_pad + (flags + row * WORLD + peers) * 4
        # reached: the flag is e or one call ahead, counted modulo 2^30 (no int32 overflow)
        while tl.max((((_load_acquire(mine) - epoch) & COUNT_MASK) > COUNT_MASK // 2)
                     .to(tl.int32), 0) != 0:
            pass
        tl.debug_barrier()
        offs = row.to(tl.int64) * hidden + cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            slot = ((epoch % 2) * WORLD + p).to(tl.int64) * slab_elems + offs
            acc += tl.load(my_region + slot, mask=mask, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
        r = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        s = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_out_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)
        variance = tl.sum(sf * sf, 0) * inv_hidden
        y = (sf * tl.math.rsqrt(variance + eps)).to(dtype)
        tl.store(out_ptr + offs, (w * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def num_signal_slots(world_size: int, max_rows: int) -> int:
    """int32 signal-pad slots the kernel uses (from slot_base on) for up to max_rows rows."""
    return max_rows * (world_size + 1)


def region_bytes(world_size: int, slab_bytes: int) -> int:
    """Bytes of symmetric buffer the kernel needs for messages up to slab_bytes: two slabs
    (call parities) per rank."""
    return 2 * world_size * slab_bytes


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, buffer_ptrs: torch.Tensor, buffer_offset: int,
                        slab_bytes: int, signal_pad_ptrs: torch.Tensor, rank: int,
                        world_size: int, slot_base: int, max_rows: int = MAX_ROWS
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) for contiguous
    [tokens, hidden] x and residual. buffer_ptrs / signal_pad_ptrs: int64 CUDA tensors of every
    rank's symmetric buffer / signal pad address, in group-rank order; region_bytes(world_size,
    slab_bytes) of each buffer from buffer_offset on, and num_signal_slots(world_size,
    max_rows) slots of each pad from slot_base on, are this kernel's; x must fit a slab and
    have at most max_rows rows. Every rank of the group must call this with the same shapes
    (it waits for the others)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    r2 = residual.reshape(-1, hidden)
    assert x2.is_contiguous() and r2.is_contiguous() and weight.is_contiguous()
    num_rows = x2.shape[0]
    assert num_rows <= max_rows and x2.numel() * x2.element_size() <= slab_bytes
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x2)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _all_reduce_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
            out, residual_out, x2, r2, weight, buffer_ptrs, buffer_offset,
            slab_bytes // x2.element_size(), signal_pad_ptrs, rank, slot_base, max_rows,
            num_rows, hidden, _inv(hidden), eps,
            WORLD=world_size, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
            **pdl_launch(x.device))
    return out.view(x.shape), residual_out.view(x.shape)
