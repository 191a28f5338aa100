"""Workloads for `xyserve simulate`: request arrivals and lengths, read from traces or drawn.

A workload is a list of RequestSpec (arrival time on the simulated clock, prompt and output
lengths, optionally the prompt's token ids). Sources:
- the Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`; the 2023 code
  and conversation traces): arrivals and lengths as recorded, arrivals from the first one;
- a ShareGPT-style JSON (a list of conversations, `{"conversations": [{"from": "human", "value":
  ...}, {"from": "gpt", "value": ...}]}`, or of records with length fields): lengths from the
  first human turn and the reply, tokenized with the model's tokenizer when there is one, else
  read from `prompt_len` / `output_len` fields; arrivals drawn as for synthetic workloads;
- synthetic: Poisson or gamma arrivals at a rate, fixed / uniform / lognormal lengths, seeded.
Errors name the file and the line (or record) at fault.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.token_ids import pack

LongPolicy = Literal["clip", "drop"]
Arrivals = Literal["poisson", "gamma"]


class WorkloadError(ValueError):
    """A workload that cannot be read or drawn; the message names the file and line."""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    arrival_s: float  # simulated seconds from the workload's start
    prompt_len: int  # prompt tokens (>= 1)
    output_len: int  # tokens to generate (>= 1): the request ends there (`length`)
    prompt_token_ids: tuple[int, ...] | None = None  # the prompt itself, when the source has
    #   text (prefix caching then sees real sharing); None = synthetic, unique ids


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order, plus what shaping them dropped or clipped."""

    requests: tuple[RequestSpec, ...]  # sorted by arrival
    source: str  # where they came from, for the summary
    num_dropped: int = 0  # longer than max_model_len, dropped (policy "drop")
    num_clipped: int = 0  # longer than max_model_len, clipped (policy "clip")

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0


# ------------------------------------------------------------------------------ lengths


def length_sampler(spec: str, rng: random.Random) -> Callable[[], int]:
    """A length distribution from its spec: `N` (fixed), `uniform:low=A,high=B` (inclusive),
    `lognormal:mean=M,sigma=S` (M the mean length in tokens, S the log-space sigma); samples
    are at least 1. Raises WorkloadError naming the spec."""
    kind, _, args = spec.partition(":")
    try:
        if not args and kind.strip().isdigit():
            value = int(kind)
            if value < 1:
                raise ValueError("a length must be at least 1")
            return lambda: value
        params = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in args.split(","))}
        if kind == "uniform" and set(params) == {"low", "high"}:
            low, high = int(params["low"]), int(params["high"])
            if not 1 <= low <= high:
                raise ValueError("need 1 <= low <= high")
            return lambda: rng.randint(low, high)
        if kind == "lognormal" and set(params) == {"mean", "sigma"}:
            mean, sigma = params["mean"], params["sigma"]
            if mean < 1 or sigma < 0:
                raise ValueError("need mean >= 1 and sigma >= 0")
            mu = math.log(mean) - sigma * sigma / 2  # so that the mean is `mean`
            return lambda: max(1, round(rng.lognormvariate(mu, sigma)))
        raise ValueError("expected N, uniform:low=A,high=B or lognormal:mean=M,sigma=S")
    except ValueError as exc:
        raise WorkloadError(f"length {spec!r}: {exc}") from None


