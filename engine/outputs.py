"""Boundary types between the engine's layers.

The chain of one step, one way (nothing flows back up within the step):

    Scheduler.schedule()              -> SchedulerOutput    (which tokens of which requests)
    Runner.execute(scheduler_output)  -> ModelOutput        (sampled tokens, logprobs, NPU trace)
    Scheduler.update_from_output()    -> list[TokenUpdate]  (new tokens, finished requests;
                                                           the step passes them as tuples)
    OutputProcessor.process()         -> StepResult         (what clients see, stop-string hits)

The scheduler output carries everything a runner needs: a request's prompt and sampling
parameters the first time it is scheduled (`new_requests`; the runner keeps its own per-request
state from then on, appending the tokens it samples), then each step's chunks. All are frozen;
none holds torch tensors, so the scheduler side stays pure Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.arch import ModelArch
from engine.request import FinishReason, SamplingParams
from engine.spec.types import Draft
from engine.stats import RequestMetrics


@dataclass(slots=True)
class ScheduledChunk:
    """A contiguous run of one request's tokens computed this step.

    A decode is a chunk of one token at the end of the sequence; a prefill chunk covers part of
    the prompt (or of prompt + outputs after a preemption); a verify is a decode followed by the
    request's draft tokens (engine.spec: a token tree whose nodes take the slots after the last
    token, and the real positions last + depth). Which one it is is derived, not stored.

    Read-only once built, but not frozen: a frozen dataclass's __init__ (object.__setattr__
    per field) costs four times a slotted one's. (A step's decode rows, one per running
    request, are columns of ScheduledChunks until read as chunks: keep ScheduledChunks.chunks
    in step with the fields.) `block_ids` is the request's own block-table tuple
    (engine.kv_cache replaces it, never mutates it), shared by its chunks.
    """

    request_id: str  # whose tokens
    start_pos: int  # position of the first token (= num_computed_tokens before the step)
    token_ids: tuple[int, ...]  # the tokens fed to the model: known tokens, then draft nodes
    block_ids: tuple[int, ...]  # the request's whole block table, covering start_pos + num_tokens
    sample: bool  # True when the chunk reaches the last known token: a new token is sampled
    draft_parents: tuple[int, ...] = ()  # the last len(draft_parents) tokens are draft nodes;
    #   parent node index of each (-1 = the last known token); empty = no speculation

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_parents)

    @property
    def num_known_tokens(self) -> int:
        """Tokens of the sequence itself (not drafts): what the step surely computes."""
        return len(self.token_ids) - len(self.draft_parents)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this chunk is written (the causal horizon)."""
        return self.start_pos + len(self.token_ids)


class ScheduledChunks(Sequence[ScheduledChunk]):
    """A step's chunks in batch order, read as a tuple of ScheduledChunks reads: first its
    decode rows (each one known token, the last of its sequence, sampled, no drafts), held
    column by column, then its other chunks.

    The scheduler makes a decode row per running request per step: its columns cost a third of
    a ScheduledChunk object, and the engine's own walks (the timing-only runner, the
    scheduler's update, the output processor) read them as columns. Reading the sequence as
    chunks (iterating, indexing: a runner that computes) makes the decode rows' ScheduledChunks
    once. Immutable: its columns are the scheduler's, handed over.
    """

    __slots__ = (
        "_chunks",
        "_decode_block_ids",
        "_decode_token_ids",
        "decode_request_ids",
        "decode_start_pos",
        "others",
    )

    def __init__(self, decode_request_ids: Sequence[str], decode_start_pos: Sequence[int],
                 decode_token_ids: Sequence[int], decode_block_ids: Sequence[tuple[int, ...]],
                 others: tuple[ScheduledChunk, ...] = ()) -> None:
        self.decode_request_ids = decode_request_ids  # each decode row's request, in order
        self.decode_start_pos = decode_start_pos  # each decode row's position (its token's)
        self._decode_token_ids = decode_token_ids  # each decode row's one token
        self._decode_block_ids = decode_block_ids  # each decode row's block table
        self.others = others  # the chunks after the decode rows (prefills, recomputes)
        self._chunks: tuple[ScheduledChunk, ...] | None = None  # all, made when first read

    @property
    def num_decodes(self) -> int:
        return len(self.decode_request_ids)

    def chunks(self) -> tuple[ScheduledChunk, ...]:
        """Every chunk as a ScheduledChunk, decode rows first (made on the first call)."""
        if self._chunks is None:
            self._chunks = tuple(
                ScheduledChunk(request_id, start_pos, (token_id,), block_ids, True)
                for request_id, start_pos, token_id, block_ids in zip(
                    self.decode_request_ids, self.decode_start_pos, self._decode_token_ids,
                    self._decode_block_ids, strict=True)) + self.others
        return self._chunks

    def __len__(self) -> int:
        return len(self.decode_request_ids) + len(self.others)

    def __getitem__(self, index: Any) -> Any:
        return self.chunks()[index]

    def __iter__(self) -> Iterator[ScheduledChunk]:
        return iter(self.chunks())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return self.chunks() == tuple(other)

    __hash__ = None  # type: ignore[assignment]  # (as a tuple of unhashable chunks)

    def __repr__(self) -> str:
        return f"ScheduledChunks{self.chunks()!r}"


def decode_rows(chunks: Sequence[ScheduledChunk], num_decodes: int,
                ) -> tuple[Sequence[str], Sequence[ScheduledChunk]]:
    """(the request ids of the first `num_decodes` of `chunks`, the chunks after them)
    (SchedulerOutput.num_decodes): a ScheduledChunks' columns, else read chunk by chunk."""
    if isinstance(chunks, ScheduledChunks) and chunks.num_decodes == num_decodes:
        return chunks.decode_request_ids, chunks.others
    return [c.request_id for c in chunks[:num_decodes]], chunks[num_decodes:]


