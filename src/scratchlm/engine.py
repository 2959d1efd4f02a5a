"""Continuous batching: many requests share one model and one batched KV cache.

Driven by `scratchlm serve RUN_DIR` (through `scratchlm.serve`); usable on its own:

    engine = Engine(model, tokenizer, max_batch=8, max_queue=64).start()
    result = engine.generate(tokenizer.encode("Hello"), GenerationParams(max_tokens=32))
    engine.stop()

The cache has `max_batch` rows ("slots"). Each row keeps its own position (`KVCache.pos`), so
rows advance independently. One background thread runs the loop, step by step:

1. drop finished and cancelled requests: the `PrefixCache` keeps a copy of the keys and
   values of the tokens each one ran, their slots become free at once, and the rows that stay
   move down (keys, values and position copied) so the running rows are 0..n-1;
2. admit waiting requests into free slots: reset their rows and copy in the longest start of
   each prompt that the prefix cache holds;
3. *prefill* up to `PREFILL_CHUNK` prompt tokens of the requests still prefilling, first come
   first served (rows prefilled together share padded passes, `rows=slots`); a long prompt
   takes several steps. A request whose whole prompt is in its row samples its first token;
4. *decode* one token for every request past its prompt together: one forward pass of shape
   (n, 1) over cache rows 0..n-1 (read through views, no gather; rows still prefilling come
   after them); each row attends only to its own positions, and stale keys of a reused row
   are masked out by position.

Requests therefore join and leave the running batch between steps: a long generation never
blocks a new request's start, it only shares the decode steps with it, and a long prompt
delays the running requests by one chunk at a time. Sampling is
`generate.sample_next_token` (the only sampling code), with each request's own
`SamplingConfig` and, when it asked for a seed, its own `torch.Generator`. Text streams out as
deltas that never split a UTF-8 character and never show the beginning of a stop string that
may still complete.

The waiting queue is bounded: `submit` raises `QueueFull` (the server's 429) instead of
growing without limit, and `EngineClosed` (503) once the engine stops.

`engine_process.EngineProcess` runs the same engine in a child process behind the same
interface; that is what `scratchlm serve` uses, so that the HTTP side and the model never wait
on each other for Python's interpreter lock. The prefix cache is `prefix_cache.PrefixCache`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.generate import (SamplingConfig, check_fits, find_stop, padded_batch, sample_next_token,
                                stable_prefix)
from scratchlm.model import KVCache, Transformer
from scratchlm.prefix_cache import PrefixCache, shared_start

log = logging.getLogger(__name__)


SHARED_PREFIX_MIN = 32
"""A waiting prompt that shares at least this many first tokens with one being prefilled waits
until that one is done, to find them in the prefix cache (concurrent requests with a common
context: `n` choices, an evaluation's answers to one question)."""

PREFILL_CHUNK = 512
"""Prompt tokens prefilled per engine step, over all the requests still prefilling (chunked
prefill, as vLLM does by default). A longer prompt takes several steps, and the running requests
decode a token between any two, so a long prompt delays their next token by one chunk's
prefill instead of its whole prompt's."""


# A byte-level token adds at least one byte, and a UTF-8 character has at most 4: text still
# ending in U+FFFD after this many held-back tokens is invalid bytes, not a character to finish.
_MAX_HELD_TOKENS = 4


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is stopped or stopping (HTTP 503)."""


@dataclass
class GenerationParams:
    """What one request asks for."""

    max_tokens: int
    """New tokens at most (finish_reason "length" when reached)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    """Strings that end the text (not included in it); finish_reason "stop"."""
    seed: int | None = None
    """Seed of this request's own generator: its samples do not depend on other requests."""
    ignore_eos: bool = False
    """Keep going past end-of-text (benchmarks want a fixed number of tokens)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each new token's, with the k most likely tokens'."""
    prompt_logprobs: bool = False
    """Also the prompt's tokens' (each given the tokens before it), with `logprobs` alternatives."""


Logprob = tuple[float, list[tuple[int, float]]]
"""A token's log-probability under the model (log-softmax of its raw logits, before
temperature or any filter, as vLLM reports by default), and the most likely (id, logprob)
pairs at that position, most likely first."""


def logprob_entries(lp: torch.Tensor, ids: list[int], k: int) -> list[Logprob]:
    """lp: (N, V) log-probabilities, ids: the N tokens taken -> each one's logprob and the k
    most likely (id, logprob) pairs at its position."""
    chosen = lp.gather(1, torch.tensor(ids, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    k = min(k, lp.shape[-1])
    if k == 0:
        return [(c, []) for c in chosen]
    values, indices = lp.topk(k, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, indices.tolist(), values.tolist())]


@dataclass
class Event:
    """A piece of one request's output, sent from the engine thread to the request's sink."""

    index: int
    """Which prompt of the submitted group this belongs to."""
    text: str
    """New final text; may be empty (held back, or the last event)."""
    finish_reason: str | None = None
    """None while running; then "stop", "length", "cancelled" or "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    ids: list[int] = field(default_factory=list)
    """The request's new token ids since its previous event (end-of-text excluded)."""
    logprobs: list[Logprob] = field(default_factory=list)
    """With `GenerationParams.logprobs`: one entry per id in `ids`, and in the last event of a
    request that stopped at end-of-text one more, the end-of-text's (which `ids` leaves out)."""
    prompt_logprobs: list[Logprob | None] | None = None
    """With `GenerationParams.prompt_logprobs`, in the first event: one entry per prompt token
    (None for the first, which has nothing before it)."""
    cached_tokens: int = 0
    """In the last event: how many of the prompt's tokens came from the prefix cache."""


@dataclass
class Completion:
    """The whole result of `Engine.generate`."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Request:
    """One sequence in the engine: its prompt, parameters, slot and decoding state.

    Attributes the engine thread writes and others may read once the request finished:
    `tokens`, `text`, `finish_reason`, `t_submit`, `t_first_token`, `t_done` (perf_counter).
    """

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: GenerationParams, sink: Callable[[Event], None],
                 index: int) -> None:
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.stop = [s for s in params.stop if s]  # an empty stop string would stop at once
        self.sink = sink
        self.index = index
        self.generator: torch.Generator | None = None  # set by the engine for a seeded request
        self.slot = -1
        self.tokens: list[int] = []  # new ids, end-of-text excluded
        self.logprobs: list[Logprob] = []  # one per token (and a last end-of-text), when asked for
        self.prompt_logprobs: list[Logprob | None] | None = None
        self.prompt_sent = False  # prompt_logprobs went out with an event
        self.cached = 0  # prompt tokens whose keys and values came from the prefix cache
        self.computed = 0  # prompt tokens in its cache row so far (chunked prefill)
        self.sent = 0  # of `tokens`, how many earlier events carried
        self.held: list[int] = []  # ids whose text is not yet a whole character
        self.text = ""  # decoded new text (stop string cut off once found)
        self.emitted = 0  # characters of `text` already sent
        self.cancelled = False
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_done: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        """Its whole prompt is in its cache row (prompts are never empty)."""
        return self.computed == len(self.prompt)


def _check_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")


def _check_slots(max_batch: int, max_queue: int) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")


def _new_requests(prompts: Sequence[list[int]], params: GenerationParams | Sequence[GenerationParams],
                  sink: Callable[[Event], None], context_length: int) -> list[Request]:
    """A submitted group's requests, once every prompt and its max_tokens fit the context."""
    if isinstance(params, GenerationParams):
        params = [params] * len(prompts)
    for p, gp in zip(prompts, params, strict=True):
        if gp.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {gp.max_tokens}")
        check_fits(len(p), gp.max_tokens, context_length)
    return [Request(list(p), gp, sink, i) for i, (p, gp) in enumerate(zip(prompts, params))]


class Engine:
    """Continuous batching over `max_batch` slots of one KV cache, run by one thread.

    Args:
        model: the transformer (put in eval mode here).
        tokenizer: anything with `encode`, `decode` and `eot_id`.
        max_batch: slots, i.e. sequences decoded together.
        max_queue: requests that may wait for a slot; beyond that `submit` raises `QueueFull`.
        prefix_cache_bytes: memory for the `PrefixCache` of finished requests' keys and values;
            None: as much as the KV cache itself, 0: no prefix cache.
        prefill_chunk: prompt tokens prefilled per step (None: `PREFILL_CHUNK`).
    """

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 prefix_cache_bytes: int | None = None, prefill_chunk: int | None = None) -> None:
        _check_slots(max_batch, max_queue)
        _check_chunk(prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = model.cfg.context_length
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.cfg, max_batch, device=self.device, dtype=param.dtype)
        cache_bytes = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = cache_bytes
        token_bytes = cache_bytes // (max_batch * self.cache.max_len)
        prefix_cache_bytes = int(prefix_cache_bytes)  # as EngineProcess passes it on
        self.prefix_cache = PrefixCache(prefix_cache_bytes, token_bytes) if prefix_cache_bytes > 0 else None
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # _active[i].slot == i: the running rows are 0..n-1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._pieces: dict[int, str | None] = {}  # token id -> its text (None: partial UTF-8)
        # Counters for /metrics (written by the engine thread only).
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.on_step: Callable[[], None] | None = None
        """Called on the engine thread after every step, and before finished requests' rows are
        copied into the prefix cache (EngineProcess sends its events then)."""
        self._prompts_to_keep: list[Request] = []  # prefilled this step: kept in the prefix cache

    # --- control ---------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every unfinished request gets finish_reason "error"."""
        with self._lock:
            self._stopping = self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            leftover = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        for req in leftover:
            self._finish(req, "error", error="the server is shutting down")

    @property
    def alive(self) -> bool:
        """The loop is running (started, not stopped, not dead)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot and not yet finished (a finished one's slot is freed before
        the next step, but it no longer counts once its last event went out: a client that
        sends its next request at once must not find it still in the way)."""
        return sum(not req.done for req in self._active)

    # --- submitting ------------------------------------------------------------------------

    def submit(
        self,
        prompts: Sequence[list[int]],
        params: GenerationParams | Sequence[GenerationParams],
        sink: Callable[[Event], None],
    ) -> list[Request]:
        """Queue a group of prompts (all or none); `sink(event)` is called from the engine
        thread with each prompt's events (`event.index` says which). Raises `UserError` (from
        `generate.check_fits`) for a prompt that does not fit the context, `QueueFull` when the
        queue has no room, `EngineClosed` once stopped."""
        reqs = _new_requests(prompts, params, sink, self.context_length)
        for req in reqs:
            if req.params.seed is not None:
                req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is not running")
            in_flight = self.running + len(self._waiting)
            if in_flight + len(reqs) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"server overloaded: {self.running} requests running and {len(self._waiting)} "
                    f"waiting (max_batch {self.max_batch}, max_queue {self.max_queue}); retry later"
                )
            self._waiting.extend(reqs)
            self._lock.notify_all()
        return reqs

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): its slot is freed before the next step."""
        with self._lock:
            if req.done:
                return
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "cancelled")
            self._lock.notify_all()

    def generate(self, prompt: list[int], params: GenerationParams, timeout: float = 60.0) -> Completion:
        """Blocking: submit one prompt and wait for its whole completion."""
        events: queue.Queue[Event] = queue.Queue()
        (req,) = self.submit([prompt], params, events.put)
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.cancel(req)
                raise TimeoutError(f"generation did not finish within {timeout} s") from None
            if ev.finish_reason is not None:
                if ev.error:
                    raise RuntimeError(ev.error)
                return Completion(req.text, list(req.tokens), ev.finish_reason,
                                  ev.prompt_tokens, ev.completion_tokens)

    # --- the loop (engine thread) -----------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._active):
                        self._lock.wait()
                    if self._stopping:
                        return
                    self._drop_cancelled()
                    admitted = []
                    while self._waiting and len(self._active) < self.max_batch:
                        if self._wait_for_shared_start(self._waiting[0]):
                            break
                        req = self._waiting.popleft()
                        req.slot = len(self._active)
                        self._active.append(req)
                        admitted.append(req)
                try:
                    self._prefill_step(admitted)
                    if any(req.done or req.cancelled for req in self._active):  # finished on their first
                        # token, or cancelled meanwhile (a row still prefilling must not sit
                        # before rows ready to decode)
                        self._events_out()
                        with self._lock:
                            self._drop_cancelled()
                    if self._active:
                        self._decode_step()
                except Exception as e:  # noqa: BLE001 - a bug must fail its requests, not hang them
                    log.exception("engine step failed")
                    with self._lock:
                        failed, self._active = self._active, []
                    for req in failed:
                        self._finish(req, "error", error=f"internal error: {type(e).__name__}: {e}")
                self._events_out()
                for req in self._prompts_to_keep:  # after the step's events went out
                    if not req.done:  # (a finished one kept its whole row already)
                        self._offer(req.prompt, req.slot)
                self._prompts_to_keep.clear()

    def _events_out(self) -> None:
        if self.on_step is not None:
            self.on_step()

    def _wait_for_shared_start(self, req: Request) -> bool:
        """Whether a waiting request should wait (and the queue behind it): it shares at least
        SHARED_PREFIX_MIN first tokens with a prompt being prefilled, more than the prefix cache
        holds for it. That prompt is in the prefix cache once prefilled, and `req` then copies
        the shared tokens instead of computing them again (requests with a common context that
        arrive together: `n` choices of one prompt, an evaluation's answers to one question)."""
        if self.prefix_cache is None or req.params.prompt_logprobs or len(req.prompt) <= SHARED_PREFIX_MIN:
            return False
        shared = max((shared_start(a.prompt, req.prompt[:-1])
                      for a in self._active if not (a.prefilled or a.done or a.cancelled)), default=0)
        shared = min(shared, self.prefix_cache.max_bytes // self.prefix_cache.token_bytes)  # what it can keep
        return shared >= SHARED_PREFIX_MIN and shared > self.prefix_cache.match(req.prompt, touch=False)[1]

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled and finished requests, then compact: the rows that stay
        move down (cache rows and positions copied) so the running rows are always 0..n-1 and
        a decode step reads the cache through views instead of gathering rows (called with the
        lock held, on the engine thread)."""
        keep = []
        for req in self._active:
            if req.cancelled or req.done:
                if not req.done:
                    self._finish(req, "cancelled")
                self._keep_prefix(req)
            else:
                keep.append(req)
        if len(keep) == len(self._active):
            return
        cache = self.cache
        for i, req in enumerate(keep):  # slots ascend, so row i is free by the time it is written
            if req.slot != i:
                n = int(cache.pos[req.slot])
                for ck, cv in zip(cache.k, cache.v):
                    ck[i, :, :n] = ck[req.slot, :, :n]  # (nkv, n, hs)
                    cv[i, :, :n] = cv[req.slot, :, :n]
                cache.pos[i] = n
                req.slot = i
        self._active = keep

    def _keep_prefix(self, req: Request) -> None:
        """Offer a leaving request's row to the prefix cache: the tokens it ran through the
        model (its prompt and all its new tokens but the last, which was never fed back)."""
        if self.prefix_cache is None or not req.prefilled or req.finish_reason == "error":
            return
        # (A request cancelled before its first token had a placeholder fed at its position
        # after the prompt: only the prompt's positions are its tokens.)
        self._offer((req.prompt + req.tokens)[: int(self.cache.pos[req.slot])], req.slot)

    def _offer(self, tokens: list[int], slot: int) -> None:
        """Give a row's tokens to the prefix cache. It only saves work: if keeping the row
        fails (out of memory, say), every request goes on without it."""
        try:
            self.prefix_cache.store(tokens, self.cache, slot)
        except Exception:  # noqa: BLE001
            log.exception("could not keep a row in the prefix cache")

    def _prefill_step(self, admitted: list[Request]) -> None:
        """Start the admitted prompts in their rows (a start the prefix cache holds is copied
        in), then prefill up to PREFILL_CHUNK prompt tokens of the requests still prefilling,
        first come first served; those whose whole prompt is then in the cache take their first
        token. Rows prefilled in the same step share forward passes (shorter ones padded, see
        `Transformer.forward`): on the 2-core CPU 8 prompts of 42 tokens took 4.8 ms in one
        pass against 12.5 ms one by one."""
        for req in admitted:
            if req.done:
                continue
            self.cache.reset([req.slot])
            if self.prefix_cache is not None and not req.params.prompt_logprobs:
                try:
                    entry, cached = self.prefix_cache.match(req.prompt)
                    if cached:
                        self.prefix_cache.load(entry, cached, self.cache, req.slot)
                        req.cached = cached
                except Exception:  # noqa: BLE001 - the prompt is then prefilled whole
                    log.exception("could not reuse the prefix cache")
                    self.cache.reset([req.slot])
            req.computed = req.cached
            self.prompt_tokens_total += len(req.prompt)
            self.cached_tokens_total += req.cached
        work: list[tuple[Request, int]] = []  # (request, prompt tokens to run now), in row order
        budget = self._chunk()
        for req in self._active:
            left = len(req.prompt) - req.computed
            if left == 0 or req.done or req.cancelled:
                continue
            if budget == 0:
                break
            work.append((req, min(left, budget)))
            budget -= work[-1][1]
        passes = [[w] for w in work if w[0].params.prompt_logprobs]  # logits everywhere: alone
        work = sorted((w for w in work if not w[0].params.prompt_logprobs), key=lambda w: w[1])
        while work:  # by length: similar lengths together, less padding
            n = 1  # the longest of a sorted pass is its last: grow while the padded pass fits
            while n < len(work) and self._fits(work[: n + 1]):
                n += 1
            passes.append(work[:n])
            work = work[n:]
        for group in passes:
            try:
                self._prefill_pass(group)
            except Exception as e:  # noqa: BLE001 - a prompt that fails (say out of memory)
                # fails its own requests; the running ones only share the step. Its rows alone
                # were written, and they are reset before their next use.
                log.exception("prefill failed")
                for req, _ in group:
                    self._finish(req, "error", error=f"internal error: {type(e).__name__}: {e}")

    def _chunk(self) -> int:
        return PREFILL_CHUNK if self.prefill_chunk is None else self.prefill_chunk

    def _fits(self, group: list[tuple[Request, int]]) -> bool:
        """A prefill pass of these rows (the longest last) has at most PREFILL_CHUNK padding
        tokens (a 1-token rest and a 500-token one would rather not share a pass of 8 rows; a
        pass is then at most twice the chunk) and, padding included, stays within every row's
        cache: each row starts where its prompt is up to."""
        T = group[-1][1]
        return (len(group) * T - sum(n for _, n in group) <= self._chunk()
                and max(req.computed for req, _ in group) + T <= self.cache.max_len)

    def _prefill_pass(self, group: list[tuple[Request, int]]) -> None:
        """One forward pass over the next `n` prompt tokens of each row of the group."""
        reqs = [req for req, _ in group]
        every = reqs[0].params.prompt_logprobs
        ids = [req.prompt[req.computed : req.computed + n] for req, n in group]
        logits, _ = self.model(padded_batch(ids, self.device), cache=self.cache,
                               rows=torch.tensor([req.slot for req in reqs]), last_only=not every,
                               lengths=[n for _, n in group])  # (n, 1, V), or (1, T, V) for prompt logprobs
        if every:  # position t predicts token t + 1: this chunk scores the tokens after each of its own
            req, (_, n) = reqs[0], group[0]
            scored = req.prompt[req.computed + 1 : req.computed + n + 1]  # the last chunk scores n - 1
            lp = logits[0, : len(scored)].float().log_softmax(-1)
            entries = logprob_entries(lp, scored, req.params.logprobs or 0) if scored else []
            req.prompt_logprobs = (req.prompt_logprobs or [None]) + entries
        for req, n in group:
            req.computed += n
        done = [i for i, req in enumerate(reqs) if req.computed == len(req.prompt)]
        if self.prefix_cache is not None:  # for prompts that start alike, kept after the step
            self._prompts_to_keep += [reqs[i] for i in done]
        if done:
            self._sample_and_accept(logits[done, -1], [reqs[i] for i in done], first=True)

    def _decode_step(self) -> None:
        """One new token for every request past its prompt: a single (B, 1) forward pass over
        rows 0..B-1. Rows still prefilling come after those: prompts are prefilled first come
        first served, so they finish in row order."""
        B = 0
        while B < len(self._active) and self._active[B].prefilled:
            B += 1
        if B == 0:
            return
        reqs = self._active[:B]
        last = [[r.tokens[-1] if r.tokens else self.eot_id] for r in reqs]
        idx = torch.tensor(last, device=self.device)  # (B, 1); row i is cache row i
        logits, _ = self.model(idx, cache=self.cache, last_only=True)  # (B, 1, V)
        self.steps_total += 1
        self._sample_and_accept(logits[:, -1], reqs)
        if any(r.done for r in reqs):
            self._events_out()  # last events first: keeping their rows takes a copy
            with self._lock:
                self._drop_cancelled()

    def _sample_and_accept(self, logits: torch.Tensor, reqs: list[Request], first: bool = False) -> None:
        """logits (B, V) -> each request's next token, with its log-probabilities if asked for."""
        toks = self._sample(logits, reqs)
        entries: list[Logprob | None] = [None] * len(reqs)
        want = [i for i, req in enumerate(reqs) if req.params.logprobs is not None and toks[i] is not None]
        if want:
            k = max(reqs[i].params.logprobs for i in want)
            lp = logits[want].float().log_softmax(-1)
            for i, (chosen, top) in zip(want, logprob_entries(lp, [toks[i] for i in want], k)):
                entries[i] = (chosen, top[: reqs[i].params.logprobs])
        now = time.perf_counter()
        for req, tok, entry in zip(reqs, toks, entries):
            if tok is None:  # its sampling failed: it has finished with an error
                continue
            if first:
                req.t_first_token = now
            self._accept(req, tok, entry)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int | None]:
        """logits (B, V) -> one id per request. Rows that share a sampling config and need no
        generator or history of their own are sampled in one call. Where sampling raises (a
        bug), only the requests sampled in that call fail (None), not the whole batch."""
        out: list[int | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            cfg = req.params.sampling
            if req.generator is None and not cfg.penalised:
                key = (cfg.logit_bias,) + ((cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
                                           if not cfg.greedy else (0,))
                groups.setdefault(key, []).append(i)
                continue
            history = generated = None
            if cfg.repetition_penalty != 1.0:
                history = torch.tensor([req.prompt + req.tokens], device=logits.device)  # (1, L)
            if (cfg.presence_penalty or cfg.frequency_penalty) and req.tokens:
                generated = torch.tensor([req.tokens], device=logits.device)  # (1, G)
            try:
                out[i] = int(sample_next_token(logits[i : i + 1], cfg, req.generator, history, generated)[0])
            except Exception as e:  # noqa: BLE001
                self._sampling_failed([req], e)
        for rows in groups.values():
            cfg = reqs[rows[0]].params.sampling
            sub = logits if len(rows) == len(reqs) else logits[rows]
            try:
                toks = sample_next_token(sub, cfg).tolist()
            except Exception as e:  # noqa: BLE001
                self._sampling_failed([reqs[i] for i in rows], e)
                continue
            for i, tok in zip(rows, toks):
                out[i] = tok
        return out

    def _sampling_failed(self, reqs: list[Request], e: Exception) -> None:
        log.exception("sampling failed")
        for req in reqs:
            self._finish(req, "error", error=f"internal error while sampling: {type(e).__name__}: {e}")

    def _accept(self, req: Request, tok: int, logprob: Logprob | None = None) -> None:
        """Add a sampled token to a request: text, stop strings, limits, events."""
        if req.cancelled or req.done:
            return
        params = req.params
        if tok == self.eot_id and not params.ignore_eos:
            if logprob is not None:  # scored like any token (an evaluation may ask how likely)
                req.logprobs.append(logprob)
            self._finish(req, "stop")
            return
        req.tokens.append(tok)
        if logprob is not None:
            req.logprobs.append(logprob)
        self.generation_tokens_total += 1
        finish = "length" if len(req.tokens) >= params.max_tokens else None
        piece = self._piece(tok)
        if piece == "":  # a special token: no text, so it must not count among held bytes
            if finish:
                self._finish(req, finish)
            return
        if req.held or piece is None:  # part of a character: wait for the rest
            req.held.append(tok)
            piece = self._text(req.held)
        if finish or not piece.endswith("\ufffd") or len(req.held) >= _MAX_HELD_TOKENS:
            req.held.clear()
            req.text += piece
            if req.stop and piece:
                cut = find_stop(req.text, req.stop)
                if cut is not None:
                    req.text = req.text[:cut]
                    finish = "stop"
        if finish:
            self._finish(req, finish)
            return
        final = stable_prefix(req.text, req.stop) if req.stop else req.text
        if len(final) > req.emitted:
            delta = final[req.emitted :]
            req.emitted = len(final)
            req.sink(Event(req.index, delta, **self._new_output(req)))

    def _piece(self, tok: int) -> str | None:
        """The text of one token on its own ("" for a special token), or None when it is not
        whole characters. Both tokenizer kinds decode by concatenation, so a token after a
        character boundary adds exactly this text; memoised, as this runs for every token of
        every request."""
        if tok not in self._pieces:
            text = self._text([tok])
            self._pieces[tok] = None if "\ufffd" in text else text
        return self._pieces[tok]

    def _text(self, ids: list[int]) -> str:
        """Generated text never shows special tokens (an end-of-text kept by ignore_eos, a
        padding id an untrained model picked), as in vLLM and the OpenAI API."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Send the rest of the text and the final event; the slot is freed by the loop."""
        if req.done:
            return
        if req.held and reason in ("stop", "length"):
            req.text += self._text(req.held)
            req.held.clear()
            cut = find_stop(req.text, req.stop) if req.stop else None
            if cut is not None:
                req.text, reason = req.text[:cut], "stop"
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        delta = req.text[req.emitted :] if reason in ("stop", "length") else ""
        req.emitted = len(req.text)
        req.sink(Event(req.index, delta, reason, len(req.prompt), len(req.tokens), error,
                       cached_tokens=req.cached, **self._new_output(req)))

    @staticmethod
    def _new_output(req: Request) -> dict:
        """What an event carries besides text: the ids (and their log-probabilities) since the
        previous event, and the prompt's log-probabilities in the first."""
        out = {"ids": req.tokens[req.sent :], "logprobs": req.logprobs[req.sent :]}
        req.sent = len(req.tokens)
        if req.prompt_logprobs is not None and not req.prompt_sent:
            out["prompt_logprobs"] = req.prompt_logprobs
            req.prompt_sent = True
        return out


class EventStream:
    """Async side of a submitted group: `await next_batch()` in an asyncio task; `cancel()`
    frees the slots (call it when the client goes away).

    The engine thread appends events to a buffer and wakes the event loop only when this
    stream's task is actually waiting; a task that comes back every few milliseconds finds a
    full buffer and takes it without any cross-thread wake-up.
    """

    def __init__(self, engine: Engine, prompts: Sequence[list[int]],
                 params: GenerationParams | Sequence[GenerationParams]) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._buffer: list[Event] = []
        self._waiter: asyncio.Future | None = None  # next_batch() waiting for any event
        self._holder: asyncio.Future | None = None  # hold() waiting for a last event
        self._final = False  # the buffer holds a request's last event
        self.engine = engine
        self.requests = engine.submit(prompts, params, self._put)
        self._open = len(self.requests)

    def _put(self, event: Event) -> None:  # engine thread (or cancel()'s caller)
        with self._lock:
            self._buffer.append(event)
            waiters = [self._waiter]
            self._waiter = None
            if event.finish_reason is not None:
                self._final = True
                waiters.append(self._holder)
                self._holder = None
        for waiter in waiters:
            if waiter is not None:
                try:
                    self._loop.call_soon_threadsafe(_wake, waiter)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    pass

    @property
    def finished(self) -> bool:
        return self._open == 0

    async def hold(self, seconds: float) -> None:
        """Sleep up to `seconds` to gather output into fewer chunks, but no longer than until
        a request of this stream finishes: a last chunk (and the client's next request) should
        not wait for the interval."""
        with self._lock:
            if self._final:
                return
            holder = self._holder = self._loop.create_future()
        timer = self._loop.call_later(seconds, _wake, holder)
        try:
            await holder
        finally:
            timer.cancel()
            with self._lock:
                if self._holder is holder:
                    self._holder = None

    async def next_batch(self) -> list[Event]:
        """Every event since the last call; waits for one if there is none yet."""
        with self._lock:
            events, self._buffer = self._buffer, []
            self._final = False
            if not events:
                waiter = self._waiter = self._loop.create_future()
        if not events:
            await waiter
            with self._lock:
                events, self._buffer = self._buffer, []
                self._final = False
        self._open -= sum(ev.finish_reason is not None for ev in events)
        return events

    def cancel(self) -> None:
        for req in self.requests:
            self.engine.cancel(req)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


# --- threads -------------------------------------------------------------------------------------

SMALL_MODEL_PARAMS = 20_000_000
"""Below this many parameters a decode step is ~50 tiny operations: intra-op threads cost more
than they save, and on a busy machine they stall each other (on the loaded 2-core development
machine one stream from the tiny preset ran at 349 tokens/s with 1 thread, 59 with 2)."""


def pick_threads(model: Transformer) -> str:
    """One torch thread for a small model on CPU unless OMP_NUM_THREADS says otherwise; says
    what it chose (for the server's start-up line)."""
    if "OMP_NUM_THREADS" in os.environ:
        return f"{torch.get_num_threads()} torch threads from OMP_NUM_THREADS"
    param = next(model.parameters())
    if param.device.type == "cpu" and model.num_params(non_embedding=False) < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)
        return "1 torch thread for a small model; set OMP_NUM_THREADS to change"
    return f"{torch.get_num_threads()} torch threads"
