"""Acceptance rules: greedy prefix matching, and rejection sampling that keeps the target's law.

The distribution tests draw NUM_DRAWS verdicts from a seeded generator and run a Pearson
chi-square goodness-of-fit test at significance ALPHA against the exact law of the emitted tokens;
the critical value is the Wilson-Hilferty approximation of the chi-square (1 - ALPHA) quantile
(24.53 against the exact 24.32 at 7 degrees of freedom, closer above). Every draw is seeded, so
the tests are deterministic: a pass or a failure never depends on the run. Deliberately wrong
rules must fail the same test, which shows it has the power to catch them.
"""

from __future__ import annotations

import math
import pathlib
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import transformers

from engine.request import SamplingParams
from engine.sampler import Sampler, SamplingRow, _inverse_cdf, process_logits, sampling_probs
from engine.spec.rejection import Verdict, accept_greedy, accept_sampled
from engine.spec.types import Draft

ALPHA = 1e-3  # significance of every goodness-of-fit test
NUM_DRAWS = 20_000  # verdicts per distribution test
MIN_EXPECTED = 5.0  # every cell's expected count must reach this for the chi-square law to hold

Outcome = tuple[int, ...]  # emitted tokens (or a prefix of them) of one verdict


def critical_value(dof: int, alpha: float = ALPHA) -> float:
    """Wilson-Hilferty: chi2_dof quantile ~ dof * (1 - h + z sqrt(h))^3, h = 2 / (9 dof)."""
    z = float(torch.special.ndtri(torch.tensor(1.0 - alpha, dtype=torch.float64)))
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: Counter[Outcome], expected: dict[Outcome, float]) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; inf when a draw falls outside the support."""
    n = sum(counts.values())
    assert math.isclose(sum(expected.values()), 1.0, rel_tol=1e-6)
    support = {k: v for k, v in expected.items() if v > 0}
    assert min(support.values()) * n >= MIN_EXPECTED, "the test design needs more draws per cell"
    if any(k not in support for k in counts):
        return math.inf, len(support) - 1
    stat = sum((counts[k] - n * v) ** 2 / (n * v) for k, v in support.items())
    return stat, len(support) - 1


def assert_fits(counts: Counter[Outcome], expected: dict[Outcome, float]) -> None:
    stat, dof = chi_square(counts, expected)
    assert stat < critical_value(dof), (stat, dof, critical_value(dof))


def assert_rejected(counts: Counter[Outcome], expected: dict[Outcome, float]) -> None:
    stat, dof = chi_square(counts, expected)
    assert stat > critical_value(dof), (stat, dof, critical_value(dof))


def first_token_law(p: torch.Tensor) -> dict[Outcome, float]:
    """The law of the first emitted token: the root row p (V,)."""
    return {(t,): float(v) for t, v in enumerate(p.double() / p.double().sum())}


def sequence_law(probs: torch.Tensor, draft: Draft) -> dict[Outcome, float]:
    """The exact law of the whole emitted sequence for a deterministic draft tree: sampling from
    the target token by token while the tokens follow the tree, plus one token past it."""
    law: dict[Outcome, float] = {}
    p = probs.double() / probs.double().sum(dim=-1, keepdim=True)  # (1 + N, V)

    def walk(node: int, prefix: Outcome, mass: float) -> None:
        for t, pt in enumerate(p[node + 1].tolist()):
            child = next((c for c, par in enumerate(draft.parents)
                          if par == node and draft.token_ids[c] == t), None)
            if pt == 0.0:
                continue
            if child is None:
                law[(*prefix, t)] = mass * pt
            else:
                walk(child, (*prefix, t), mass * pt)

    walk(-1, (), 1.0)
    return law


def prefix_counts(counts: Counter[Outcome], length: int) -> Counter[Outcome]:
    """The counts of the outcomes' first `length` tokens."""
    out: Counter[Outcome] = Counter()
    for k, c in counts.items():
        out[k[:length]] += c
    return out


def prefix_law(law: dict[Outcome, float], length: int) -> dict[Outcome, float]:
    """The law of the first `length` tokens: every prefix of a verdict follows the target too."""
    out: dict[Outcome, float] = {}
    for k, v in law.items():
        out[k[:length]] = out.get(k[:length], 0.0) + v
    return out


def draw(rule: Callable[[torch.Generator], Outcome], n: int = NUM_DRAWS,
         seed: int = 0) -> Counter[Outcome]:
    gen = torch.Generator().manual_seed(seed)
    return Counter(rule(gen) for _ in range(n))


