"""Sampler on CPU: greedy, seeded reproducibility, support restriction, penalties, min_tokens,
logprobs. Many samples are drawn as many identical rows of one batch, which keeps this fast."""

from __future__ import annotations

import math

import pytest
import torch

from shardserve.layers.sampler import Sampler, apply_penalties, compute_prompt_logprobs
from shardserve.layers.sampling_metadata import SamplingMetadata, min_tokens_stop_ids
from shardserve.errors import InvalidRequestError
from shardserve.sampling_params import SamplingParams

VOCAB = 32


def build(params: list[SamplingParams], outputs: list[list[int]] | None = None,
          prompts: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None,
          masks: list[list[int]] | None = None, vocab: int = VOCAB) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(
        params_list=params,
        output_token_ids_list=outputs or [[] for _ in range(n)],
        prompt_token_ids_list=prompts or [[] for _ in range(n)],
        generators_list=generators or [None] * n,
        min_tokens_masks=masks or [[] for _ in range(n)],
        vocab_size=vocab, device="cpu")


def sample(logits: torch.Tensor, md: SamplingMetadata) -> list[int]:
    return Sampler()(logits.clone(), md).tolist()


def many(logits_row: torch.Tensor, params: SamplingParams, num: int = 4000) -> torch.Tensor:
    """`num` independent draws from one row's distribution."""
    out = Sampler()(logits_row.repeat(num, 1), build([params] * num, vocab=logits_row.numel()))
    return out.sampled_token_ids


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6)] * 3
    md = build(params)
    assert md.all_greedy
    assert sample(logits, md) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, VOCAB)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=3, top_p=0.9, min_p=0.1)
              for i in range(8)]
    got = sample(logits, build(params))
    assert [got[i] for i in range(1, 8, 2)] == logits.argmax(-1)[1::2].tolist()


def _seeded_run(row_specs: list[int | None], target: int, steps: int = 6) -> list[int]:
    """Tokens of row `target` over `steps` steps; every row with a seed gets a fresh generator.
    Row `target` sees the same logits whatever the batch around it."""
    target_logits = torch.randn(steps, VOCAB, generator=torch.Generator().manual_seed(123))
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in row_specs]
    params = [SamplingParams(temperature=1.0, seed=s) for s in row_specs]
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(row_specs), VOCAB)
        logits[target] = target_logits[step]
        tokens.append(sample(logits, build(params, generators=gens))[target])
    return tokens


def test_seeded_row_is_independent_of_batch() -> None:
    alone = _seeded_run([42], target=0)
    assert _seeded_run([7, None, 42, 9], target=2) == alone
    assert _seeded_run([42, None, None], target=0) == alone
    assert _seeded_run([None, 42], target=1) == alone
    assert _seeded_run([43], target=0) != alone  # a different seed: a different sequence


def test_unseeded_rows_vary() -> None:
    draws = many(torch.zeros(VOCAB), SamplingParams(temperature=1.0), num=500)
    assert len(set(draws.tolist())) > VOCAB // 2


def test_top_k_support() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    draws = many(logits, SamplingParams(temperature=1.5, top_k=3))
    allowed = set(logits.topk(3).indices.tolist())
    assert set(draws.tolist()) == allowed


def test_low_temperature_is_near_greedy() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    draws = many(logits, SamplingParams(temperature=1e-3), num=500)
    assert set(draws.tolist()) == {int(logits.argmax())}


def test_temperature_flattens_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    draws = many(logits, SamplingParams(temperature=2.0), num=20000)
    expected = torch.softmax(logits / 2.0, -1)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, expected, atol=0.02)


PROBS = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])


def test_top_p_support_and_distribution() -> None:
    # Cumulative 0.5, 0.8, ...: top_p 0.75 keeps {0, 1}, renormalised to 0.625 / 0.375.
    draws = many(torch.log(PROBS), SamplingParams(temperature=1.0, top_p=0.75), num=20000)
    assert set(draws.tolist()) == {0, 1}
    freq0 = (draws == 0).float().mean().item()
    assert abs(freq0 - 0.625) < 0.02


