"""Continuous batching: many requests share one model and one batched KV cache.

Driven by `scratchlm serve RUN_DIR` (through `scratchlm.serve`); usable on its own:

    engine = Engine(model, tokenizer, max_batch=8, max_queue=64).start()
    result = engine.generate(tokenizer.encode("Hello"), GenerationParams(max_tokens=32))
    engine.stop()

The cache has `max_batch` rows ("slots"). Each row keeps its own position (`KVCache.pos`), so
rows advance independently. One background thread runs the loop, step by step:

1. drop finished and cancelled requests: their slots become free at once, and the rows that
   stay move down (keys, values and position copied) so the running rows are 0..n-1;
2. admit waiting requests into free slots: reset the row, *prefill* the prompt into it alone
   (`rows=[slot]`) and sample the first token;
3. *decode* one token for every running request together: one forward pass of shape (n, 1)
   over cache rows 0..n-1 (read through views, no gather); each row attends only to its own
   positions, and stale keys of a reused row are masked out by position.

Requests therefore join and leave the running batch between steps: a long generation never
blocks a new request's start, it only shares the decode steps with it. Sampling is
`generate.sample_next_token` (the only sampling code), with each request's own
`SamplingConfig` and, when it asked for a seed, its own `torch.Generator`. Text streams out as
deltas that never split a UTF-8 character and never show the beginning of a stop string that
may still complete.

The waiting queue is bounded: `submit` raises `QueueFull` (the server's 429) instead of
growing without limit, and `EngineClosed` (503) once the engine stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.generate import SamplingConfig, find_stop, stable_prefix, check_fits, sample_next_token
from scratchlm.model import KVCache, Transformer

log = logging.getLogger(__name__)

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
                 index: int, device: torch.device) -> None:
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.stop = [s for s in params.stop if s]  # an empty stop string would stop at once
        self.sink = sink
        self.index = index
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.slot = -1
        self.tokens: list[int] = []  # new ids, end-of-text excluded
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


class Engine:
    """Continuous batching over `max_batch` slots of one KV cache, run by one thread.

    Args:
        model: the transformer (put in eval mode here).
        tokenizer: anything with `encode`, `decode` and `eot_id`.
        max_batch: slots, i.e. sequences decoded together.
        max_queue: requests that may wait for a slot; beyond that `submit` raises `QueueFull`.
    """

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = model.cfg.context_length
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.cfg, max_batch, device=self.device, dtype=param.dtype)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # _active[i].slot == i: the running rows are 0..n-1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._pieces: dict[int, str | None] = {}  # token id -> its text (None: partial UTF-8)
        # Counters for /metrics (written by the engine thread only).
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0

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
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return len(self._active)

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
        if isinstance(params, GenerationParams):
            params = [params] * len(prompts)
        for p, gp in zip(prompts, params, strict=True):
            if gp.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {gp.max_tokens}")
            check_fits(len(p), gp.max_tokens, self.context_length)
        reqs = [Request(list(p), gp, sink, i, self.device) for i, (p, gp) in enumerate(zip(prompts, params))]
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
                        req = self._waiting.popleft()
                        req.slot = len(self._active)
                        self._active.append(req)
                        admitted.append(req)
                try:
                    for req in admitted:
                        if not req.done:
                            self._prefill(req)
                    if any(req.done for req in admitted):  # finished on their first token
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

    def _prefill(self, req: Request) -> None:
        """Run the prompt into the request's own cache row and take its first token."""
        self.cache.reset([req.slot])
        idx = torch.tensor([req.prompt], device=self.device)  # (1, T)
        logits, _ = self.model(idx, cache=self.cache, rows=torch.tensor([req.slot]), last_only=True)
        self.prompt_tokens_total += len(req.prompt)
        tok = self._sample(logits[:, -1], [req])[0]  # logits: (1, 1, V)
        req.t_first_token = time.perf_counter()
        self._accept(req, tok)

    def _decode_step(self) -> None:
        """One new token for every active request: a single (B, 1) forward pass."""
        reqs = self._active
        last = [[r.tokens[-1] if r.tokens else self.eot_id] for r in reqs]
        idx = torch.tensor(last, device=self.device)  # (B, 1); row i is cache row i
        logits, _ = self.model(idx, cache=self.cache, last_only=True)  # (B, 1, V)
        self.steps_total += 1
        for req, tok in zip(reqs, self._sample(logits[:, -1], reqs)):
            self._accept(req, tok)
        if any(r.done for r in reqs):
            with self._lock:
                self._drop_cancelled()

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits (B, V) -> one id per request. Rows that share a sampling config and need no
        generator or history of their own are sampled in one call."""
        out: list[int | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(reqs):
            cfg = req.params.sampling
            if req.generator is None and cfg.repetition_penalty == 1.0:
                key = (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p) if cfg.temperature else (0,)
                groups.setdefault(key, []).append(i)
                continue
            history = None
            if cfg.repetition_penalty != 1.0:
                history = torch.tensor([req.prompt + req.tokens], device=logits.device)  # (1, L)
            out[i] = int(sample_next_token(logits[i : i + 1], cfg, req.generator, history)[0])
        for rows in groups.values():
            cfg = reqs[rows[0]].params.sampling
            sub = logits if len(rows) == len(reqs) else logits[rows]
            for i, tok in zip(rows, sample_next_token(sub, cfg).tolist()):
                out[i] = tok
        return out  # type: ignore[return-value]

    def _accept(self, req: Request, tok: int) -> None:
        """Add a sampled token to a request: text, stop strings, limits, events."""
        if req.cancelled or req.done:
            return
        params = req.params
        if tok == self.eot_id and not params.ignore_eos:
            self._finish(req, "stop")
            return
        req.tokens.append(tok)
        self.generation_tokens_total += 1
        finish = "length" if len(req.tokens) >= params.max_tokens else None
        if req.held:
            req.held.append(tok)
            piece = self.tokenizer.decode(req.held)
        else:
            piece = self._piece(tok)
            if piece is None:  # part of a character: wait for the rest
                req.held.append(tok)
                piece = self.tokenizer.decode(req.held)
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
            req.sink(Event(req.index, delta))

    def _piece(self, tok: int) -> str | None:
        """The text of one token on its own, or None when it is not whole characters. Both
        tokenizer kinds decode by concatenation, so a token after a character boundary adds
        exactly this text; memoised, as this runs for every token of every request."""
        piece = self._pieces.get(tok, "")
        if piece == "":
            text = self.tokenizer.decode([tok])
            piece = None if "\ufffd" in text else text
            self._pieces[tok] = piece
        return piece

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """Send the rest of the text and the final event; the slot is freed by the loop."""
        if req.done:
            return
        if req.held and reason in ("stop", "length"):
            req.text += self.tokenizer.decode(req.held)
            req.held.clear()
            cut = find_stop(req.text, req.stop) if req.stop else None
            if cut is not None:
                req.text, reason = req.text[:cut], "stop"
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        delta = req.text[req.emitted :] if reason in ("stop", "length") else ""
        req.emitted = len(req.text)
        req.sink(Event(req.index, delta, reason, len(req.prompt), len(req.tokens), error))


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
        self._waiter: asyncio.Future | None = None
        self.engine = engine
        self.requests = engine.submit(prompts, params, self._put)
        self._open = len(self.requests)

    def _put(self, event: Event) -> None:  # engine thread (or cancel()'s caller)
        with self._lock:
            self._buffer.append(event)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    @property
    def finished(self) -> bool:
        return self._open == 0

    async def next_batch(self) -> list[Event]:
        """Every event since the last call; waits for one if there is none yet."""
        with self._lock:
            events, self._buffer = self._buffer, []
            if not events:
                waiter = self._waiter = self._loop.create_future()
        if not events:
            await waiter
            with self._lock:
                events, self._buffer = self._buffer, []
        self._open -= sum(ev.finish_reason is not None for ev in events)
        return events

    def cancel(self) -> None:
        for req in self.requests:
            self.engine.cancel(req)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
