"""Triton kernels: one sampled token per row in a single pass over the logits (the common case
of plain temperature sampling, greedy rows mixed in), over the whole vocabulary or over one
tensor-parallel rank's slice of it.

The sampler's exponential race draws q_v ~ Exp(1) and takes argmax_v p_v / q_v, an exact draw
from p = softmax(logits / T) (layers/sampler.py). Its logarithm, logits_v / T - log q_v, has
the same argmax (softmax's normalizer is the same for every v), so no softmax is needed, and
q_v = -log(u_v) with u_v uniform comes from Philox inside the kernel. Torch's version makes
about ten passes over a float32 [rows, vocab] copy (widen, divide, softmax, draw, clamp,
divide, argmax): 0.9 ms a step at 512 rows x 128,256 on an H200, 3% of a decode step. This
reads the logits once, in their own dtype. Greedy rows (greedy_mask) take the plain argmax.
Ties go to the lowest token id, as torch.argmax.

An argmax is a max of keys: each candidate (score, token id) is packed into one int64 whose
order is the order "higher score, then lower id" (`pack_keys`). So the work splits freely:

    grid (rows, splits): program (r, s) keeps the best key of its slice of row r's tokens
    keys [rows, splits] ─▶ max over splits (and over TP ranks: an all-reduce MAX of keys)
                       ─▶ token id = the key's low 32 bits, unpacked

A batch of one row is cut into as many slices as there are SMs to spare, where one program
used to walk all 128k tokens alone. Under tensor parallelism each rank keys its own slice of
the vocabulary (the LM head's shard, never gathered) with global token ids, and one
all-reduce of [rows, splits] int64 keys replaces gathering [rows, vocab] logits to one rank
and broadcasting its choice back (layers/sampler.py, `sample_vocab_shards`). A random draw's
noise for token v is Philox at offset row * vocab + v with the global v, whichever rank holds
it.

References: `pack_keys` in torch, and `sample_ref` below (the same formula with torch's uniform
draws; the kernel's Philox stream is not torch's, so tests compare distributions and the
greedy rows, not draws).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardserve.kernels.device_info import cuda_sms

LOW_MASK = 0xFFFFFFFF  # a key's low 32 bits: token id XOR LOW_MASK (lower ids rank higher)
NO_KEY = -(2**63)  # below every key a token can have (the key of an empty slice)
_LOW_MASK: tl.constexpr = tl.constexpr(LOW_MASK)
_NO_KEY: tl.constexpr = tl.constexpr(NO_KEY)
_NO_ID: tl.constexpr = tl.constexpr(2**31 - 1)  # "no token seen yet"
BLOCK_V_MAX = 2048
PROGRAMS_PER_SM = 2  # slices per row: enough programs for every SM twice over


@triton.jit(do_not_specialize=["num_valid", "vocab_start", "vocab_size", "stride_row",
                               "slice_len", "num_slices"])
def _sample_keys_kernel(keys_ptr, logits_ptr, temperature_ptr, greedy_ptr, seed_ptr,
                        num_valid, vocab_start, vocab_size, stride_row, slice_len, num_slices,
                        RANDOM: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    greedy = True
    if RANDOM:
        greedy = tl.load(greedy_ptr + row) != 0
        seed = tl.load(seed_ptr)
        inv_t = 1.0 / tl.load(temperature_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_id = tl.full([BLOCK_V], _NO_ID, tl.int32)
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, num_valid)
    for start in range(lo, hi, BLOCK_V):
        ids = start + lanes
        mask = ids < hi
        x = tl.load(base + ids, mask=mask, other=float("-inf")).to(tl.float32)
        # NaN (a model gone numerically wrong) counts as -inf: it never wins, and a row of
        # NaN gives its lowest id, on every backend alike (reductions differ on NaN).
        x = tl.where(x != x, float("-inf"), x)
        if RANDOM:
            if not greedy:
                # Offsets unique over the whole [rows, vocab] draw, by global token id: one
                # Philox stream per step, however the vocabulary is split.
                u = tl.rand(seed, row * vocab_size + vocab_start + ids)
                # u == 0 gives q = inf and -inf here: that token cannot win, as p / inf = 0.
                x = x * inv_t - tl.log(-tl.log(u))
        # Strict: each lane keeps its first (lowest) id on ties; a lane that saw only -inf
        # still takes its first valid id, so an all -inf row gives its lowest id.
        better = mask & ((x > best) | (best_id == _NO_ID))
        best = tl.where(better, x, best)
        best_id = tl.where(better, ids, best_id)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, best_id, _NO_ID), 0)
    # -0.0 is +0.0 (torch.argmax treats them as equal: the lower id must win the tie).
    top = tl.where(top == 0.0, 0.0, top)
    bits = top.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as int32 order
    key = (ordered.to(tl.int64) << 32) | ((vocab_start + winner).to(tl.int64) ^ _LOW_MASK)
    key = tl.where(winner == _NO_ID, _NO_KEY, key)  # an empty slice
    tl.store(keys_ptr + row * num_slices + part, key)


@triton.jit(do_not_specialize=["num_slices"])
def _keys_to_ids_kernel(out_ptr, keys_ptr, num_slices, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    keys = tl.load(keys_ptr + row * num_slices + offs, mask=offs < num_slices, other=_NO_KEY)
    best = tl.max(keys, 0)
    # No key anywhere (every logit NaN: a model gone numerically wrong): token 0, as
    # torch.argmax gives, never an id past the vocabulary.
    tl.store(out_ptr + row, tl.where(best == _NO_KEY, 0, (best & _LOW_MASK) ^ _LOW_MASK))


def fits(rows: int, vocab: int) -> bool:
    """Whether the kernel's int32 Philox offsets (row * vocab + id) cover the batch."""
    return vocab < 2**31 // max(rows, 1)