def test_top_p_keeps_at_least_one_token() -> None:
    draws = many(torch.log(PROBS), SamplingParams(temperature=1.0, top_p=1e-6), num=500)
    assert set(draws.tolist()) == {0}


def test_top_k_and_top_p_per_row() -> None:
    logits = torch.log(PROBS).repeat(4, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.45), SamplingParams(),
              SamplingParams(top_k=2, top_p=0.99)]
    md = build(params)
    for _ in range(50):
        got = sample(logits, md)
        assert got[0] == 0 and got[1] == 0 and got[3] in (0, 1)


def test_min_p_support() -> None:
    # p_max 0.5: min_p 0.25 drops everything below 0.125.
    draws = many(torch.log(PROBS), SamplingParams(temperature=1.0, min_p=0.25), num=5000)
    assert set(draws.tolist()) == {0, 1}


def _reference_penalties(logits: torch.Tensor, params: list[SamplingParams],
                         prompts: list[list[int]], outputs: list[list[int]]) -> torch.Tensor:
    out = logits.clone()
    for r, p in enumerate(params):
        for tok in set(prompts[r]) | set(outputs[r]):
            x = out[r, tok].item()
            out[r, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(outputs[r]):
            out[r, tok] -= p.frequency_penalty * outputs[r].count(tok) + p.presence_penalty
    return out


def test_penalties_match_reference() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, VOCAB) * 3
    params = [SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=-1.1,
                             presence_penalty=1.5)]
    prompts = [[1, 2, 3, 3], [4, 5], [6], [7, 8, 1]]
    outputs = [[9, 9, 10], [4, 11, 11, 11], [12], [8, 13, 13]]
    md = build(params, outputs=outputs, prompts=prompts)
    assert not md.no_penalties
    got = apply_penalties(logits.clone(), md)
    expected = _reference_penalties(logits, params, prompts, outputs)
    torch.testing.assert_close(got, expected)
    assert sample(logits, md) == expected.argmax(-1).tolist()


def test_no_penalties_flag() -> None:
    md = build([SamplingParams()], outputs=[[1, 2]], prompts=[[3]])
    assert md.no_penalties and md.output_token_ids is None and md.prompt_token_ids is None


def test_min_tokens_masks_eos() -> None:
    eos = 5
    logits = torch.zeros(3, VOCAB)
    logits[:, eos] = 10.0
    logits[:, 9] = 9.0
    logits[:, 2] = 8.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9]),
              SamplingParams(temperature=0, min_tokens=3),
              SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)]
    outputs = [[1], [1, 1, 1], [1]]
    masks = [min_tokens_stop_ids(p, len(o), [eos]) for p, o in zip(params, outputs)]
    # ignore_eos too (vLLM's): min_tokens keeps EOS out of the text, not just from stopping.
    assert masks == [[9, eos], [], [eos]]
    assert sample(logits, build(params, outputs=outputs, masks=masks)) == [2, eos, 9]


def test_min_tokens_masks_random_rows() -> None:
    logits = torch.zeros(VOCAB)
    logits[0] = 20.0
    draws = Sampler()(logits.repeat(200, 1),
                      build([SamplingParams(temperature=1.0)] * 200, masks=[[0]] * 200))
    assert 0 not in draws.sampled_token_ids.tolist()


def test_allowed_token_ids_greedy_and_random_rows_leave_other_rows() -> None:
    """Only the allowed ids are sampled, greedy or random; rows without the setting (seeded,
    so their draws depend only on their own generator) sample what they would without it."""
    torch.manual_seed(7)
    logits = torch.randn(4, VOCAB)
    allowed = [3, 11, 20]
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, seed=1, allowed_token_ids=allowed),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=2)]

    def run(ps, rows=slice(None)):
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in ps]
        return sample(logits[rows], build(ps, generators=gens))

    got = run(params)
    assert got[0] == allowed[int(logits[0, allowed].argmax())]
    assert got[1] in allowed
    plain = run([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)]
                + params[2:])
    assert got[2:] == plain[2:] and plain[0] == int(logits[0].argmax())
    assert run(params[2:], slice(2, None)) == got[2:]
    assert build(params[2:]).allowed_rows is None  # the common path builds no mask