def check_verdict(verdict: Verdict, draft: Draft) -> None:
    """The structural contract: tokens follow the path, rows are the path's parents' rows."""
    assert len(verdict.token_ids) == len(verdict.rows) == len(verdict.path) + 1
    assert verdict.token_ids[:-1] == tuple(draft.token_ids[j] for j in verdict.path)
    assert verdict.rows == (0, *(1 + j for j in verdict.path))
    for parent, child in zip((-1, *verdict.path), verdict.path, strict=False):
        assert draft.parents[child] == parent


# ---------------------------------------------------------------- greedy


def test_greedy_chain_all_accepted_gets_the_bonus() -> None:
    draft = Draft.chain([5, 6, 7])
    verdict = accept_greedy([5, 6, 7, 9], draft)
    assert verdict == Verdict(path=(0, 1, 2), token_ids=(5, 6, 7, 9), rows=(0, 1, 2, 3))


def test_greedy_chain_stops_at_the_first_mismatch() -> None:
    draft = Draft.chain([5, 6, 7])
    verdict = accept_greedy([5, 8, 7, 9], draft)  # node 1 (6) mismatches row 1's target 8
    assert verdict == Verdict(path=(0,), token_ids=(5, 8), rows=(0, 1))


def test_greedy_no_match_emits_the_roots_target() -> None:
    assert accept_greedy([4, 6, 7, 9], Draft.chain([5, 6, 7])) == Verdict((), (4,), (0,))
    assert accept_greedy([4], Draft.chain([])) == Verdict((), (4,), (0,))


def test_greedy_tree_takes_the_matching_branch_whatever_the_sibling_order() -> None:
    #        root
    #      /   |    \
    #    3(0) 5(1)  8(5)
    #     |   /  \
    #   7(4) 6(2) 7(3)
    draft = Draft((3, 5, 6, 7, 7, 8), (-1, -1, 1, 1, 0, -1))
    targets = [5, 0, 7, 0, 11, 0, 0]  # row 0 -> 5 (node 1), row 2 -> 7 (node 3), row 4 -> 11
    verdict = accept_greedy(targets, draft)
    assert verdict == Verdict(path=(1, 3), token_ids=(5, 7, 11), rows=(0, 2, 4))
    check_verdict(verdict, draft)
    # The same tree with siblings listed in reverse: same tokens.
    reordered = Draft((8, 5, 7, 6, 3, 7), (-1, -1, 1, 1, -1, 4))
    targets = [5, 0, 7, 11, 0, 0, 0]  # row 0 -> 5 (node 1), row 2 -> 7 (node 2), row 3 -> 11
    assert accept_greedy(targets, reordered) == Verdict((1, 2), (5, 7, 11), (0, 2, 3))


def test_greedy_rejects_a_wrong_number_of_targets() -> None:
    with pytest.raises(ValueError, match="target tokens"):
        accept_greedy([1, 2], Draft.chain([1, 2]))


# ---------------------------------------------------------------- sampled: exact cases


def test_point_mass_target_accepts_the_whole_chain() -> None:
    probs = torch.zeros(4, 10)
    probs[[0, 1, 2, 3], [3, 4, 5, 6]] = 1.0  # the target surely says 3, 4, 5, then 6
    draft = Draft.chain([3, 4, 5])
    verdict = accept_sampled(probs, draft, torch.Generator().manual_seed(0))
    assert verdict == Verdict(path=(0, 1, 2), token_ids=(3, 4, 5, 6), rows=(0, 1, 2, 3))


def test_zero_probability_drafts_are_never_accepted() -> None:
    probs = torch.full((3, 6), 1 / 6)
    probs[0] = torch.tensor([0.2, 0.2, 0.0, 0.2, 0.2, 0.2])  # the root never says 2 ...
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        assert accept_sampled(probs, Draft.chain([2, 3]), gen).path == ()
        q = torch.zeros(2, 6)
        q[:, 2] = 1.0  # ... even when a draft model was sure of it
        assert accept_sampled(probs, Draft((2, 3), (-1, 0), q), gen).path == ()


def test_degenerate_draft_distributions_stay_well_defined() -> None:
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    gen = torch.Generator().manual_seed(2)
    # q(x) = 0 although x was drafted: accepted whenever p(x) > 0.
    assert all(accept_sampled(p, Draft((1,), (-1,), torch.tensor([[1.0, 0.0]])), gen).path
               for _ in range(100))
    # q >= p everywhere (an unnormalised q): the residual has no mass, so p is kept.
    seen = Counter(accept_sampled(p, Draft((0,), (-1,), torch.tensor([[0.6, 0.6]])), gen).token_ids
                   for _ in range(400))
    assert set(seen) <= {(0, 0), (0, 1), (0,), (1,)} and (1,) in seen


