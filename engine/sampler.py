"""Token sampling: one row of logits -> one token (and its logprob), with vLLM v1's semantics.

Per row, in this order (vLLM v1 `Sampler.forward`):

    raw logprobs  = log_softmax(logits)            (rows asking for logprobs; before anything else)
    logit_bias    -> min_tokens mask (EOS + stop ids = -inf) -> penalties (repetition CTRL-style
                     over prompt + output, then frequency, then presence over output)
                  -> grammar mask (structured outputs: only the rows that have a grammar)
    greedy rows   -> argmax (temperature < 1e-5 counts as greedy, like vLLM)
    random rows   -> / temperature -> min_p -> top_k -> top_p -> softmax -> inverse CDF draw

A random row draws one u ~ U[0, 1) and takes the first token whose float64 cumulative probability
exceeds u * total, which picks token i with probability p_i. Unseeded rows draw their u from one
shared generator (one batched call); a seeded row draws from its own generator, so its tokens
depend only on its seed and its logits, whatever else is in the batch. Every step is a batched
torch op over the rows that need it; the only Python loops are over rows, never over the vocabulary.

Speculative decoding reuses the pieces: `sampling_probs` (the distribution a random row draws
from), `Sampler.generator_for` (where a row's draws come from) and `token_logprobs`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.request import SamplingParams
from engine.structured.masks import GrammarMasks
from npu_sim.kernels import native

_NEG_INF = float("-inf")
_CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF
_TOP_P_CANDIDATES = 1024  # top-p looks among this many most likely tokens before a full sort


def generator_seed(seed: int) -> int:
    """The torch generator seed for a request's (or the engine's) `seed`: every bit of the
    integer counts. torch's CPU generator (mt19937) keeps only the low 32 bits of what it is
    given, so seed 5 and 5 + 2**32 drew the same tokens; hashing the whole integer first makes
    distinct seeds collide only by chance (one pair in 2**32), never by construction."""
    data = seed.to_bytes(seed.bit_length() // 8 + 1, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about the request behind one row of logits."""

    request_id: str  # keys the per-request generator of a seeded request
    params: SamplingParams  # how to sample this row
    prompt_token_ids: Sequence[int]  # the prompt (repetition penalty looks at it)
    output_token_ids: Sequence[int]  # generated so far, before this token (penalties, min_tokens)
    eos_token_ids: tuple[int, ...] = ()  # the model's EOS ids: masked, with params.stop_token_ids,
    #   while len(output_token_ids) < params.min_tokens (vLLM passes them even with ignore_eos)


