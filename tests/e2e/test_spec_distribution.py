"""Sampling with speculation leaves the output distribution that of the target model.

A tiny random model, a prompt repeating four tokens so that the n-gram drafters always find a
draft, and a logit bias that keeps the support to those four tokens: the first two sampled tokens
(the second one comes out of a verify of one draft token) are counted over many requests with
and without speculation, and a chi-square test of homogeneity compares the two 4 x 4 tables.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

NUM_REQUESTS = 3000
ALPHA = 1e-3  # a correct engine fails this test once in a thousand seeds; the seed is fixed


def critical_value(dof: int, alpha: float = ALPHA) -> float:
    """The chi-square (1 - alpha) quantile (Wilson-Hilferty; within 1% for dof >= 5)."""
    z = float(torch.special.ndtri(torch.tensor(1.0 - alpha, dtype=torch.float64)))
    return dof * (1.0 - 2.0 / (9.0 * dof) + z * math.sqrt(2.0 / (9.0 * dof))) ** 3


def homogeneity(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> tuple[float, int]:
    """Pearson's chi-square statistic that samples a and b come from one distribution, and its
    degrees of freedom (cells seen in either sample, less one)."""
    cells = sorted(set(a) | set(b))
    n_a, n_b = sum(a.values()), sum(b.values())
    stat = 0.0
    for cell in cells:
        total = a[cell] + b[cell]
        for count, n in ((a[cell], n_a), (b[cell], n_b)):
            expected = total * n / (n_a + n_b)
            stat += (count - expected) ** 2 / expected
    return stat, len(cells) - 1


def _pairs(llm: LLM, prompt: list[int], params: SamplingParams) -> Counter[tuple[int, ...]]:
    outs = llm.generate([prompt] * NUM_REQUESTS, params, use_tqdm=False)
    return Counter(tuple(o.token_ids[:2]) for o in outs)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir) -> tuple[list[int], SamplingParams, Counter[tuple[int, ...]]]:
    support = [1000, 2000, 3000, 4000]
    prompt = support * 6
    # +30 lifts the four far above the rest of the vocabulary (mass outside them < 1e-6);
    # temperature 1.5 keeps all four likely enough for a 16-cell table
    # (max_tokens 3: the second token's step may verify a draft, the third being its bonus)
    params = SamplingParams(temperature=1.5, max_tokens=3, ignore_eos=True,
                            logit_bias={t: 30.0 for t in support})
    plain = _pairs(LLM(model=str(tiny_llama_dir), dtype="float32", seed=1), prompt, params)
    assert len(plain) >= 12 and min(plain.values()) >= 5  # every cell well populated
    return prompt, params, plain


@pytest.mark.parametrize("speculative", ["ngram", "tree"])
def test_sampled_distribution_is_unchanged(setup, tiny_llama_dir, speculative,
                                           record_spec_stats) -> None:
    prompt, params, plain = setup
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", seed=2, speculative=speculative,
              num_speculative_tokens=3, spec_token_cost=0.0, max_num_seqs=256)
    stats = record_spec_stats(llm)
    spec = _pairs(llm, prompt, params)
    stat, dof = homogeneity(plain, spec)
    assert stat < critical_value(dof), (stat, dof, plain, spec)
    # every second token went through a verify; some drafts were accepted, some rejected
    assert sum(s.num_drafts for s in stats) == NUM_REQUESTS
    accepted = sum(s.num_accepted_tokens for s in stats)
    assert 0.1 * NUM_REQUESTS < accepted < sum(s.num_draft_tokens for s in stats)


def test_a_wrong_rule_fails_the_same_test(setup, tiny_llama_dir, monkeypatch) -> None:
    """Accepting every draft token (no rejection) must be caught by the test above."""
    import engine.spec.verify as verify_module
    from engine.spec.rejection import accept_greedy

    prompt, params, plain = setup

    def accept_all(probs, draft, generator):  # the draft's chain, then a greedy bonus
        return accept_greedy([*draft.token_ids, int(probs[-1].argmax())], draft)

    monkeypatch.setattr(verify_module, "accept_sampled", accept_all)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", seed=2, speculative="ngram",
              num_speculative_tokens=3, spec_token_cost=0.0, max_num_seqs=256)
    stat, dof = homogeneity(plain, _pairs(llm, prompt, params))
    assert stat > critical_value(dof)