def test_allowed_token_ids_random_distribution() -> None:
    """Random rows draw from the model's distribution renormalised over the allowed ids."""
    torch.manual_seed(8)
    row = torch.randn(VOCAB)
    allowed = [1, 4, 9, 30]
    draws = many(row, SamplingParams(temperature=1.0, allowed_token_ids=allowed), num=6000)
    freq = torch.bincount(draws, minlength=VOCAB).float() / draws.numel()
    want = torch.zeros(VOCAB)
    want[allowed] = torch.softmax(row[allowed], -1)
    assert set(draws.tolist()) <= set(allowed)
    assert (freq - want).abs().max() < 0.03


def test_banned_ids_random_rows_keep_the_rest_of_the_distribution() -> None:
    """Per-step bans (bad words' last tokens) under random sampling: never drawn, the other
    tokens in proportion."""
    torch.manual_seed(9)
    row = torch.randn(VOCAB)
    row[5] = 6.0
    draws = Sampler()(row.repeat(6000, 1), build([SamplingParams(temperature=1.0)] * 6000,
                                               masks=[[5, 7]] * 6000)).sampled_token_ids
    want = row.clone()
    want[[5, 7]] = -math.inf
    freq = torch.bincount(draws, minlength=VOCAB).float() / draws.numel()
    assert not {5, 7} & set(draws.tolist())
    assert (freq - torch.softmax(want, -1)).abs().max() < 0.03


def test_logprobs_from_raw_logits() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0),
              SamplingParams(temperature=0.8, logprobs=0),
              SamplingParams(temperature=0)]
    md = build(params, outputs=[[int(logits[0].argmax())], [], []], prompts=[[1], [], []])
    assert md.max_num_logprobs == 3
    out = Sampler()(logits.clone(), md)
    ref = torch.log_softmax(logits, -1)
    sampled = out.tolist()
    assert out.sampled_token_ids.tolist() == sampled
    assert out.logprobs is not None and len(out.logprobs) == 3
    for row, (entry, k) in enumerate(zip(out.logprobs, [3, 0, 0])):
        tok = sampled[row]
        assert entry.token_ids[0] == tok
        assert math.isclose(entry.logprobs[0], ref[row, tok].item(), rel_tol=1e-6)
        assert entry.ranks[0] == int((ref[row] > ref[row, tok]).sum()) + 1
        top = ref[row].topk(k)
        assert entry.token_ids[1:] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(entry.logprobs[1:]), top.values)
        assert entry.ranks[1:] == list(range(1, k + 1))
    # Row 0's repetition penalty changed its pick, so the sampled token is not rank 1 there.
    assert out.logprobs[0].ranks[0] > 1


def test_logit_bias_forces_bans_and_leaves_other_rows() -> None:
    """+100 forces a token on greedy and random rows, -100 bans the argmax, rows without a
    bias are untouched, and logprobs still describe the raw model."""
    torch.manual_seed(7)
    logits = torch.randn(4, VOCAB)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0, logit_bias={3: 100.0}),
              SamplingParams(temperature=1.0, logit_bias={11: 100}),
              SamplingParams(temperature=0, logit_bias={top[2]: -100.0}, logprobs=1),
              SamplingParams(temperature=0)]
    md = build(params)
    assert md.logit_bias_rows.tolist() == [0, 1, 2]
    out = Sampler()(logits.clone(), md)
    got = out.tolist()
    assert got[0] == 3 and got[1] == 11 and got[3] == top[3]
    assert got[2] != top[2] and got[2] == logits[2].topk(2).indices[1].item()
    raw = torch.log_softmax(logits[2], -1)
    assert math.isclose(out.logprobs[2].logprobs[0], raw[got[2]].item(), rel_tol=1e-6)
    assert build([SamplingParams()]).logit_bias_rows is None


