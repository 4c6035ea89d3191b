"""The one-pass sampling kernel (kernels/sampling.py) against what it must compute: greedy rows
are torch.argmax (ties to the lowest id), masked (-inf) tokens never win, a seed fixes the
draws, and the draws follow softmax(logits / temperature). Its Philox stream is not torch's, so
random rows are checked as distributions, never draw by draw.

CPU: Triton's interpreter, a few hundred rows (it runs each program in Python). GPU (marked
gpu): 100,000 rows for a tight distribution check, and the vocabulary of Llama 3 at 512 rows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardserve.kernels.sampling import sample, sample_ref  # noqa: E402
from tests.kernels.kernel_cases import DEVICE  # noqa: E402


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _draw(logits, temperature, greedy=None, seed=0):
    rows = logits.shape[0]
    t = torch.full((rows,), float(temperature), device=DEVICE)
    g = (torch.zeros(rows, dtype=torch.bool, device=DEVICE) if greedy is None
         else greedy.to(DEVICE))
    return sample(logits.to(DEVICE), t, g, _seed(seed)).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 3001])  # one partial block; two blocks, the last partial
def test_greedy_rows_are_argmax_with_ties_to_the_lowest_id(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    logits[1, vocab // 2] = logits[1, vocab - 1] = 50.0  # a tie across blocks: the lower id
    logits[2, 3] = logits[2, 5] = 50.0
    greedy = torch.tensor([True, True, True, False, True])
    got = _draw(logits, 1.0, greedy)
    want = logits.float().argmax(-1)
    assert got.dtype == torch.int64
    assert got[greedy].tolist() == want[greedy].tolist()
    assert got[1].item() == vocab // 2 and got[2].item() == 3
    assert 0 <= got[3].item() < vocab


def test_masked_tokens_never_win_and_an_all_masked_row_gives_token_0():
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 48, 300
    logits = torch.full((rows, vocab), float("-inf"))
    allowed = torch.randperm(vocab, generator=gen)[:3]
    logits[:, allowed] = torch.randn(rows, 3, generator=gen) * 5
    logits[-1] = float("-inf")
    got = _draw(logits, 1.0)
    assert set(got[:-1].tolist()) <= set(allowed.tolist())
    assert got[-1].item() == 0


def test_seed_fixes_the_draws_and_a_new_seed_changes_them():
    logits = torch.zeros(16, 1000)  # uniform: 16 draws agreeing by chance is ~1e-48
    a, b, c = _draw(logits, 1.0, seed=7), _draw(logits, 1.0, seed=7), _draw(logits, 1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) > 8  # not one token for every row


def test_draws_follow_softmax_over_temperature():
    """256 rows of one distribution at T = 2: the frequencies sit within 0.12 (about four
    standard deviations) of softmax(l / 2), and the same check against softmax(l), which a
    kernel ignoring the temperature would follow, fails."""
    rows = 256
    row = torch.tensor([0.0, 1.0, 2.0, 3.0])
    got = _draw(row.repeat(rows, 1), 2.0)
    freq = torch.bincount(got, minlength=4).double() / rows
    want = torch.softmax(row.double() / 2.0, -1)
    assert (freq - want).abs().max() < 0.12, (freq, want)
    assert (freq - torch.softmax(row.double(), -1)).abs().max() > 0.12


def test_a_tiny_temperature_is_the_argmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 50, generator=gen) * 3
    assert _draw(logits, 1e-4).tolist() == logits.argmax(-1).tolist()


def test_reference_follows_the_same_distribution():
    """sample_ref, the formula in torch (double precision, torch's uniforms)."""
    gen = torch.Generator().manual_seed(4)
    rows = 20000
    row = torch.tensor([0.5, -1.0, 2.0, 0.0, float("-inf")])
    t = torch.full((rows,), 0.8)
    got = sample_ref(row.repeat(rows, 1), t, torch.zeros(rows, dtype=torch.bool), gen)
    freq = torch.bincount(got, minlength=5).double() / rows
    torch.testing.assert_close(freq, torch.softmax(row.double() / 0.8, -1), atol=0.015, rtol=0)


@pytest.mark.gpu
def test_gpu_distribution_at_many_rows_and_llama3_vocab():
    rows = 100_000
    row = torch.tensor([0.0, 0.3, -2.0, 1.5, 1.0, float("-inf"), 0.7, -0.5])
    for temperature in (0.5, 1.0, 1.7):
        got = _draw(row.repeat(rows, 1).to(torch.bfloat16), temperature)
        freq = torch.bincount(got, minlength=8).double() / rows
        want = torch.softmax(row.to(torch.bfloat16).double() / temperature, -1)
        torch.testing.assert_close(freq, want, atol=6e-3, rtol=0)
    logits = torch.randn(512, 128256, dtype=torch.bfloat16, device="cuda")
    greedy = torch.arange(512) % 3 == 0
    got = _draw(logits, 1.0, greedy)
    assert got[greedy].tolist() == logits.float().argmax(-1).cpu()[greedy].tolist()
    assert ((got >= 0) & (got < 128256)).all()


def _shard_ids(logits, shards, slices, temperature=None, greedy=None, seed=0, pad=0):
    """Token ids from keying each of `shards` equal vocabulary slices (each padded with `pad`
    junk columns past its valid tokens, as an LM head shard is) and taking the max key."""
    from shardserve.kernels.sampling import keys_to_ids, sample_keys
    rows, vocab = logits.shape
    width = -(-vocab // shards)
    keys = []
    for r in range(shards):
        part = logits[:, r * width:(r + 1) * width]
        valid = part.shape[1]
        junk = torch.full((rows, width - valid + pad), 1e4, dtype=logits.dtype)  # never read
        shard = torch.cat([part, junk], dim=1).to(DEVICE)
        t = g = s = None
        if temperature is not None:
            t = torch.full((rows,), float(temperature), device=DEVICE)
            g = greedy.to(DEVICE)
            s = _seed(seed)
        keys.append(sample_keys(shard, t, g, s, vocab_start=r * width, vocab_size=vocab,
                                num_valid=valid, slices=slices).cpu())
    best = torch.stack([k.max(dim=1).values for k in keys], dim=1)  # the MAX all-reduce
    return keys_to_ids(best.to(DEVICE)).cpu()


@pytest.mark.parametrize("shards,slices", [(1, 3), (2, 1), (3, 4)])
def test_vocab_split_over_slices_and_shards_gives_the_same_tokens(shards, slices):
    """Greedy: the argmax, ties to the lowest id across slices and shards. Random: the very
    same draws as one pass over the whole vocabulary with the same seed, since a token's
    noise depends on its global id only."""
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 6, 4100
    logits = torch.randn(rows, vocab, generator=gen).to(torch.bfloat16)
    logits[0, 7] = logits[0, 4099] = 40.0  # a tie between the first and the last shard
    logits[1, 2050] = logits[1, 2051] = 40.0  # a tie at a shard border (shards of 2050)
    logits[2] = float("-inf")  # all masked: token 0
    got = _shard_ids(logits, shards, slices, pad=64)
    assert got.tolist() == logits.float().argmax(-1).tolist()
    assert got[0].item() == 7 and got[1].item() == 2050 and got[2].item() == 0
    greedy = torch.tensor([True, False, False, True, False, False])
    whole = _draw(logits, 0.7, greedy, seed=5)
    split = _shard_ids(logits, shards, slices, 0.7, greedy, seed=5, pad=64)
    assert split.tolist() == whole.tolist()


def test_keys_order_as_score_then_lower_id():
    from shardserve.kernels.sampling import pack_keys, sample_keys, unpack_ids
    scores = torch.tensor([-float("inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, float("inf")])
    ids = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2])
    keys = pack_keys(scores, ids)
    assert unpack_ids(keys).tolist() == ids.tolist()
    order = sorted(range(len(scores)), key=lambda i: (scores[i].item(), -ids[i].item()))
    # -0.0 and 0.0 are one score: the lower id (6) ranks above 7
    assert torch.argsort(keys).tolist() == order
    # The kernel packs the same key for a row's winner.
    row = torch.tensor([[0.5, 2.0, 2.0, -1.0]])
    got = sample_keys(row.to(DEVICE), None, None, None, vocab_start=100, slices=1).cpu()
    assert got.tolist() == [[pack_keys(torch.tensor(2.0), torch.tensor(101)).item()]]


def test_every_tp_rank_keys_as_many_slices_whatever_its_padding(monkeypatch):
    """The keys are all-reduced over the TP ranks, so each rank's [rows, slices] must have one
    shape: a vocabulary of 4100 at TP 2 gives shards of 2112 columns, 2112 and 1988 of them
    valid; slicing by the valid columns made 2 slices on rank 0 and 1 on rank 1 (an
    all-reduce of mismatched sizes: a hang). A shard of padding only (a tiny vocabulary over
    many ranks) gives as many slices, all keyless."""
    from shardserve.kernels import sampling
    from shardserve.kernels.sampling import NO_KEY, keys_to_ids, sample_keys

    monkeypatch.setattr(sampling, "_num_sms", lambda device: 132)  # an H200, on any device
    vocab, width = 4100, 2112
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, vocab, generator=gen)
    logits[0, 4099] = 30.0  # the last valid token of the last rank wins
    padded = torch.cat([logits, torch.full((1, 2 * width - vocab), 99.0)], dim=1)
    keys = [sample_keys(padded[:, r * width:(r + 1) * width].contiguous().to(DEVICE), None,
                        None, None, vocab_start=r * width, vocab_size=vocab,
                        num_valid=min(width, vocab - r * width)).cpu() for r in (0, 1)]
    assert keys[0].shape == keys[1].shape == (1, 2)
    best = torch.maximum(*keys).max(dim=1, keepdim=True).values  # the all-reduce, then the row
    assert keys_to_ids(best.to(DEVICE)).cpu().tolist() == [4099]
    empty = sample_keys(torch.zeros(3, width, device=DEVICE), None, None, None,
                        vocab_start=2 * width, vocab_size=vocab, num_valid=0).cpu()
    assert empty.shape == (3, 2) and (empty == NO_KEY).all()


def test_a_row_of_nan_logits_gives_token_0_not_an_id_past_the_vocabulary():
    """A model gone numerically wrong: all-NaN rows give token 0 as torch.argmax does (the
    detokenizer must never see an id past the vocabulary); NaN beside numbers counts as -inf
    (torch.argmax would pick the NaN)."""
    from shardserve.kernels.sampling import NO_KEY, argmax, unpack_ids
    logits = torch.randn(3, 3000)
    logits[0] = float("nan")
    logits[1, ::2] = float("nan")
    got = argmax(logits.to(DEVICE)).cpu()
    assert got[0].item() == 0
    assert got[1].item() == logits[1, 1::2].argmax().item() * 2 + 1
    assert got[2].item() == logits[2].argmax().item()
    assert unpack_ids(torch.tensor([NO_KEY])).tolist() == [0]


def test_warm_up_compiles_the_id_step_for_every_slice_count(monkeypatch):
    """The id step compiles once per power of two of slices, and bigger batches take fewer
    slices a row: warm-up covers them all, so no batch size compiles mid-serving (an H200
    compiled three more variants, 70 ms each, in its first run before this)."""
    import triton

    from shardserve.kernels import sampling
    monkeypatch.setattr(sampling, "_num_sms", lambda device: 132)  # an H200
    seen = []
    monkeypatch.setattr(sampling, "sample_keys",
                        lambda logits, *a: torch.zeros(logits.shape[0], sampling._num_slices(
                            logits.shape[0], logits.shape[1], logits.device), dtype=torch.int64))
    monkeypatch.setattr(sampling, "keys_to_ids", lambda keys: seen.append(keys.shape[1]))
    width = 64128  # Llama 3's vocabulary over 2 ranks
    sampling.warm_up(width, torch.device("cpu"))
    compiled = {triton.next_power_of_2(max(s, 2)) for s in seen}
    needed = {triton.next_power_of_2(max(sampling._num_slices(rows, width, torch.device("cpu")),
                                         2)) for rows in range(1, 2049)}
    assert len(needed) > 3 and needed <= compiled