def test_same_seed_same_verdicts() -> None:
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(3)), dim=-1)
    draft = Draft((1, 2, 3), (-1, -1, 0))

    def run() -> list[tuple[int, ...]]:
        gen = torch.Generator().manual_seed(4)
        return [accept_sampled(probs, draft, gen).token_ids for _ in range(50)]

    assert run() == run()


def test_rejects_probs_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="probs"):
        accept_sampled(torch.ones(2, 5) / 5, Draft.chain([1, 2]), torch.Generator())


# ---------------------------------------------------------------- sampled: distributions


@pytest.fixture(scope="module")
def model_rows(tiny_llama_dir: pathlib.Path,
               smollm2_tokenizer: transformers.PreTrainedTokenizerFast,
               ) -> tuple[torch.Tensor, Draft]:
    """A verify pass of the tiny Llama over a context and the 2-chain of its most likely
    continuations: (3, K) target rows (temperature 1, top_k 8, through `sampling_probs`, then
    restricted to the K tokens any row can produce) and the chain in those K local ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids: list[int] = smollm2_tokenizer("The quick brown fox jumps over the").input_ids
    params = SamplingParams(temperature=1.0, top_k=8)
    with torch.no_grad():
        for _ in range(2):  # greedily extend: the draft is the model's own best guess
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logits = model(torch.tensor([ids])).logits[0, -3:]  # (3, vocab): root, node 0, node 1
    rows = [SamplingRow("r", params, ids[:-2], ids[-2:][:k]) for k in range(3)]
    probs = sampling_probs(process_logits(logits, rows), rows)  # (3, vocab)
    support = probs.sum(dim=0).nonzero().squeeze(1)  # (K,)
    local = {int(t): k for k, t in enumerate(support)}
    return probs[:, support], Draft.chain([local[ids[-2]], local[ids[-1]]])


def test_chain_from_a_real_model_emits_the_target_law(
        model_rows: tuple[torch.Tensor, Draft]) -> None:
    """Deterministic 2-chain: the whole emitted sequence (1 to 3 tokens) follows the target."""
    probs, draft = model_rows

    def rule(gen: torch.Generator) -> Outcome:
        verdict = accept_sampled(probs, draft, gen)
        check_verdict(verdict, draft)
        return verdict.token_ids

    counts = draw(rule)
    assert {len(k) for k in counts} == {1, 2, 3}  # rejections at each depth, and full accepts
    assert_fits(counts, sequence_law(probs, draft))
    assert_fits(prefix_counts(counts, 1), first_token_law(probs[0]))


def synthetic_probs(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    """(num_rows, vocab) distributions, every entry >= ~0.03, token vocab - 1 never emitted."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(num_rows, vocab, generator=gen) + 0.3
    p[:, -1] = 0.0
    return p / p.sum(dim=-1, keepdim=True)


TREE = Draft((2, 9, 0, 4, 4), (-1, -1, -1, 0, 2))  # 3 root candidates, one impossible (p = 0)


def test_tree_of_sibling_candidates_emits_the_target_law() -> None:
    probs = synthetic_probs(1 + TREE.num_tokens, 10, seed=5)
    probs[0, 2] = 0.3  # a likely first candidate, so the later siblings see a renormalised p
    probs[0] /= probs[0].sum()
    counts = draw(lambda gen: accept_sampled(probs, TREE, gen).token_ids)
    # The first two tokens (deeper cells are too rare for the chi-square law at NUM_DRAWS).
    assert_fits(prefix_counts(counts, 2), prefix_law(sequence_law(probs, TREE), 2))
    assert_fits(prefix_counts(counts, 1), first_token_law(probs[0]))


def draft_model_rule(probs: torch.Tensor, q: torch.Tensor,
                     parents: tuple[int, ...]) -> Callable[[torch.Generator], Outcome]:
    """A draft model: each node's token drawn from its q row (siblings independently), then
    verified; the outcome is the first emitted token."""
    def rule(gen: torch.Generator) -> Outcome:
        tokens = torch.multinomial(q, 1, generator=gen).squeeze(1).tolist()  # (N,)
        return accept_sampled(probs, Draft(tuple(tokens), parents, q), gen).token_ids[:1]

    return rule


def test_draft_model_chain_emits_the_target_law() -> None:
    probs = synthetic_probs(3, 10, seed=6)  # the target never says 9 ...
    q = synthetic_probs(2, 10, seed=7).roll(4, dims=1)  # ... the draft model often does
    counts = draw(draft_model_rule(probs, q, (-1, 0)))
    assert_fits(counts, first_token_law(probs[0]))