def test_logit_bias_is_validated() -> None:
    with pytest.raises(InvalidRequestError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 150})
    with pytest.raises(InvalidRequestError, match="token ids"):
        SamplingParams(logit_bias={"1": 1.0})
    with pytest.raises(InvalidRequestError, match="token ids"):
        SamplingParams(logit_bias={-2: 1.0})
    assert SamplingParams(logit_bias={1: 2}).logit_bias == {1: 2.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_no_logprobs_when_not_asked() -> None:
    out = Sampler()(torch.randn(2, VOCAB), build([SamplingParams(), SamplingParams(temperature=0)]))
    assert out.logprobs is None


def test_prompt_logprobs() -> None:
    torch.manual_seed(7)
    logits = torch.randn(4, VOCAB)
    next_ids = torch.tensor([3, 0, 31, 7])
    entries = compute_prompt_logprobs(logits, next_ids, 2)
    ref = torch.log_softmax(logits, -1)
    for row, e in enumerate(entries):
        tok = int(next_ids[row])
        assert e.token_ids[0] == tok and len(e.token_ids) == 3
        assert math.isclose(e.logprobs[0], ref[row, tok].item(), rel_tol=1e-6)
        assert e.ranks == [int((ref[row] > ref[row, tok]).sum()) + 1, 1, 2]
        assert e.token_ids[1:] == ref[row].topk(2).indices.tolist()


def test_empty_batch() -> None:
    md = build([])
    out = Sampler()(torch.empty(0, VOCAB), md)
    assert out.tolist() == [] and out.logprobs is None


@pytest.mark.parametrize("top_k", [0, 1, 5, VOCAB + 10])
def test_top_k_bounds(top_k: int) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(8))
    draws = set(many(logits, SamplingParams(top_k=top_k), num=2000).tolist())
    if 0 < top_k < VOCAB:
        assert draws <= set(logits.topk(top_k).indices.tolist())


def test_fused_gpu_path_is_taken_only_for_plain_temperature_sampling() -> None:
    """kernels/sampling.py draws a batch only where it computes what the torch path would:
    on a GPU, no seeded row, no top-k / top-p / min-p (greedy rows may be mixed in)."""
    from types import SimpleNamespace

    from shardserve.layers.sampler import _fused_sampling

    on_gpu = SimpleNamespace(is_cuda=True, shape=(4, VOCAB))
    plain = build([SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)] * 2)
    assert _fused_sampling(on_gpu, plain)
    assert not _fused_sampling(torch.zeros(4, VOCAB), plain)
    for p in (SamplingParams(top_p=0.9), SamplingParams(top_k=5), SamplingParams(min_p=0.1)):
        assert not _fused_sampling(on_gpu, build([p] * 4))
    seeded = build([SamplingParams(temperature=1.0, seed=1)] * 4,
                   generators=[torch.Generator().manual_seed(1) for _ in range(4)])
    assert not _fused_sampling(on_gpu, seeded)


@pytest.mark.gpu
def test_sampler_on_gpu_uses_the_kernel_with_the_same_distribution(monkeypatch) -> None:
    import shardserve.kernels.sampling as kernel

    calls = []
    real = kernel.sample
    monkeypatch.setattr(kernel, "sample", lambda *a: calls.append(a) or real(*a))
    rows = 40000
    row = torch.tensor([0.0, 1.0, 2.0, 3.0] + [-math.inf] * (VOCAB - 4))
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 1.5) for i in range(rows)]
    md = SamplingMetadata.build(params, [[]] * rows, [[]] * rows, [None] * rows, [[]] * rows,
                                VOCAB, "cuda")
    got = Sampler()(row.repeat(rows, 1).cuda().to(torch.bfloat16), md).sampled_token_ids.cpu()
    assert len(calls) == 1
    assert (got[::4] == 3).all()  # greedy rows
    random_rows = torch.ones(rows, dtype=torch.bool)
    random_rows[::4] = False
    freq = torch.bincount(got[random_rows], minlength=VOCAB).double() / random_rows.sum()
    torch.testing.assert_close(freq, torch.softmax(row.double() / 1.5, -1), atol=0.01, rtol=0)