def start_positions(chunks: Sequence[ScheduledChunk]) -> list[int]:
    """Every chunk's start position, in order (a ScheduledChunks' decode rows from their
    column)."""
    if isinstance(chunks, ScheduledChunks):
        return [*chunks.decode_start_pos, *[c.start_pos for c in chunks.others]]
    return [c.start_pos for c in chunks]


def token_counts(chunks: Sequence[ScheduledChunk]) -> list[int]:
    """Every chunk's token count, in order (a ScheduledChunks' decode rows: one each)."""
    if isinstance(chunks, ScheduledChunks):
        return [1] * chunks.num_decodes + [len(c.token_ids) for c in chunks.others]
    return [len(c.token_ids) for c in chunks]


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen yet: sent once, with the step that first schedules it.
    The runner keeps it (and appends the tokens it samples) until its id is in `finished_ids`."""

    request_id: str  # whose
    prompt_token_ids: Sequence[int]  # the prompt (never changed once the request arrived)
    sampling_params: SamplingParams  # how its tokens are sampled
    grammar: Any = None  # engine.structured CompiledGrammar its output must follow; None = free


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step computes: chunks in batch order, within the token budget."""

    chunks: Sequence[ScheduledChunk]  # running requests first, then newly admitted ones (a
    #   tuple, or the scheduler's ScheduledChunks: its decode rows as columns)
    preempted_ids: tuple[str, ...] = ()  # requests whose KV was dropped this step (recompute)
    finished_ids: tuple[str, ...] = ()  # requests finished since the last step (free their state)
    new_requests: tuple[NewRequestData, ...] = ()  # requests scheduled for the first time
    # speculative decoding: per request sampling this step, the draft nodes its measured
    # acceptance pays for in its next step (engine.spec.adaptive; only the scheduler applies that
    # rule); a request left out gets none
    num_drafts_to_propose: Mapping[str, int] = field(default_factory=dict)
    # requests admitted this step whose KV comes from another engine (Request.
    # num_external_tokens): their blocks are allocated now, so the transfer can start; they run
    # once Scheduler.finish_kv_transfer says it landed
    kv_transfer_ids: tuple[str, ...] = ()
    # the first num_decodes chunks are decodes: each computes one known token, the last of its
    # request's sequence, and samples one (ModelOutput); no drafts (those of requests that
    # sampled before: the step's decodes; now and then a prompt's last token alone). The
    # scheduler's and the output processor's walks take these rows a shorter way (0: nothing
    # said, every row the general way; what hand-built outputs say)
    num_decodes: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_sampled(self) -> int:
        return sum(c.sample for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one sampled token and the most likely alternatives."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability under the model's raw distribution (before sampling
    #   transforms: bias, penalties, temperature), as vLLM reports by default
    rank: int  # 1 = it was the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class ModelOutput:
    """What the model runner returns for one step: one entry per chunk with `sample=True`."""

    sampled_token_ids: dict[str, tuple[int, ...]]  # request id -> new tokens: one per decode;
    #   after a verify, the accepted draft tokens and then one bonus (or correction) token
    logprobs: dict[str, tuple[TokenLogprob, ...]] = field(default_factory=dict)  # when asked
    trace: Any = None  # npu_sim StepTrace of the step (Any: the scheduler never looks at it)
    drafts: dict[str, Draft] = field(default_factory=dict)  # request id -> tokens proposed for
    #   its next step (tokens and parents only), for requests that sampled this step


class TokenUpdate(NamedTuple):
    """What one step changed for one request, as the scheduler sees it (no text yet).

    A named tuple, so a plain tuple of the same four fields (a `TokenUpdateRow`) reads the same
    when unpacked: the engine's step passes those (Scheduler.update_rows_from_output), one per
    running request per step, since a tuple costs a fifth of any object's construction."""

    request_id: str  # whose tokens
    new_token_ids: tuple[int, ...]  # appended to the request's output this step
    new_logprobs: tuple[TokenLogprob, ...] | None  # matching logprobs, when asked for
    finish_reason: FinishReason | None  # set once, when the request finished this step


# A TokenUpdate's fields as a plain tuple, in its order (what the engine's step passes on).
TokenUpdateRow = tuple[str, tuple[int, ...], tuple[TokenLogprob, ...] | None,
                       FinishReason | None]


@dataclass(frozen=True)
class RequestOutput:
    """A delta of one request's generation, as clients see it."""

    request_id: str  # the engine's id
    new_token_ids: tuple[int, ...]  # tokens added since the last output
    new_text: str  # text added since the last output (stop strings excluded)
    new_logprobs: tuple[TokenLogprob, ...] | None  # per new token, when asked for
    finish_reason: FinishReason | None  # None while generating
    num_prompt_tokens: int  # prompt length
    num_output_tokens: int  # generated tokens so far (including these)
    metrics: RequestMetrics | None = None  # latencies on both clocks, on the finished output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves, for the front ends (HTTP server, offline API, simulator)."""

    model_name: str  # the --model it was built from (preset, path or arch name)
    model_path: str | None  # the local HF directory its weights came from; None: no weights
    arch: ModelArch  # the model's shape
    tokenizer: Any | None  # Hugging Face tokenizer; None for a timing-only engine (no text)
    max_model_len: int  # prompt + output tokens at most (resolved)
    num_kv_blocks: int  # blocks in the KV pool
    block_size: int  # tokens per KV block
    dtype: str  # CPU compute dtype ("float32", "bfloat16"), "none" when nothing is computed
    chip: str  # the simulated NPU's name
    kv_cache_dtype: str = "none"  # the KV cache tensors' dtype on the CPU; "none": no tensors