def _num_sms(device: torch.device) -> int:
    """The device's SMs; 0 off the GPU (one program a row there)."""
    return cuda_sms(device) if device.type == "cuda" else 0


def _block_v(num_columns: int) -> int:
    return min(BLOCK_V_MAX, triton.next_power_of_2(max(num_columns, 16)))


def _num_slices(rows: int, width: int, device: torch.device) -> int:
    """Programs per row for a [rows, width] shard. From its width, never from how many of its
    columns are valid: under TP the [rows, slices] keys are all-reduced, so every rank must
    make as many slices, and the last rank's shard has fewer valid columns (vocabulary
    padding), or none. A slice past the valid columns keys nothing (NO_KEY)."""
    sms = _num_sms(device)
    if not sms:
        return 1
    return max(1, min(triton.cdiv(width, _block_v(width)),
                      PROGRAMS_PER_SM * sms // max(rows, 1)))


def sample_keys(logits: torch.Tensor, temperature: torch.Tensor | None,
                greedy_mask: torch.Tensor | None, seed: torch.Tensor | None,
                vocab_start: int = 0, vocab_size: int | None = None,
                num_valid: int | None = None, slices: int | None = None) -> torch.Tensor:
    """Keys [rows, slices] (int64) of each row's best token in logits[:, :num_valid], a slice
    of the vocabulary starting at token vocab_start (of vocab_size in all); `keys_to_ids`
    (after a MAX over TP ranks, where the vocabulary is split) gives the token ids.
    temperature / greedy_mask / seed None: every row greedy; otherwise temperature [rows]
    float32 (greedy rows may hold anything but 0), greedy_mask [rows] bool and seed a
    one-element int64 tensor on the logits' device (drawn there, so no host sync). slices:
    how many programs share a row (default: enough to fill the GPU, from the logits' width
    alone, so every TP rank's keys have one shape)."""
    rows, width = logits.shape
    num_valid = width if num_valid is None else num_valid
    vocab_size = vocab_start + num_valid if vocab_size is None else vocab_size
    random = temperature is not None
    assert logits.stride(-1) == 1 and 0 <= num_valid <= width
    assert not random or fits(rows, vocab_size)
    block_v = _block_v(num_valid)
    if slices is None:
        slices = _num_slices(rows, width, logits.device)
    slice_len = triton.cdiv(triton.cdiv(max(num_valid, 1), slices), block_v) * block_v
    keys = torch.empty((rows, slices), dtype=torch.int64, device=logits.device)
    if rows:
        dummy = keys  # unused pointers of the greedy-only variant
        _sample_keys_kernel[(rows, slices)](
            keys, logits, temperature if random else dummy, greedy_mask if random else dummy,
            seed if random else dummy, num_valid, vocab_start, vocab_size, logits.stride(0),
            slice_len, slices, RANDOM=random, BLOCK_V=block_v, num_warps=8)
    return keys


def keys_to_ids(keys: torch.Tensor) -> torch.Tensor:
    """Token ids [rows] (int64) of the best key of each row of keys [rows, slices]."""
    rows, slices = keys.shape
    out = torch.empty(rows, dtype=torch.int64, device=keys.device)
    if rows:
        _keys_to_ids_kernel[(rows,)](out, keys, slices,
                                     BLOCK_S=triton.next_power_of_2(max(slices, 2)))
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, greedy_mask: torch.Tensor,
           seed: torch.Tensor) -> torch.Tensor:
    """Token ids [rows] (int64) drawn from softmax(logits / temperature) per row, argmax where
    greedy_mask. logits [rows, vocab] in any float dtype, last dim contiguous; temperature
    [rows] float32 (greedy rows may hold anything but 0); seed: a one-element int64 tensor on
    the logits' device."""
    return keys_to_ids(sample_keys(logits, temperature, greedy_mask, seed))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for [rows, vocab] logits (ties to the lowest id), with a
    single row's vocabulary split over many programs."""
    return keys_to_ids(sample_keys(logits, None, None, None))


def warm_up(width: int, device: torch.device, dtypes=(torch.float32,)) -> None:
    """Compile the kernels for [*, width] logits of each of `dtypes` now (greedy, random, the
    id step), so the first sampled steps do not wait for Triton."""
    one = torch.ones(1, dtype=torch.float32, device=device)
    for dtype in dtypes:
        logits = torch.zeros(1, width, dtype=dtype, device=device)
        keys_to_ids(sample_keys(logits, None, None, None))
        keys_to_ids(sample_keys(logits, one, one < 0, one.long()))
    # The id step compiles once per power of two of slices, and batches of more rows take
    # fewer slices a row: each count a batch can have, not only one row's.
    block_s, most = 1, _num_slices(1, width, device)
    while block_s < most:
        block_s *= 2
        keys_to_ids(torch.zeros(1, block_s, dtype=torch.int64, device=device))


def pack_keys(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """What the kernel packs, in torch: int64 keys ordered as (score, then lower id)."""
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores).float()
    bits = scores.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) | (token_ids.to(torch.int64) ^ LOW_MASK)


def unpack_ids(keys: torch.Tensor) -> torch.Tensor:
    """The token ids of keys (any shape); 0 for NO_KEY, as `keys_to_ids`."""
    return torch.where(keys == NO_KEY, 0, (keys & LOW_MASK) ^ LOW_MASK)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, greedy_mask: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """What `sample` computes, with torch's uniform draws."""
    x = logits.double()
    u = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    keys = x / temperature.double().unsqueeze(1) - torch.log(-torch.log(u))
    return torch.where(greedy_mask, x.argmax(-1), keys.argmax(-1))