def test_vocab_parallel_sampling_takes_only_batches_that_need_one_token_per_row() -> None:
    """Sampling from TP shards (layers/sampler.py) needs nothing but each row's best token: any
    logprobs, logit processor, penalty or min_tokens sends the batch to the gathering path; so
    does a seed, top-k/p or min-p (and any random row on a CPU, which has no kernel)."""
    from shardserve.layers.sampler import vocab_parallel_ok

    greedy, plain = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)
    assert vocab_parallel_ok([greedy, greedy], on_gpu=False, vocab_size=VOCAB)
    assert vocab_parallel_ok([greedy, plain], on_gpu=True, vocab_size=VOCAB)
    assert not vocab_parallel_ok([greedy, plain], on_gpu=False, vocab_size=VOCAB)
    assert not vocab_parallel_ok([], on_gpu=True, vocab_size=VOCAB)
    for change in (dict(logprobs=0), dict(logit_bias={1: 2.0}), dict(allowed_token_ids=[1, 2]),
                   dict(min_tokens=2), dict(bad_words=["x"]), dict(presence_penalty=0.5),
                   dict(frequency_penalty=0.5), dict(repetition_penalty=1.1)):
        one = SamplingParams(temperature=0.0, **change)
        assert not vocab_parallel_ok([greedy, one], on_gpu=True, vocab_size=VOCAB), change
    for change in (dict(seed=3), dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1)):
        one = SamplingParams(temperature=0.8, **change)
        assert not vocab_parallel_ok([greedy, one], on_gpu=True, vocab_size=VOCAB), change
        # The same settings on a greedy row change nothing: its token is the argmax anyway.
        assert vocab_parallel_ok([SamplingParams(temperature=0.0, **change)], on_gpu=True,
                                 vocab_size=VOCAB)
    # Philox offsets (row * vocab + id) must fit int32 for random rows, never for greedy ones.
    assert not vocab_parallel_ok([plain] * 20000, on_gpu=True, vocab_size=200_000)
    assert vocab_parallel_ok([greedy] * 20000, on_gpu=True, vocab_size=200_000)


def test_greedy_from_shards_on_cpu_is_the_argmax_of_the_whole_row() -> None:
    """Two ranks' shards (the second with padding columns), their keys maxed as the all-reduce
    would: the argmax of the whole row, ties to the lowest id across the shards."""
    from shardserve.layers.sampler import sample_vocab_shards

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 30, generator=gen)
    logits[0, 3] = logits[0, 20] = 9.0
    logits[1, 14] = logits[1, 15] = 9.0  # the shard border
    shards = [logits[:, :15], torch.cat([logits[:, 15:], torch.full((5, 2), 99.0)], dim=1)]
    md = build([SamplingParams(temperature=0.0)] * 5)

    class Group:  # one rank's view: the other rank's keys were computed already
        def __init__(self) -> None:
            self.keys: list[torch.Tensor] = []

        def all_reduce_max(self, keys):
            self.keys.append(keys.clone())
            return keys

    group = Group()
    for rank, shard in enumerate(shards):
        sample_vocab_shards(shard, 15 * rank, 30, 15, md, group)
    from shardserve.kernels.sampling import unpack_ids
    got = unpack_ids(torch.maximum(*group.keys))
    assert got.tolist() == logits.argmax(-1).tolist()
    assert got[0].item() == 3 and got[1].item() == 14
