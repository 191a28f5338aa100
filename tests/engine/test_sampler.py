"""Sampler: vLLM semantics, exact numbers, distributions, per-request seeds."""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import SamplingParams
from engine.sampler import Sampler, SamplingRow, process_logits

NEG_INF = float("-inf")


def row(
    params: SamplingParams,
    request_id: str = "r",
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    eos: tuple[int, ...] = (),
) -> SamplingRow:
    return SamplingRow(request_id, params, prompt, output, eos)


def tokens(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return [t for t, _ in sampler.sample(logits, rows)]


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom over the bins with expected mass > 0."""
    n = float(observed.sum())
    support = expected_probs > 0
    assert observed[~support].sum() == 0, "drew a token outside the support"
    exp = expected_probs[support].double() * n
    stat = float(((observed[support].double() - exp) ** 2 / exp).sum())
    return stat, int(support.sum()) - 1


def assert_matches(observed: torch.Tensor, expected_probs: torch.Tensor) -> None:
    stat, df = chi_square(observed, expected_probs)
    # ~ the 99.99% quantile for the small df used here; the draws are seeded, so no flakes.
    assert stat < df + 6 * math.sqrt(2 * df) + 4, (stat, df)


def draw_counts(
    params: SamplingParams, logits: torch.Tensor, n: int, seeded: bool = False
) -> torch.Tensor:
    """Histogram of n draws from one row of logits (V,), sampled as one batch of n rows."""
    if seeded:  # one request per row, each with its own seed: exercises the per-row path
        rows = [
            row(SamplingParams(**{**params.__dict__, "seed": i}), request_id=f"s{i}")
            for i in range(n)
        ]
    else:
        rows = [row(params, request_id=f"r{i}") for i in range(n)]
    ids = tokens(Sampler(seed=1), logits.expand(n, -1), rows)
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[0])


# ---------------------------------------------------------------- greedy and filters


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(0))
    logits[3, [7, 500]] = 100.0  # a tie: the lowest id wins, like torch.argmax
    rows = [row(SamplingParams(temperature=0.0), f"r{i}") for i in range(16)]
    assert tokens(Sampler(), logits, rows) == logits.argmax(dim=-1).tolist()
    assert tokens(Sampler(), logits, rows)[3] == 7


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    rows = [row(SamplingParams(temperature=1e-7), f"r{i}") for i in range(8)]
    assert tokens(Sampler(), logits, rows) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)],
    ids=["top_k=1", "top_p=tiny"],
)
def test_degenerate_filters_are_greedy(params: SamplingParams) -> None:
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(2))
    rows = [row(params, f"r{i}") for i in range(64)]
    assert tokens(Sampler(), logits, rows) == logits.argmax(dim=-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    greedy, rand = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3)
    rows = [row(greedy if i % 2 else rand, f"r{i}") for i in range(6)]
    original = logits.clone()
    out = tokens(Sampler(), logits, rows)
    assert torch.equal(logits, original), "the sampler must not modify its input"
    for i, t in enumerate(out):
        if i % 2:
            assert t == int(logits[i].argmax())
        else:
            assert t in logits[i].topk(3).indices.tolist()


def test_min_p_keeps_exactly_the_tokens_above_the_threshold() -> None:
    probs = torch.tensor([0.40, 0.25, 0.15, 0.09, 0.06, 0.05])  # threshold 0.2 * 0.4 = 0.08
    counts = draw_counts(SamplingParams(min_p=0.2), probs.log(), 20_000)
    assert counts[:4].gt(0).all() and counts[4:].eq(0).all()
    kept = torch.cat([probs[:4], torch.zeros(2)])
    assert_matches(counts, kept / kept.sum())


@pytest.mark.parametrize("seeded", [False, True], ids=["shared", "per-request"])
def test_distribution_after_temperature_top_k_top_p(seeded: bool) -> None:
    logits = torch.tensor([2.0, 1.6, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.8])
    temperature = 0.7
    p = torch.softmax(logits / temperature, dim=-1)
    # top_k=6 keeps ids 0, 1, 2, 3, 9, 4; renormalised, the first four hold ~0.9 of the mass,
    # so top_p=0.85 keeps 0, 1, 2, 3 (the first three hold < 0.85).
    kept = torch.zeros_like(p)
    kept[[0, 1, 2, 3]] = p[[0, 1, 2, 3]]
    top6 = p[[0, 1, 2, 3, 9, 4]].sum()
    assert p[[0, 1, 2]].sum() / top6 < 0.85 <= p[[0, 1, 2, 3]].sum() / top6
    params = SamplingParams(temperature=temperature, top_k=6, top_p=0.85)
    counts = draw_counts(params, logits, 4_000 if seeded else 20_000, seeded=seeded)
    assert_matches(counts, kept / kept.sum())


def test_plain_temperature_distribution_across_cdf_blocks() -> None:
    """A vocabulary of 600 (not a multiple of the CDF block) with mass on block edges."""
    logits = torch.full((600,), -30.0)
    heavy = [0, 3, 255, 256, 257, 511, 512, 599]
    logits[heavy] = torch.tensor([1.0, 0.5, 0.0, 1.5, -0.5, 0.7, 0.2, 1.2])
    counts = draw_counts(SamplingParams(temperature=1.3), logits, 20_000)
    assert_matches(counts, torch.softmax(logits / 1.3, dim=-1) * (logits > -30))


def test_top_p_nucleus_larger_than_the_candidate_window() -> None:
    """A flat distribution whose nucleus needs a full sort (more than 1024 tokens)."""
    logits = torch.zeros(2000)
    logits[:10] = 5.0  # ten likely tokens, then 1990 equally unlikely ones
    p = torch.softmax(logits, dim=-1)
    need = int(((0.9 - p[:10].sum()) / p[10]).ceil()) + 10  # tokens to reach 0.9
    assert need > 1024
    counts = draw_counts(SamplingParams(top_p=0.9), logits, 4_000)
    assert counts[:10].sum() > 0
    assert int(counts.gt(0).sum()) <= need  # nothing from past the nucleus...
    assert int(counts.nonzero().max()) >= 1024  # ...which reaches past the candidate window


# ---------------------------------------------------------------- processors, exact values


def test_penalties_match_a_hand_computed_reference() -> None:
    logits = torch.tensor([[2.0, -1.5, 0.75, 3.0, -0.25, 1.0, 0.0, -2.0]])
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7)
    prompt, output = (0, 1, 6), (3, 3, 4, 1, 3)
    got = process_logits(logits, [row(params, prompt=prompt, output=output)])[0]

    f32 = torch.float32
    rep, freq, pres = (torch.tensor(v, dtype=f32) for v in (1.3, 0.4, 0.7))
    expected = []
    for t, v in enumerate(logits[0]):
        if t in prompt or t in output:  # CTRL: divide positive logits, multiply negative ones
            v = v / rep if v > 0 else v * rep
        count = output.count(t)
        v = v - freq * torch.tensor(float(count), dtype=f32)
        v = v - pres * torch.tensor(float(count > 0), dtype=f32)
        expected.append(float(v))
    assert got.tolist() == expected  # bit-exact
    assert got[2] == 0.75 and got[5] == 1.0 and got[7] == -2.0  # unseen tokens untouched


def test_penalty_rows_do_not_touch_other_rows() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    plain = SamplingParams()
    rows = [
        row(plain, "a", prompt=(1, 2), output=(3,)),
        row(SamplingParams(frequency_penalty=1.0), "b", prompt=(1,), output=(5, 5)),
        row(plain, "c", output=(5,)),
    ]
    got = process_logits(logits, rows)
    assert torch.equal(got[[0, 2]], logits[[0, 2]])
    assert got[1, 5] == logits[1, 5] - 2.0 and got[1, 1] == logits[1, 1]


def test_logit_bias_is_added_and_steers_greedy() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 0] = 5.0
    params = SamplingParams(temperature=0.0, logit_bias={7: 6.5, 2: -1.25, 99: 3.0})
    rows = [row(params, "a"), row(SamplingParams(temperature=0.0), "b")]
    got = process_logits(logits, rows)
    assert got[0, 7] == 6.5 and got[0, 2] == -1.25 and got[0, 0] == 5.0  # 99: out of vocab
    assert torch.equal(got[1], logits[1])
    assert tokens(Sampler(), logits, rows) == [7, 0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, 10)
    logits[0, [2, 5, 8]] = torch.tensor([9.0, 8.0, 7.0])  # EOS 2, stop id 5 lead, then 8
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    short = row(params, output=(1, 1), eos=(2,))
    got = process_logits(logits, [short])[0]
    assert got[2] == NEG_INF and got[5] == NEG_INF and got[8] == 7.0
    assert tokens(Sampler(), logits, [short]) == [8]
    done = row(params, output=(1, 1, 1), eos=(2,))
    assert tokens(Sampler(), logits, [done]) == [2]


def test_logprobs_are_raw_and_exact() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.0, logprobs=5, presence_penalty=2.0),  # raw: no penalty
        SamplingParams(temperature=0.8, top_k=10, logprobs=0),
        SamplingParams(temperature=0.5),  # no logprobs asked
    ]
    rows = [row(p, f"r{i}", output=(int(logits[0].argmax()),)) for i, p in enumerate(params)]
    out = Sampler().sample(logits, rows)
    assert out[2][1] is None
    raw = torch.log_softmax(logits, dim=-1)
    for i, n in ((0, 5), (1, 0)):
        token, lp = out[i]
        assert lp is not None and lp.token_id == token
        assert lp.logprob == float(raw[i, token])
        assert lp.rank == 1 + int((raw[i] > raw[i, token]).sum())
        top_lp, top_ids = raw[i].topk(n)
        assert lp.top == tuple(zip(top_ids.tolist(), top_lp.tolist(), strict=True))
    assert out[0][1].rank > 1  # the penalty moved greedy off the raw argmax


# ---------------------------------------------------------------- seeds


def test_seeded_request_is_independent_of_the_batch() -> None:
    gen = torch.Generator().manual_seed(6)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    noisy = [SamplingParams(temperature=0.9), SamplingParams(temperature=1.2, top_k=20)]

    def run(batch_size: int, position: int, steps: list[torch.Tensor]) -> list[int]:
        sampler, out = Sampler(seed=batch_size), []
        for step_logits in steps:
            logits = torch.randn(batch_size, 64, generator=gen)
            logits[position] = step_logits
            rows = [row(noisy[i % 2], f"n{i}") for i in range(batch_size)]
            rows[position] = row(seeded, "me", output=tuple(out))
            out.append(sampler.sample(logits, rows)[position][0])
        return out

    steps = [torch.randn(64, generator=gen) * 0.5 for _ in range(8)]
    alone = run(1, 0, steps)
    assert run(5, 3, steps) == alone
    assert run(9, 0, steps) == alone
    assert run(4, 3, steps) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_free_resets_the_generator() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every draw shows the generator state
    params = SamplingParams(seed=7)
    sampler = Sampler()
    first = [tokens(sampler, logits, [row(params, "a")])[0] for _ in range(4)]
    other = Sampler()
    assert [tokens(other, logits, [row(params, "b")])[0] for _ in range(4)] == first
    assert [tokens(sampler, logits, [row(params, "a")])[0] for _ in range(4)] != first
    sampler.free(["a", "unknown"])
    assert [tokens(sampler, logits, [row(params, "a")])[0] for _ in range(4)] == first


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(8, 1000)
    rows = [row(SamplingParams(), f"r{i}") for i in range(8)]
    assert tokens(Sampler(seed=3), logits, rows) == tokens(Sampler(seed=3), logits, rows)
    assert tokens(Sampler(seed=3), logits, rows) != tokens(Sampler(seed=4), logits, rows)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(torch.zeros(2, 5), [row(SamplingParams())])
    assert Sampler().sample(torch.zeros(0, 5), []) == []


def test_every_bit_of_a_seed_reaches_the_generator() -> None:
    from engine.sampler import generator_seed

    # torch's CPU generator keeps 32 bits of its seed: seeds equal in their low 32 bits (and
    # 2**64, -2**63, 10**400, all 0 there) must not draw alike.
    seeds = [5, 5 + 2**32, 2**64, -(2**63), 10**400, 0, -1]
    folded = [generator_seed(s) & 0xFFFFFFFF for s in seeds]
    assert len(set(folded)) == len(seeds)
    assert generator_seed(5) == generator_seed(5)  # stable across calls and processes
    draws = [torch.rand(4, generator=torch.Generator().manual_seed(generator_seed(s))).tolist()
             for s in (5, 5 + 2**32)]
    assert draws[0] != draws[1]