def test_draft_model_siblings_emit_the_target_law() -> None:
    probs = synthetic_probs(4, 10, seed=8)
    q = synthetic_probs(1, 10, seed=9).roll(3, dims=1).expand(3, -1)  # 3 i.i.d. root candidates
    counts = draw(draft_model_rule(probs, q, (-1, -1, -1)))
    assert_fits(counts, first_token_law(probs[0]))


# ---------------------------------------------------------------- wrong rules fail the test


def wrong_first_token(rule: str, p: torch.Tensor, candidates: list[int],
                      q: torch.Tensor | None, gen: torch.Generator) -> Outcome:
    """The root step of a broken acceptance rule; p, q: (V,). Rules:
    "keep_rejected": on rejection, resample from p with the rejected token still in it;
    "no_renormalise": siblings accepted with their p(x) instead of the renormalised one;
    "residual_is_p": draft model, on rejection resample from p instead of max(0, p - q)."""
    p = p.double()
    left = p.clone()  # what the correction draw samples from
    for x in candidates:
        if q is not None:
            accept = min(1.0, float(p[x] / q[x]))
        elif rule == "no_renormalise":
            accept = float(p[x])
        else:
            accept = float(left[x] / left.sum())
        if float(torch.rand((), dtype=torch.float64, generator=gen)) < accept:
            return (x,)
        if rule == "no_renormalise":
            left[x] = 0.0
    return (int(torch.multinomial(left, 1, generator=gen)),)


def test_keeping_the_rejected_token_fails(model_rows: tuple[torch.Tensor, Draft]) -> None:
    probs, draft = model_rows
    candidate = [draft.token_ids[0]]
    counts = draw(lambda gen: wrong_first_token("keep_rejected", probs[0], candidate, None, gen))
    assert_rejected(counts, first_token_law(probs[0]))


def test_siblings_without_renormalising_fail() -> None:
    probs = synthetic_probs(1 + TREE.num_tokens, 10, seed=5)
    probs[0, 2] = 0.3
    probs[0] /= probs[0].sum()
    candidates = [2, 9, 0]  # TREE's root children
    counts = draw(lambda gen: wrong_first_token("no_renormalise", probs[0], candidates, None, gen))
    assert_rejected(counts, first_token_law(probs[0]))


def test_draft_model_without_the_residual_fails() -> None:
    probs = synthetic_probs(3, 10, seed=6)
    q = synthetic_probs(2, 10, seed=7).roll(4, dims=1)

    def rule(gen: torch.Generator) -> Outcome:
        x = int(torch.multinomial(q[0], 1, generator=gen))
        return wrong_first_token("residual_is_p", probs[0], [x], q[0], gen)

    assert_rejected(draw(rule), first_token_law(probs[0]))


def test_always_accepting_fails(model_rows: tuple[torch.Tensor, Draft]) -> None:
    probs, draft = model_rows
    counts = draw(lambda gen: (draft.token_ids[0],), n=1000)
    assert_rejected(counts, first_token_law(probs[0]))


# ---------------------------------------------------------------- the sampler pieces it uses


def test_sampling_probs_and_generator_for_reproduce_the_sampler() -> None:
    """A seeded row drawn by hand (sampling_probs + generator_for + one inverse-CDF draw) gets
    the sampler's tokens: rejection sampling sees the distribution the sampler draws from."""
    logits = torch.randn(6, 700, generator=torch.Generator().manual_seed(10)) * 2
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=123,
                            repetition_penalty=1.2)
    rows = [SamplingRow("a", params, (1, 2, 3), (4, 5, 6)[:k]) for k in range(6)]
    sampler, by_hand = Sampler(), Sampler()
    for logit_row, sampling_row in zip(logits, rows, strict=True):
        expected = sampler.sample(logit_row.unsqueeze(0), [sampling_row])[0][0]
        p = sampling_probs(process_logits(logit_row.unsqueeze(0), [sampling_row]), [sampling_row])
        u = torch.rand(1, dtype=torch.float64, generator=by_hand.generator_for(sampling_row))
        assert int(_inverse_cdf(p, u)) == expected
    assert by_hand.generator_for(rows[0]) is by_hand.generator_for(rows[1])  # one per request
    unseeded = SamplingRow("b", SamplingParams(), (), ())
    assert by_hand.generator_for(unseeded) is by_hand.generator_for(
        SamplingRow("c", SamplingParams(), (), ()))  # the shared one
