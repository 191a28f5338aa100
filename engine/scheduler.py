"""The token-budget scheduler: a pure, synchronous state machine (no clock, no torch, no I/O).

One engine step is

    scheduler_output = scheduler.schedule()
    model_output = runner.execute(scheduler_output)
    token_updates = scheduler.update_from_output(scheduler_output, model_output)

(The engine's step calls `update_rows_from_output`: the same updates as plain tuples.)

**Schedule tokens, not phases** (vLLM v1): there is no prefill phase and no decode phase. Every
request has `num_tokens` known tokens (prompt + outputs) of which `num_computed_tokens` are in the
KV cache; each step spends one token budget (`max_num_batched_tokens`) letting requests catch up.
A decode is a request 1 token behind, a prefill one many tokens behind, a long prompt simply takes
several steps, and a preempted request recomputes prompt + outputs the same way.

KV computed elsewhere (P/D disaggregation, `Request.num_external_tokens`): admitted FCFS when its
blocks can be allocated, the request waits in `receiving` while the caller moves the KV (step's
`kv_transfer_ids`), and runs from there after `finish_kv_transfer`; the caller times it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from engine.admission import check_fits
from engine.chunks import append_sampled, check_stop, first_stop_output_len, make_chunk
from engine.config import SchedulerConfig, SpeculativeConfig
from engine.decode_walks import walks
from engine.frozen import build_frozen
from engine.kv_cache import KVCacheManager
from engine.outputs import (
    ModelOutput,
    NewRequestData,
    ScheduledChunk,
    ScheduledChunks,
    SchedulerOutput,
    TokenUpdate,
    TokenUpdateRow,
    decode_rows,
)
from engine.request import FinishReason, Request, RequestStatus
from engine.spec.adaptive import drafts_to_verify, drafts_worth, record_verify
from engine.spec.types import Draft
from engine.stats import SchedulerStats


class Scheduler:
    """Decides which tokens of which requests each step computes, and applies the results.

    State: `requests` holds every unfinished request, `waiting` the ones queued for admission
    (FCFS; preempted ones go back to its front), `running` the admitted ones in admission order,
    `receiving` admitted ones whose KV is still arriving from another engine.
    Invariants: a request is in exactly one of `waiting` / `running` / `receiving`; only running
    and receiving requests hold KV blocks; `len(running) + len(receiving) <= max_num_seqs`.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        num_kv_blocks: int,
        block_size: int,
        max_model_len: int,
        enable_prefix_caching: bool = False,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        """enable_prefix_caching: share cached prefix blocks between requests (the engine passes
        CacheConfig.enable_prefix_caching; off here so unit tests see plain allocation).
        speculative: verify the drafts the model output proposes (None or disabled: drafts are
        ignored)."""
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        self.config = config
        self.speculative = speculative if speculative is not None and speculative.enabled else None
        self.max_model_len = max_model_len  # resolved (config's may be None = the model's)
        self.kv_cache = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.receiving: dict[str, Request] = {}  # admitted, KV in flight (insertion order)
        # Finished since the last schedule(): reported once, so the runner drops their state.
        self._finished_ids: list[str] = []
        self._kv_transfer_ids: list[str] = []  # admitted into `receiving` by this schedule()
        self._decodes = _DecodeRows()  # this schedule()'s decode rows (without drafts)
        self._num_preemptions = 0  # cumulative

    # ---------------------------------------------------------------- intake

    def add_request(self, request: Request, packed_prompt: bytes | None = None) -> None:
        """Queue `request` (FCFS) for admission; with prefix caching its prompt's blocks are
        hashed now (packed_prompt: engine.token_ids.pack of its prompt, where the caller has
        it).

        Raises ValueError, changing nothing, when the id is already in use, and RequestRejected
        (a ValueError) when it can never run (`check_fits`).
        """
        request_id = request.request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_fits(request, self.max_model_len, self.kv_cache)
        self.kv_cache.hash_prompt(request, packed_prompt)
        request.first_stop_output_len = first_stop_output_len(request, self.max_model_len)
        request.status = RequestStatus.WAITING
        self.requests[request_id] = request
        self.waiting.append(request)

    # ---------------------------------------------------------------- one step

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks within the token budget.

        Policy "token_budget" (default): running requests first, in admission order (so decodes
        go before new prefills), each clipped to the budget left; when KV blocks run out the
        latest admitted running request is preempted (blocks freed, sent to the front of
        `waiting` to recompute later). Then, if nothing was preempted, waiting requests are
        admitted FCFS while budget and `max_num_seqs` allow, stopping at the first whose blocks
        cannot be allocated; a long prompt is chunked across steps. While requests decode in the
        step, its prefill tokens are at most `mixed_prefill_budget`. With prefix caching, an
        admitted request first shares the longest cached prefix of its tokens (whole blocks) and
        its chunk starts after it.

        Policy "prefill_first" (the unchunked baseline): a step admits whole prompts only and
        then runs no decodes; only when nothing can be admitted do the running requests decode.
        The first prompt of a step may exceed the budget (it is never split).

        Does not advance `num_computed_tokens`; `update_from_output` does.
        """
        chunks: list[ScheduledChunk] = []
        preempted_ids: list[str] = []
        new_requests: list[NewRequestData] = []
        self._kv_transfer_ids = []
        decodes = self._decodes = _DecodeRows()
        if self.config.policy == "prefill_first":
            self._admit_waiting(chunks, new_requests, self.config.max_num_batched_tokens,
                                whole=True)
            if not chunks:
                self._schedule_running(chunks, preempted_ids)
        else:
            token_budget = self._schedule_running(chunks, preempted_ids)
            # Waiting requests, only on a step without preemption: a request just preempted
            # for lack of blocks must not be readmitted at once, and nothing may jump ahead.
            if not preempted_ids:
                self._admit_waiting(chunks, new_requests, token_budget, whole=False)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        return build_frozen(  # (once per step: see engine.frozen)
            SchedulerOutput, chunks=decodes.scheduled(tuple(chunks)),
            preempted_ids=tuple(preempted_ids),
            finished_ids=finished_ids,
            new_requests=tuple(new_requests),
            num_drafts_to_propose=self._drafts_to_propose(chunks),
            kv_transfer_ids=tuple(self._kv_transfer_ids),
            num_decodes=len(decodes.request_ids),
        )

    def _drafts_to_propose(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Per chunk that samples, the draft nodes worth proposing for its next step, with every
        request that samples now decoding then (engine.spec.adaptive)."""
        spec = self.speculative
        if spec is None:
            return {}
        sampling = [c.request_id for c in chunks if c.sample]
        wanted = {}
        for request_id in sampling:
            num_drafts = drafts_worth(self.requests[request_id], spec, len(sampling),
                                      spec.num_speculative_tokens)
            if num_drafts:
                wanted[request_id] = num_drafts
        return wanted

    def _schedule_running(self, chunks: list[ScheduledChunk], preempted_ids: list[str]) -> int:
        """Append the running requests' chunks (preempting from the tail when blocks run out);
        returns the token budget left.

        Two passes: first the requests one token behind (decodes, and verifies when they carry
        drafts), so a long prefill can never starve them; then the rest (prefill chunks of
        partly computed prompts, recompute). Drafts only take budget that every decode's own
        token leaves over, and only as many as their measured acceptance pays for.
        """
        token_budget = self.config.max_num_batched_tokens
        if self.speculative is None:
            token_budget, others = self._schedule_decodes(chunks, preempted_ids, token_budget)
        else:
            token_budget, others = self._schedule_verifies(chunks, preempted_ids, token_budget)
        # What is left goes to prefills (here and to admitted requests), capped while
        # requests decode in this step: the step they all wait on stays short.
        if chunks or self._decodes.request_ids:  # (only this pass's rows are there yet)
            token_budget = min(token_budget, self.config.mixed_prefill_cap)
        running = RequestStatus.RUNNING
        for request, num_behind in others:
            if token_budget <= 0:
                break
            if request.status == running:
                token_budget -= self._add_chunk(request, min(num_behind, token_budget), None,
                                                chunks, preempted_ids)
        return token_budget

    def _schedule_decodes(self, chunks: list[ScheduledChunk], preempted_ids: list[str],
                          token_budget: int) -> tuple[int, list[tuple[Request, int]]]:
        """The first pass without speculative decoding: each running request one token behind
        gets its decode row (the step's decode columns, `_decodes`), in admission order, within
        `token_budget`. Returns the budget left and the requests further behind, with how far
        (the second pass's, in order).

        One walk over `running`, sorting and scheduling at once (what `_schedule_verifies` does
        in two walks, with no drafts; tested equal): a preemption only pops the tail, which the
        walk has not reached, and how far behind a request is stays fixed for the step. Once
        the budget is spent nothing more runs this step, so the walk stops there.
        """
        others: list[tuple[Request, int]] = []
        block_size = self.kv_cache.block_size
        decodes = self._decodes
        allocate_slots = self.kv_cache.allocate_slots
        library = walks()
        if library is not None:  # (the walk below, in C)
            token_budget = library.xy_schedule_decodes(
                self.running, token_budget, block_size, decodes.columns(), others,
                allocate_slots, lambda request: self._add_chunk(request, 1, None, chunks,
                                                                preempted_ids, decode=True))
            return token_budget, others
        for request in self.running:  # (the walk ends early when a preemption shortens it)
            if token_budget <= 0:
                break
            # (request.num_tokens, inline: once per row per step)
            num_computed_tokens = request.num_computed_tokens
            num_behind = (len(request.prompt_token_ids) + len(request.output_token_ids)
                          - num_computed_tokens)
            if num_behind != 1:
                if num_behind > 1:
                    others.append((request, num_behind))
                continue
            if (num_computed_tokens >= len(request.block_ids) * block_size  # needs a block
                    and not allocate_slots(request, 1)):  # short: preempting (allocate_slots
                #   changed nothing, so _add_chunk's own first try is the same)
                token_budget -= self._add_chunk(request, 1, None, chunks, preempted_ids,
                                                decode=True)
                continue
            # Every row of most steps: one token whose slot its block table holds, nobody
            # preempted.
            decodes.append(request)
            token_budget -= 1
        return token_budget, others

    def _schedule_verifies(self, chunks: list[ScheduledChunk], preempted_ids: list[str],
                           token_budget: int) -> tuple[int, list[tuple[Request, int]]]:
        """The first pass with speculative decoding (`_schedule_decodes`' contract): decodes
        and verifies. Two walks: every decode must be known before any draft takes budget."""
        # How far behind a request is stays fixed for the step (only a preemption changes
        # it, and a preempted request is skipped by its status).
        decodes: list[Request] = []
        others: list[tuple[Request, int]] = []
        for request in self.running:
            num_behind = request.num_tokens - request.num_computed_tokens
            if num_behind == 1:
                decodes.append(request)
            elif num_behind > 1:
                others.append((request, num_behind))
        num_decodes = num_decodes_left = len(decodes)
        running, speculative = RequestStatus.RUNNING, self.speculative
        for request in decodes:
            if token_budget <= 0:
                break
            if request.status != running:
                continue
            num_decodes_left -= 1
            proposed, request.draft = request.draft, None  # verified at most once
            room = token_budget - 1 - num_decodes_left
            draft = drafts_to_verify(request, proposed, speculative, self.max_model_len,
                                     room, num_decodes)
            token_budget -= self._add_chunk(request, 1, draft, chunks, preempted_ids)
        return token_budget, others

    def _add_chunk(self, request: Request, num_new_tokens: int, draft: Draft | None,
                   chunks: list[ScheduledChunk], preempted_ids: list[str],
                   decode: bool = False) -> int:
        """Append `request`'s next `num_new_tokens` (+ `draft`) to `chunks` (decode: its one
        token as a decode row, to the step's decode rows), allocating their blocks and
        preempting the latest admitted request while they are short; drafts are dropped
        before anyone is preempted, and nothing is appended if `request` itself is.

        Returns the token budget this took: the chunk's tokens, less those of the victims
        scheduled earlier this step, which leave the step (negative when only they changed).
        """
        num_drafts = 0 if draft is None else draft.num_tokens
        if num_drafts and not self.kv_cache.allocate_slots(request, num_new_tokens + num_drafts):
            draft, num_drafts = None, 0
        num_tokens_taken = 0
        while not num_drafts and not self.kv_cache.allocate_slots(request, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            preempted_ids.append(victim.request_id)
            # linear searches, but preemptions are rare: no per-row index to keep
            if self._decodes.remove(victim.request_id):
                num_tokens_taken -= 1
            else:
                victim_index = next((i for i, c in enumerate(chunks)
                                     if c.request_id == victim.request_id), None)
                if victim_index is not None:
                    num_tokens_taken -= chunks.pop(victim_index).num_tokens
            if victim is request:
                return num_tokens_taken
        if decode:
            self._decodes.append(request)
            return num_tokens_taken + 1
        chunk = make_chunk(request, num_new_tokens, draft)
        chunks.append(chunk)
        return num_tokens_taken + chunk.num_tokens

    def _admit_waiting(self, chunks: list[ScheduledChunk], new_requests: list[NewRequestData],
                       token_budget: int, whole: bool) -> None:
        """Admit waiting requests FCFS into `chunks` while budget, max_num_seqs and blocks
        allow; those admitted for the first time (never preempted) go to `new_requests` too.
        whole=True never splits a prompt (the first one may exceed the budget)."""
        while (self.waiting and token_budget > 0
               and len(self.running) + len(self.receiving) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_external_tokens:
                if not self._admit_receiving(request, new_requests):
                    break  # FCFS: it waits for blocks like anyone else
                continue
            # Waiting requests hold no blocks (new, or preempted and freed): with prefix caching
            # the longest cached prefix is shared and computing starts right after it.
            cached_block_ids = self.kv_cache.find_cached_prefix(request)
            num_cached_tokens = len(cached_block_ids) * self.kv_cache.block_size
            num_new_tokens = request.num_tokens - num_cached_tokens
            if not whole:
                num_new_tokens = min(num_new_tokens, token_budget)
            elif chunks and num_new_tokens > token_budget:
                break
            if not self.kv_cache.allocate_slots(request, num_new_tokens, cached_block_ids):
                break  # FCFS: nobody skips ahead of the head of the queue
            self.kv_cache.record_query(request.num_tokens, num_cached_tokens)
            request.num_computed_tokens = num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if not request.num_preemptions:  # a preempted one is known to the runner already
                new_requests.append(NewRequestData(request_id=request.request_id,
                                                   prompt_token_ids=request.prompt_token_ids,
                                                   sampling_params=request.sampling_params,
                                                   grammar=request.grammar))
            chunks.append(make_chunk(request, num_new_tokens))
            token_budget -= num_new_tokens

    def _admit_receiving(self, request: Request, new_requests: list[NewRequestData]) -> bool:
        """The head of `waiting` into `receiving` (False when blocks are short): blocks for its
        external tokens (the transfer fills them: no prefix lookup), no budget (nothing runs)."""
        if not self.kv_cache.allocate_slots(request, request.num_external_tokens):
            return False
        self.waiting.popleft()
        request.status = RequestStatus.RECEIVING_KV
        self.receiving[request.request_id] = request
        self._kv_transfer_ids.append(request.request_id)
        new_requests.append(NewRequestData(request_id=request.request_id,
                                           prompt_token_ids=request.prompt_token_ids,
                                           sampling_params=request.sampling_params))
        return True

    def finish_kv_transfer(self, request_id: str) -> None:
        """A receiving request's KV has landed: it runs from its external tokens on. Unknown ids
        (finished meanwhile) are ignored."""
        request = self.receiving.pop(request_id, None)
        if request is None:
            return
        request.num_computed_tokens = request.num_external_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.kv_cache.cache_full_blocks(request)  # the landed blocks are as good as computed

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[TokenUpdate]:
        """Apply one step's results: advance computed tokens, append sampled ones, check stops.

        Args:
            scheduler_output: what `schedule()` returned for this step.
            model_output: must hold `sampled_token_ids[id]` for every chunk with `sample=True`
                whose request is still running.
        Returns:
            One `TokenUpdate` per request that got new tokens or finished, in chunk order.
            Finished requests are removed, their blocks freed, and their ids reported by the
            next `schedule()`. Chunks of requests finished in between (aborted) are skipped.
        """
        return [TokenUpdate._make(row)
                for row in self.update_rows_from_output(scheduler_output, model_output)]

    def update_rows_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput,
        finished_only: bool = False,
    ) -> list[TokenUpdateRow]:
        """`update_from_output`, its updates as plain tuples (TokenUpdateRow): what the engine's
        step calls, one row per running request per step.

        finished_only: only the rows of requests that finished; one that goes on got exactly
        its sampled tokens (what a quiet OutputProcessor reads instead of a row)."""
        token_updates: list[TokenUpdateRow] = []
        chunks, num_decodes = scheduler_output.chunks, scheduler_output.num_decodes
        if num_decodes and self.speculative is None and not model_output.logprobs:
            decode_ids, chunks = decode_rows(chunks, num_decodes)
            self._update_decodes(decode_ids, model_output.sampled_token_ids, finished_only,
                                 token_updates)
        requests, running, max_model_len = self.requests, RequestStatus.RUNNING, self.max_model_len
        kv_cache, block_size = self.kv_cache, self.kv_cache.block_size
        caching = kv_cache.enable_caching  # else registering full blocks is a no-op: skip the call
        all_sampled, all_logprobs = model_output.sampled_token_ids, model_output.logprobs
        all_drafts, speculative = model_output.drafts, self.speculative
        for chunk in chunks:
            request_id = chunk.request_id
            request = requests.get(request_id)
            if request is None or request.status != running:
                continue  # finished (or replaced by a new request with that id) meanwhile
            # Blocks are registered (cache_full_blocks) as soon as they fill up, so only a
            # step that fills one has any to register: most decodes skip the call.
            num_computed_tokens = request.num_computed_tokens
            # (the scheduler adds drafts only with speculative decoding: no len() per row else)
            num_draft_tokens = len(chunk.draft_parents) if speculative is not None else 0
            request.num_computed_tokens = (num_computed_tokens + len(chunk.token_ids)
                                           - num_draft_tokens)
            if not chunk.sample:
                if caching and (request.num_computed_tokens // block_size
                                > num_computed_tokens // block_size):
                    kv_cache.cache_full_blocks(request)  # their K/V are written now
                continue
            sampled = all_sampled[request_id]
            if num_draft_tokens:
                # The accepted drafts' K/V are in place (the runner moved a tree's accepted
                # path to its positions); the rejected ones' slots are dropped.
                num_accepted = len(sampled) - 1
                record_verify(request, num_draft_tokens, num_accepted)
                request.num_computed_tokens += num_accepted
                kv_cache.trim(request, request.num_computed_tokens + 1)
            if len(sampled) == 1:  # most rows of most steps: append_sampled without a call
                output_ids = request.output_token_ids
                output_ids.append(sampled[0])
                new_token_ids, finish_reason = sampled, None
                if len(output_ids) >= request.first_stop_output_len:  # (check_stop's own test)
                    finish_reason = check_stop(request, max_model_len)
            else:
                new_token_ids, finish_reason = append_sampled(request, sampled, max_model_len)
            logprobs = None
            if all_logprobs:
                logprobs = all_logprobs.get(request_id)
                if logprobs is not None:
                    logprobs = logprobs[: len(new_token_ids)]
            if caching and (request.num_computed_tokens // block_size
                            > num_computed_tokens // block_size):
                kv_cache.cache_full_blocks(request)  # accepted drafts fill blocks too
            if finish_reason is not None:
                self._finish(request, RequestStatus.for_reason(finish_reason))
                token_updates.append((request_id, tuple(new_token_ids), logprobs, finish_reason))
                continue
            if speculative is not None:  # (else drafts are ignored: request.draft stays None)
                request.draft = all_drafts.get(request_id)
            if new_token_ids and not finished_only:
                token_updates.append((request_id, tuple(new_token_ids), logprobs, None))
        return token_updates

    def _update_decodes(self, request_ids: Sequence[str],
                        all_sampled: dict[str, tuple[int, ...]], finished_only: bool,
                        token_updates: list[TokenUpdateRow]) -> None:
        """`update_rows_from_output`'s walk over a step's decode rows, by request id
        (SchedulerOutput.num_decodes: one known token each, sampled, no drafts) without
        speculative decoding or logprobs, appending their rows to `token_updates`. What the
        general walk does, less its tests that such a row cannot pass (tested equal): this
        runs per running request per step."""
        library = walks()
        if library is not None:  # (the common rows in C, the others by `_update_decode`)
            kv_cache = self.kv_cache
            library.xy_update_decodes(
                request_ids, self.requests, RequestStatus.RUNNING, all_sampled,
                kv_cache.block_size if kv_cache.enable_caching else 0,
                kv_cache.cache_full_blocks, finished_only, token_updates,
                lambda request_id: self._update_decode(request_id, all_sampled, finished_only,
                                                       token_updates))
            return
        for request_id in request_ids:
            self._update_decode(request_id, all_sampled, finished_only, token_updates)

    def _update_decode(self, request_id: str, all_sampled: dict[str, tuple[int, ...]],
                       finished_only: bool, token_updates: list[TokenUpdateRow]) -> None:
        """`_update_decodes`' row of `request_id`."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.RUNNING:
            return  # finished (or replaced by a new request with that id) meanwhile
        num_computed_tokens = request.num_computed_tokens + 1
        request.num_computed_tokens = num_computed_tokens
        sampled = all_sampled[request_id]
        if len(sampled) == 1:
            output_ids = request.output_token_ids
            output_ids.append(sampled[0])
            finish_reason = None
            if len(output_ids) >= request.first_stop_output_len:  # (check_stop's own test)
                finish_reason = check_stop(request, self.max_model_len)
        else:
            sampled, finish_reason = append_sampled(request, sampled, self.max_model_len)
        kv_cache = self.kv_cache
        if kv_cache.enable_caching and not num_computed_tokens % kv_cache.block_size:
            kv_cache.cache_full_blocks(request)  # its token filled a block
        if finish_reason is not None:
            self._finish(request, RequestStatus.for_reason(finish_reason))
            token_updates.append((request_id, tuple(sampled), None, finish_reason))
        elif not finished_only and sampled:
            token_updates.append((request_id, tuple(sampled), None, None))

    # ---------------------------------------------------------------- finishing from outside

    def finish_requests(self, request_ids: str | Iterable[str], reason: FinishReason) -> None:
        """Finish requests from outside the step (stop string, client gone, error).

        Works for waiting and running requests alike: frees their blocks and reports them in the
        next `schedule()`'s `finished_ids`. Unknown or already finished ids are ignored.
        """
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        status = RequestStatus.for_reason(reason)
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, status)

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        """`finish_requests(request_ids, FinishReason.ABORT)`."""
        self.finish_requests(request_ids, FinishReason.ABORT)

    # ---------------------------------------------------------------- queries

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        """Preemptions since this scheduler started."""
        return self._num_preemptions

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free_blocks

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def make_stats(self) -> SchedulerStats:
        """A snapshot of queue lengths, KV usage and the preemption counter."""
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self._num_preemptions,
            num_free_blocks=self.kv_cache.num_free_blocks,
            prefix_cache_queries=self.kv_cache.num_queried_tokens,
            prefix_cache_hits=self.kv_cache.num_hit_tokens,
        )

    # ---------------------------------------------------------------- internals

    def _preempt(self, request: Request) -> None:
        """Drop `request`'s KV to recompute later (outputs kept); it is already off `running`."""
        self.kv_cache.free(request, preempted=True)
        request.num_computed_tokens = 0
        request.num_external_tokens = 0  # that KV is gone too: recomputed here
        request.draft = None
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting.
        self.waiting.appendleft(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.RECEIVING_KV:
            del self.receiving[request.request_id]
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = status
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)


class _DecodeRows:
    """The decode rows of the step being scheduled, column by column (ScheduledChunks'): each
    a running request's last token, sampled, without drafts."""

    __slots__ = ("block_ids", "request_ids", "start_pos", "token_ids")

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.start_pos: list[int] = []  # its num_computed_tokens
        self.token_ids: list[int] = []  # its last token
        self.block_ids: list[tuple[int, ...]] = []  # its block table

    def append(self, request: Request) -> None:
        """`request`'s row: `make_chunk(request, 1)` as columns."""
        self.request_ids.append(request.request_id)
        self.start_pos.append(request.num_computed_tokens)
        output_ids = request.output_token_ids
        self.token_ids.append(output_ids[-1] if output_ids else request.prompt_token_ids[-1])
        self.block_ids.append(request.block_ids)

    def columns(self) -> tuple[list[str], list[int], list[int], list[tuple[int, ...]]]:
        """(request ids, positions, tokens, block tables): the columns, appended to in place."""
        return self.request_ids, self.start_pos, self.token_ids, self.block_ids

    def scheduled(self, others: tuple[ScheduledChunk, ...]) -> ScheduledChunks:
        """The step's chunks: these rows (their columns handed over), then `others`."""
        return ScheduledChunks(self.request_ids, self.start_pos, self.token_ids, self.block_ids,
                               others)

    def remove(self, request_id: str) -> bool:
        """Take `request_id`'s row out (a preempted request's); False where it has none."""
        try:
            index = self.request_ids.index(request_id)
        except ValueError:
            return False
        for column in (self.request_ids, self.start_pos, self.token_ids, self.block_ids):
            del column[index]
        return True