class Sampler:
    """Samples one token per row of logits; keeps the generators of seeded requests.

    Not thread-safe: one engine loop owns it. Call `free()` when requests finish, or their
    generators stay alive (a few hundred bytes each).
    """

    def __init__(self, seed: int = 0) -> None:
        self._shared = torch.Generator().manual_seed(generator_seed(seed))  # unseeded rows
        self._generators: dict[str, torch.Generator] = {}  # request id -> its seeded generator

    def free(self, request_ids: Iterable[str]) -> None:
        """Drop the generators of finished requests (unknown ids are ignored)."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow],
        masks: GrammarMasks | None = None,
    ) -> list[tuple[int, TokenLogprob | None]]:
        """Pick one token per row.

        logits: (num_rows, vocab), any float dtype; not modified. masks: the grammar masks of
        the rows that have one (structured outputs); their other tokens get -inf last. Returns,
        per row in order, the token id and, when `params.logprobs is not None`, its TokenLogprob
        computed from the raw logits (log_softmax before bias, penalties, temperature and
        grammar: vLLM's "raw_logprobs").
        Token ids outside [0, vocab) in logit_bias / stop_token_ids / eos_token_ids are ignored
        (validating them against the vocabulary is the caller's job).
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be (len(rows), vocab), got {tuple(logits.shape)}")
        if not rows:
            return []
        x = process_logits(logits, rows, masks)  # (R, V) float32
        is_greedy = [r.params.greedy for r in rows]
        if all(is_greedy):
            token_ids = _argmax(x)  # (R,) ties -> lowest id
        elif not any(is_greedy):
            token_ids = self._sample_random(x, rows)  # (R,)
        else:
            g_idx = torch.tensor([i for i, g in enumerate(is_greedy) if g])  # (G,)
            r_idx = torch.tensor([i for i, g in enumerate(is_greedy) if not g])  # (R - G,)
            token_ids = torch.empty(len(rows), dtype=torch.long)  # (R,)
            token_ids[g_idx] = _argmax(x[g_idx])
            token_ids[r_idx] = self._sample_random(x[r_idx], [rows[i] for i in r_idx.tolist()])
        token_list: list[int] = token_ids.tolist()
        logprobs = token_logprobs(logits, rows, token_ids)
        return [(t, logprobs.get(i)) for i, t in enumerate(token_list)]

    def generator_for(self, row: SamplingRow) -> torch.Generator:
        """The generator row's draws come from: the request's own one, seeded with params.seed on
        first use (kept until `free()`), or the shared one for unseeded requests."""
        if row.params.seed is None:
            return self._shared
        gen = self._generators.get(row.request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(generator_seed(row.params.seed))
            self._generators[row.request_id] = gen
        return gen

    def _sample_random(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """x: (R, V) processed logits of non-greedy rows (not modified). Returns (R,) token ids."""
        num_rows = x.shape[0]
        u = torch.empty(num_rows, dtype=torch.float64)  # (R,) one uniform draw per row
        seeded = [i for i, r in enumerate(rows) if r.params.seed is not None]
        if len(seeded) < num_rows:
            unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
            draws = torch.rand(len(unseeded), dtype=torch.float64, generator=self._shared)
            u[torch.tensor(unseeded)] = draws
        for i in seeded:  # a seeded row's draw comes from its own generator only
            u[i] = torch.rand((), dtype=torch.float64, generator=self.generator_for(rows[i]))
        return _inverse_cdf(sampling_probs(x, rows), u)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of (R, V) fp32 logits: the C kernel where it is built (ATen's argmax does
    not vectorise: ~14x the time of a max over a 49k vocabulary), else ATen's."""
    token_ids = native.argmax_rows(x)
    return x.argmax(dim=-1) if token_ids is None else token_ids


def sampling_probs(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution a non-greedy row's token is drawn from.

    x: (R, V) processed logits (`process_logits`) of rows with `not params.greedy`; not modified.
    Returns (R, V) float32: softmax of x / temperature after the min_p, top_k and top_p cuts;
    filtered tokens have probability exactly 0. Rows sum to 1 up to float32 rounding.
    """
    vocab = x.shape[1]
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)  # (R,)
    x = x / temps.unsqueeze(1)  # (R, V) a new tensor: edited in place below

    min_p = [r.params.min_p for r in rows]
    if any(m > 0.0 for m in min_p):  # rows with min_p == 0 get threshold 0: an exact no-op
        probs = x.softmax(dim=-1)  # (R, V)
        thresh = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p).unsqueeze(1)  # (R, 1)
        x.masked_fill_(probs < thresh, _NEG_INF)

    cut = [i for i, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
    if cut:
        c_idx = torch.tensor(cut)
        top_k = [rows[i].params.top_k for i in cut]
        top_p = [rows[i].params.top_p for i in cut]
        sub = x[c_idx]  # (C, V)
        _top_k_top_p(sub, top_k, top_p)
        x[c_idx] = sub
    return x.softmax(dim=-1)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow],
                   masks: GrammarMasks | None = None) -> torch.Tensor:
    """The logits greedy sampling sees: logit_bias, then the min_tokens mask, then penalties,
    then the grammar masks of the rows that have one (only those rows are touched).

    logits: (R, V), not modified. Returns (R, V) float32: a new contiguous tensor when any row
    needs one of these steps, else logits itself (converted to float32 if needed): read-only.
    """
    edits = masks is not None or any(
        r.params.logit_bias
        or r.params.needs_penalties
        or len(r.output_token_ids) < r.params.min_tokens
        for r in rows
    )
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=edits)  # (R, V)
    if edits:
        _apply_logit_bias(x, rows)
        _apply_min_tokens(x, rows)
        _apply_penalties(x, rows)
        if masks is not None:
            masks.apply(x, logits)
    return x


def _apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """x[i, t] += bias for every (t, bias) in row i's logit_bias (one indexed add)."""
    vocab = x.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    vals: list[float] = []
    for i, row in enumerate(rows):
        for t, v in row.params.logit_bias.items():
            if 0 <= t < vocab:
                r_idx.append(i)
                t_idx.append(t)
                vals.append(v)
    if r_idx:
        idx = (torch.tensor(r_idx), torch.tensor(t_idx))
        x.index_put_(idx, torch.tensor(vals, dtype=torch.float32), accumulate=True)


def _apply_min_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """x[i, t] = -inf for EOS and stop token ids of rows still short of min_tokens."""
    vocab = x.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            for t in {*row.eos_token_ids, *row.params.stop_token_ids}:
                if 0 <= t < vocab:
                    r_idx.append(i)
                    t_idx.append(t)
    if r_idx:
        x[torch.tensor(r_idx), torch.tensor(t_idx)] = _NEG_INF


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (prompt + output), frequency and presence (output) penalties, in that order.

    x: (R, V) contiguous, edited in place. Only the (row, token) entries whose token occurs in the
    row's output (or prompt, with a repetition penalty) are touched, so the cost is O(tokens), not
    O(rows * vocab); per entry: v = v / rep if v > 0 else v * rep; v -= freq * count;
    v -= presence * (count > 0), all in float32 (no-op values leave v bit-identical).
    """
    pen = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    if not pen:
        return
    vocab = x.shape[1]
    out = _flat_keys([(i, rows[i].output_token_ids) for i in pen], vocab)  # (N_out,)
    rep_rows = [i for i in pen if rows[i].params.repetition_penalty != 1.0]
    prompt = _flat_keys([(i, rows[i].prompt_token_ids) for i in rep_rows], vocab)  # (N_prompt,)
    keys, inverse = torch.unique(torch.cat([out, prompt]), return_inverse=True)  # (S,) row*V+tok
    if not len(keys):
        return
    counts = torch.zeros(len(keys)).index_add_(0, inverse[: len(out)], torch.ones(len(out)))
    row = keys // vocab  # (S,)
    rep = torch.tensor([r.params.repetition_penalty for r in rows], dtype=torch.float32)[row]
    freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=torch.float32)[row]
    pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=torch.float32)[row]
    flat = x.view(-1)  # (R * V,)
    v = flat[keys]  # (S,)
    v = torch.where(v > 0, v / rep, v * rep)
    v = v - freq * counts
    v = v - pres * (counts > 0).to(torch.float32)
    flat[keys] = v


def _flat_keys(token_lists: Sequence[tuple[int, Sequence[int]]], vocab: int) -> torch.Tensor:
    """(total,) int64 keys row * vocab + token for (row, token ids) pairs; ids outside the vocab
    are dropped."""
    ids = torch.tensor([t for _, ts in token_lists for t in ts], dtype=torch.long)  # (total,)
    row = torch.repeat_interleave(
        torch.tensor([i for i, _ in token_lists], dtype=torch.long),
        torch.tensor([len(ts) for _, ts in token_lists], dtype=torch.long),
    )  # (total,)
    keep = (ids >= 0) & (ids < vocab)
    return row[keep] * vocab + ids[keep]


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """x: (C, V) logits, modified in place: tokens outside top-k, then top-p, set to -inf.

    top_k keeps every token whose logit is >= the k-th largest (ties at the boundary kept, as in
    vLLM); 0, -1 or >= V is off. top_p keeps the smallest most-likely-first prefix whose mass,
    renormalised after top-k, reaches top_p (always at least one token); 1.0 is off.
    """
    vocab = x.shape[1]
    k_rows = [j for j, k in enumerate(top_k) if 0 < k < vocab]
    if k_rows:
        kr = torch.tensor(k_rows)
        k = torch.tensor([top_k[j] for j in k_rows])  # (K,)
        sub = x[kr]  # (K, V)
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # (K, 1)
        x[kr] = sub.masked_fill_(sub < kth, _NEG_INF)
    p_rows = [j for j, p in enumerate(top_p) if p < 1.0]
    if p_rows:
        pr = torch.tensor(p_rows)
        p = torch.tensor([top_p[j] for j in p_rows]).unsqueeze(1)  # (P, 1)
        sub = x[pr]  # (P, V)
        probs = sub.softmax(dim=-1)  # (P, V)
        # Most nuclei fit in the top few hundred tokens: look there first, sort fully only the
        # rows whose nucleus does not fit (the choice depends on the row alone, not the batch).
        keep, fits = _nucleus(probs, p, min(vocab, _TOP_P_CANDIDATES))  # (P, V), (P,)
        if not bool(fits.all()):
            rest = (~fits).nonzero().squeeze(1)  # (P',)
            keep[rest] = _nucleus(probs[rest], p[rest], vocab)[0]
        x[pr] = sub.masked_fill_(~keep, _NEG_INF)


def _nucleus(probs: torch.Tensor, p: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p among the m most likely tokens. probs: (P, V); p: (P, 1).

    Returns keep (P, V) bool and fits (P,) bool: whether the m candidates already hold mass >= p,
    i.e. keep is the exact nucleus (always true when m == V).
    """
    top, idx = probs.topk(m, dim=-1)  # (P, m) descending
    cum = top.cumsum(dim=-1)  # (P, m)
    before = torch.zeros_like(cum)  # (P, m) mass of the strictly likelier candidates
    before[:, 1:] = cum[:, :-1]
    fits = (cum[:, -1:] >= p).squeeze(1) | (m == probs.shape[1])  # (P,)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, before < p)  # (P, V)
    return keep, fits


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u * total.

    probs: (R, V) float32 (float64 works too), rows need not sum to 1; u: (R,) float64 in [0, 1).
    Returns (R,) ids.
    Two levels keep it exact and cheap: pick a block of _CDF_BLOCK tokens on the float64 cdf of
    block sums, then the token on the float64 cdf inside the block. Token i is drawn with
    probability p_i / sum(p) up to ~1e-7 relative; zero-probability tokens own empty intervals
    and are never drawn.
    """
    num_rows, vocab = probs.shape
    pad = -vocab % _CDF_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.view(num_rows, -1, _CDF_BLOCK)  # (R, NB, B)
    block_cdf = blocks.sum(dim=-1).to(torch.float64).cumsum_(dim=-1)  # (R, NB)
    target = u.unsqueeze(1) * block_cdf[:, -1:]  # (R, 1)
    b = _search(block_cdf, target)  # (R, 1) chosen block
    lo = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_(min=0)), 0.0)  # (R, 1)
    width = block_cdf.gather(1, b) - lo  # (R, 1) > 0: blocks without mass are never chosen
    local = blocks.gather(1, b.unsqueeze(2).expand(-1, 1, _CDF_BLOCK)).squeeze(1)  # (R, B)
    local_cdf = local.to(torch.float64).cumsum_(dim=-1)  # (R, B)
    local_target = (target - lo) / width * local_cdf[:, -1:]  # (R, 1) same fraction, in block
    return (b * _CDF_BLOCK + _search(local_cdf, local_target)).squeeze(1)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R, 1) first index with cdf > target; if rounding put target at or past the total, the
    last index with mass (where the cdf first reaches its maximum). cdf: (R, N); target: (R, 1)."""
    idx = torch.searchsorted(cdf, target, right=True)  # (R, 1)
    return torch.minimum(idx, cdf.argmax(dim=-1, keepdim=True))


def token_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor
) -> dict[int, TokenLogprob]:
    """Row index -> TokenLogprob of token_ids[i] for rows i with params.logprobs set.

    logits: (R, V) raw logits (before bias, penalties and temperature); token_ids: (R,) int64.
    The logprob is log_softmax of the raw logits, the rank counts strictly likelier tokens plus 1,
    and the top list holds params.logprobs (id, logprob) pairs, most likely first.
    """
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return {}
    w_idx = torch.tensor(want)
    lp = torch.log_softmax(logits[w_idx].to(torch.float32), dim=-1)  # (L, V)
    chosen = token_ids[w_idx].unsqueeze(1)  # (L, 1)
    chosen_lp = lp.gather(1, chosen)  # (L, 1)
    ranks = ((lp > chosen_lp).sum(dim=-1) + 1).tolist()  # (L,)
    n_top = min(max(rows[i].params.logprobs or 0 for i in want), lp.shape[1])
    top_lp, top_ids = lp.topk(n_top, dim=-1) if n_top else (lp[:, :0], chosen[:, :0])  # (L, n)
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    chosen_l, chosen_lp_l = chosen.squeeze(1).tolist(), chosen_lp.squeeze(1).tolist()
    out: dict[int, TokenLogprob] = {}
    for j, i in enumerate(want):
        n = rows[i].params.logprobs or 0
        top = tuple(zip(top_ids_l[j][:n], top_lp_l[j][:n], strict=True))
        out[i] = TokenLogprob(chosen_l[j], chosen_lp_l[j], ranks[j], top)
    return out