def arrival_times(num_requests: int, rate: float, process: Arrivals, burstiness: float,
                  rng: random.Random) -> list[float]:
    """Arrival times of num_requests at `rate` requests/s (inf: all at 0): Poisson, or gamma
    inter-arrival gaps with shape `burstiness` (1 = Poisson, < 1 burstier), as vLLM's bench."""
    if rate <= 0:
        raise WorkloadError(f"request rate must be positive, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    shape = 1.0 if process == "poisson" else burstiness
    if shape <= 0:
        raise WorkloadError(f"burstiness must be positive, got {burstiness}")
    times, now = [], 0.0
    for _ in range(num_requests):
        now += rng.gammavariate(shape, 1.0 / (rate * shape))
        times.append(now)
    return times


def synthetic(num_requests: int, rate: float, input_len: str, output_len: str, seed: int = 0,
              process: Arrivals = "poisson", burstiness: float = 1.0) -> Workload:
    """A drawn workload (seeded: the same arguments give the same requests)."""
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be at least 1, got {num_requests}")
    rng = random.Random(seed)
    prompt, output = length_sampler(input_len, rng), length_sampler(output_len, rng)
    times = arrival_times(num_requests, rate, process, burstiness, rng)
    requests = tuple(RequestSpec(t, prompt(), output()) for t in times)
    return Workload(requests, f"synthetic {process} at {rate:g} req/s, input {input_len}, "
                              f"output {output_len}, seed {seed}")


# ------------------------------------------------------------------------------ traces


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure_csv(path: str | Path) -> Workload:
    """The Azure LLM inference trace format; arrivals relative to the first request."""
    path = Path(path)
    rows: list[tuple[datetime, int, int]] = []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = set(AZURE_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise WorkloadError(f"{path}:1: not an Azure trace CSV: no column "
                                    f"{', '.join(sorted(missing))} "
                                    f"(need {', '.join(AZURE_COLUMNS)})")
            for row in reader:
                line = reader.line_num
                try:
                    when = datetime.fromisoformat(row["TIMESTAMP"].strip())
                    prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (TypeError, ValueError, AttributeError) as exc:
                    raise WorkloadError(f"{path}:{line}: cannot parse {row}: {exc}") from None
                if prompt < 1 or output < 0:
                    raise WorkloadError(f"{path}:{line}: lengths must be positive, got "
                                        f"ContextTokens {prompt}, GeneratedTokens {output}")
                rows.append((when, prompt, output))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WorkloadError(f"{path}: {exc}") from None
    if not rows:
        raise WorkloadError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    # A recorded 0-token output still costs its prefill; it is simulated as one token.
    requests = tuple(RequestSpec((when - start).total_seconds(), prompt, max(1, output))
                     for when, prompt, output in rows)
    return Workload(requests, f"Azure trace {path.name}")


def read_sharegpt_json(path: str | Path, rate: float, seed: int = 0,
                       tokenizer: Any = None, process: Arrivals = "poisson",
                       burstiness: float = 1.0) -> Workload:
    """Lengths from a ShareGPT-style JSON (module docstring), arrivals drawn at `rate`.
    Conversations without a human turn followed by a reply are skipped."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"{path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of conversations or records")
    pairs: list[tuple[int, int, tuple[int, ...] | None]] = []
    for i, record in enumerate(data):
        if isinstance(record, dict) and "prompt_len" in record and "output_len" in record:
            try:
                prompt, output = int(record["prompt_len"]), int(record["output_len"])
            except (TypeError, ValueError):
                prompt = output = 0
            if prompt < 1 or output < 1:
                raise WorkloadError(f"{path}: record {i}: prompt_len and output_len must be "
                                    f"positive integers")
            pairs.append((prompt, output, None))
        elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
            if tokenizer is None:
                raise WorkloadError(f"{path}: record {i} is a conversation: measuring its "
                                    f"turns needs a tokenizer (--tokenizer DIR)")
            pair = _conversation_lengths(record["conversations"], tokenizer)
            if pair is not None:  # else no human turn with a reply: nothing to simulate
                pairs.append(pair)
        else:
            raise WorkloadError(f"{path}: record {i} has neither conversations nor "
                                f"prompt_len / output_len fields")
    if not pairs:
        raise WorkloadError(f"{path}: no requests")
    rng = random.Random(seed)
    times = arrival_times(len(pairs), rate, process, burstiness, rng)
    requests = tuple(RequestSpec(t, p, o, ids) for t, (p, o, ids) in zip(times, pairs,
                                                                         strict=True))
    return Workload(requests, f"ShareGPT-style {path.name} at {rate:g} req/s")


def _conversation_lengths(turns: list[Any], tokenizer: Any,
                          ) -> tuple[int, int, tuple[int, ...]] | None:
    """(prompt length, reply length, prompt ids) of the first human turn with a reply."""
    for turn, reply in itertools.pairwise(turns):
        if (isinstance(turn, dict) and isinstance(reply, dict) and turn.get("from") == "human"
                and reply.get("from") in ("gpt", "chatgpt", "assistant")):
            ids = tuple(tokenizer(str(turn.get("value", ""))).input_ids)
            output = len(tokenizer(str(reply.get("value", ""))).input_ids)
            if ids and output:
                return len(ids), output, ids
    return None


# ------------------------------------------------------------------------------ shaping


def shape(workload: Workload, *, num_requests: int | None = None,
          duration_s: float | None = None, time_scale: float = 1.0,
          max_model_len: int | None = None, long_policy: LongPolicy = "drop",
          start_s: float = 0.0) -> Workload:
    """Stretch (time_scale > 1) or squeeze arrivals, start the window at start_s (after
    scaling; earlier arrivals are left out and the window's arrivals count from it), keep the
    first num_requests and those arriving within duration_s of the window's start, and clip or
    drop requests whose prompt + output exceed max_model_len (clip: output first, then the
    prompt, leaving at least one of each)."""
    if time_scale <= 0:
        raise WorkloadError(f"time scale must be positive, got {time_scale}")
    if start_s < 0:
        raise WorkloadError(f"window start must be non-negative, got {start_s}")
    requests: Sequence[RequestSpec] = workload.requests
    if time_scale != 1.0 or start_s:  # (a copy of each request: ~3 us apiece)
        requests = [replace(r, arrival_s=r.arrival_s * time_scale - start_s)
                    for r in requests if r.arrival_s * time_scale >= start_s]
    if duration_s is not None:
        requests = [r for r in requests if r.arrival_s <= duration_s]
    if num_requests is not None:
        requests = requests[:num_requests]
    dropped = clipped = 0
    if max_model_len is not None:
        kept = []
        for r in requests:
            if r.prompt_len + r.output_len <= max_model_len:
                kept.append(r)
            elif long_policy == "drop" or max_model_len < 2:
                dropped += 1
            else:
                clipped += 1
                prompt = min(r.prompt_len, max_model_len - 1)
                ids = None if r.prompt_token_ids is None else r.prompt_token_ids[:prompt]
                kept.append(replace(r, prompt_len=prompt, output_len=max_model_len - prompt,
                                    prompt_token_ids=ids))
        requests = kept
    if not requests:
        raise WorkloadError(f"{workload.source}: no request left after shaping")
    return Workload(tuple(requests), workload.source, workload.num_dropped + dropped,
                    workload.num_clipped + clipped)


def synthetic_prompt(request_index: int, prompt_len: int) -> list[int]:
    """Token ids for a prompt the workload gave no text for, whose blocks no other request's
    prompt has (so prefix caching finds nothing to share): the request's index in base 256 at
    the head (_INDEX_DIGITS ids), then a filler every such prompt has (pseudo-random, seeded:
    runs repeat). Block hashes are chained from the first block (engine.kv_cache), so the head
    alone makes every block differ. Ids from 2 to 257 (never 0 or 1, specials in most vocabs).

    The simulation makes one per request: a slice of the shared filler, not bytes drawn and
    converted per prompt (a fifth of the time)."""
    head = _head(request_index)
    if prompt_len <= _INDEX_DIGITS:
        return head[:prompt_len]
    return head + _FILLER.grown(prompt_len - _INDEX_DIGITS).ids[:prompt_len - _INDEX_DIGITS]


def synthetic_prompt_packed(request_index: int, prompt_len: int) -> bytes:
    """`engine.token_ids.pack(synthetic_prompt(request_index, prompt_len))`, from the filler
    packed once: what EngineCore.add_request would pack (~7 us for a 1,000-token prompt)."""
    if prompt_len <= _INDEX_DIGITS:
        return pack(_head(request_index)[:prompt_len])
    filler = _FILLER.grown(prompt_len - _INDEX_DIGITS)
    return pack(_head(request_index)) + filler.packed[:8 * (prompt_len - _INDEX_DIGITS)]


_INDEX_DIGITS = 4  # base-256 digits of a request's index at a synthetic prompt's head: 2^32
_INDEX_SHIFTS = tuple(range(8 * (_INDEX_DIGITS - 1), -1, -8))  # most significant first


def _head(request_index: int) -> list[int]:
    """A synthetic prompt's first _INDEX_DIGITS ids: its request's index in base 256, + 2."""
    return [2 + (request_index >> shift & 255) for shift in _INDEX_SHIFTS]


class _Filler:
    """The synthetic prompts' shared tail, and its packing, grown on demand."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.packed = b""  # engine.token_ids.pack(ids)

    def grown(self, num_tokens: int) -> _Filler:
        """Itself, at least num_tokens ids long."""
        if len(self.ids) < num_tokens:
            # drawn whole again when it grows, a power of two of bytes: randbytes of whole
            # 32-bit words, so each size's stream starts with the smaller ones' (runs repeat)
            size = max(1 << 14, 1 << (num_tokens - 1).bit_length())
            stream = np.frombuffer(random.Random("xyserve-filler").randbytes(size), np.uint8)
            self.ids = (stream.astype(np.int64) + 2).tolist()
            packed = pack(self.ids)
            assert packed is not None  # (small ints)
            self.packed = packed
        return self


_FILLER = _Filler()
