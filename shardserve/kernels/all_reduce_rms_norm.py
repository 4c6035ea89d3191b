"""Triton kernel: a one-shot sum-all-reduce over symmetric memory, fused with the residual add
and the RMSNorm that follow it in every tensor-parallel decoder layer.

Why: at TP 2 a batch-1 decode step of Llama-3-8B runs 64 all-reduces of one 8 KB row, each
followed by an add + RMSNorm kernel. Both kernels are tiny; the step pays their launch gaps and
the all-reduce's cross-GPU round trips. One kernel does all of it, and each row crosses NVLink
once, one way, with no flag and no memory fence beside it:

    for each of this program's rows r (r = b, b + G, ...), with e = ++count[r]:
        every rank's buffer, slot [e % 2][my rank][r]  <-  x[r]      push: remote stores
    for each row r, for p = 0 .. W-1:
        poll my buffer [e % 2][p][r] until no element of it is "empty"
        s += it (float32); then mark it empty again
    s = s rounded + residual[r], rounded                              the next residual
    out[r] = weight * rmsnorm(s)                                      as kernels/rms_norm.py

The data is its own signal (as in TensorRT-LLM's "Lamport" all-reduce): a slot's elements
hold a bit pattern no sender writes (every 16-bit half 0x8000; senders turn that value into
+0.0 first) until the peer's store lands, and the reader puts the pattern back after reading.
A reader needs no fence: each element is checked on its own, and a store never tears an
element. A writer needs none either: nothing else it stores is read by the peer.

Every rank sums the same values in the same order (rank 0 first), so every rank gets the same
bits: the residual stream must stay identical across the group. The sum is rounded before the
residual add, exactly as the unfused all-reduce + rms_norm does: fused and unfused results are
bit for bit the same (up to the sign of an element that is zero on every rank, and float32's
0x80008000, a denormal, sent as 0).

Why two slots (by the row's call parity) are enough: a row's count e advances by one in every
call that has the row, on every rank alike (same calls, same shapes). A peer writes my slot
[e % 2] again at count e + 2. To get there it must have read my row at count e + 1, which I
push only after this call's kernel, clears included, has finished: kernels on a stream run
in order, and under programmatic dependent launch each of ours waits for the kernel before it
before touching memory (kernels/pdl.py). Counts wrap at 2^30 (an even modulus, so parity
still alternates). Polls read past L1 (volatile), where a line of an earlier call could
linger.

The row layout may change only while no call is in flight: the caller synchronizes the group
when the row width changes (distributed/custom_all_reduce.py); a serving process has one width.
Every slot written is cleared by its reader, so a finished call leaves the region all empty
for any layout. Before the first call the region is marked empty (`clear_region`).

Where it lives in the symmetric memory (distributed/custom_all_reduce.py): its own region at
the end of the buffer, which torch's all-reduce kernels (staging their messages from offset 0)
never touch, and the upper half of the signal pad (the call counts), whose lower slots
torch's kernels use.

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
MAX_ROWS = 512  # rows of one call at most (a signal-pad slot per row: its call count)
# Call counts wrap at 2^30: an even modulus, so the parity still alternates across the wrap.
COUNT_MASK: tl.constexpr = tl.constexpr((1 << 30) - 1)


# The "empty" mark of a slab element: every 16-bit half of the region holds 0x8000 while no
# data is there. For 16-bit dtypes that is -0.0, which a sender turns into +0.0 first (same
# sum, up to the sign of an all-zero element); for float32 it is the denormal 0x80008000,
# which a sender turns into +0.0 (a change of 5e-41).
EMPTY16: tl.constexpr = tl.constexpr(-32768)
EMPTY32: tl.constexpr = tl.constexpr(-2147450880)


@triton.jit
def _all_reduce_rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
                                buf_ptrs, buf_offset, slab_elems, pad_ptrs, rank, slot_base,
                                num_rows, hidden, inv_hidden, eps,
                                WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr):
    # Nothing of this call (counts, pushes, polls, clears) may start before the previous
    # kernel on this GPU has finished: the slot-reuse argument above counts on stream order.
    pdl_release_and_wait(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    wide: tl.constexpr = dtype.primitive_bitwidth == 32
    bits: tl.constexpr = tl.int32 if wide else tl.int16
    empty: tl.constexpr = EMPTY32 if wide else EMPTY16
    counts = tl.load(pad_ptrs + rank).to(tl.pointer_type(tl.int32)) + slot_base
    # Slab (parity, rank) of a region holds rows of `hidden` elements; 16-byte aligned (say
    # so, or every access to them is split into 2-byte ones). Read and written as raw bits.
    my_region = tl.multiple_of(
        (tl.load(buf_ptrs + rank) + buf_offset).to(tl.pointer_type(bits)), 16)

    for row in range(pid, num_rows, num_programs):
        # One atomic increment a row, its old value shared with every thread: a separate load
        # and store let a warp that read the count after another warp had stored it take the
        # next call's parity.
        epoch = (tl.atomic_add(counts + row, 1, sem="relaxed") + 1) & COUNT_MASK
        offs = row.to(tl.int64) * hidden + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(bits, bitcast=True)
        x = tl.where(x == empty, 0, x)  # data never looks empty
        slot = ((epoch % 2) * WORLD + rank).to(tl.int64) * slab_elems + offs
        for p in tl.static_range(WORLD):
            region = tl.multiple_of(
                (tl.load(buf_ptrs + p) + buf_offset).to(tl.pointer_type(bits)), 16)
            tl.store(region + slot, x, mask=mask)
    tl.debug_barrier()  # the counts' new values, stored by one thread, before loop 2 reads

    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, num_rows, num_programs):
        epoch = tl.load(counts + row, volatile=True)
        offs = row.to(tl.int64) * hidden + cols
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            slot = my_region + ((epoch % 2) * WORLD + p).to(tl.int64) * slab_elems + offs
            # Poll past L1 until every element of peer p's row has landed; the loop's
            # condition is a reduction, so all threads leave it together, loads done.
            v = tl.load(slot, mask=mask, other=0, volatile=True)
            while tl.max((v == empty).to(tl.int32), 0) != 0:
                v = tl.load(slot, mask=mask, other=0, volatile=True)
            acc += v.to(dtype, bitcast=True).to(tl.float32)
            tl.debug_barrier()  # no thread clears an element another has yet to read
            tl.store(slot, tl.full((BLOCK,), empty, bits), mask=mask)
        if HAS_RESIDUAL:
            s = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
        else:
            s = acc.to(dtype)
        tl.store(residual_out_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)
        variance = tl.sum(sf * sf, 0) * inv_hidden
        y = (sf * tl.math.rsqrt(variance + eps)).to(dtype)
        tl.store(out_ptr + offs, (w * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def clear_region(region: torch.Tensor) -> None:
    """Mark a rank's whole region (a uint8 view of it) empty, as the kernel expects before its
    first call: every 16-bit half 0x8000. The kernel leaves it so after each call."""
    region.view(torch.int16).fill_(EMPTY16.value)


def region_bytes(world_size: int, slab_bytes: int) -> int:
    """Bytes of symmetric buffer the kernel needs for messages up to slab_bytes: two slabs
    (call parities) per rank."""
    return 2 * world_size * slab_bytes


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float, buffer_ptrs: torch.Tensor, buffer_offset: int,
                        slab_bytes: int, signal_pad_ptrs: torch.Tensor, rank: int,
                        world_size: int, slot_base: int, max_rows: int = MAX_ROWS
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) for contiguous
    [tokens, hidden] x and residual (None: no residual to add; the second result is then
    all_reduce(x) itself, as the first decoder layer takes the embedding). buffer_ptrs /
    signal_pad_ptrs: int64 CUDA tensors of every rank's symmetric buffer / signal pad address,
    in group-rank order; region_bytes(world_size, slab_bytes) of each buffer from
    buffer_offset on, and max_rows int32 slots of each pad from slot_base on (a call count a
    row), are this kernel's; x must fit a slab and have at most max_rows rows. Every rank of the group must call this with the same shapes
    (it waits for the others)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    r2 = x2 if residual is None else residual.reshape(-1, hidden)  # x2: an unused pointer
    assert x2.is_contiguous() and r2.is_contiguous() and weight.is_contiguous()
    num_rows = x2.shape[0]
    assert num_rows <= max_rows and x2.numel() * x2.element_size() <= slab_bytes
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x2)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _all_reduce_rms_norm_kernel[(min(num_rows, MAX_PROGRAMS),)](
            out, residual_out, x2, r2, weight, buffer_ptrs, buffer_offset,
            slab_bytes // x2.element_size(), signal_pad_ptrs, rank, slot_base, num_rows,
            hidden, _inv(hidden), eps,
            WORLD=world_size, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(max(block // 512, 1), 16),
            **pdl_launch(x.device))
    return out.view(x.shape), residual_out.view(x.shape)
